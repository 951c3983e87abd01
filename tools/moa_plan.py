"""MoA plan: profile a model on calibration data, search rules under a budget.

Writes the plan JSON (`{"alphas": [[...]], "betas": [[...]]}`, the MoA
authors' format; one row per softmax-attention layer) and prints per-layer
density and the predicted loss increase at every profiled length, with the
measured loss change of the model running the plan.

  python -m tools.moa_plan --workdir=/tmp/lightning_jax/transformer \
      --lengths=64,128 --budget=0.5 --out=/tmp/plan.json

The model comes from the latest complete checkpoint of `--workdir` (written
by `tools/train.py`), or, without it, a random init of `--model`.
Calibration sequences come from `--data` (as `tools/train.py --data`).
"""

from collections.abc import Sequence
import itertools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from lightning_jax import models
from lightning_jax import training
from lightning_jax import moa
from tools import cli

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Training workdir to profile (latest complete checkpoint)."
)
_MODEL = flags.DEFINE_string(
  "model", "transformer", "Preset to initialise randomly without --workdir."
)
_OVERRIDE = flags.DEFINE_multi_string(
  "override", [], "Preset fields, `field=value[,...]` (no --workdir)."
)
_DATA = flags.DEFINE_string("data", "corpus", "Calibration data spec.")
_OUT = flags.DEFINE_string("out", None, "Where to write the plan JSON.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the init and the data.")
_LENGTHS = flags.DEFINE_list("lengths", ["64", "128"], "Profiled lengths N.")
_BATCH = flags.DEFINE_integer("batch", 4, "Calibration sequences per length.")
_BUDGET = flags.DEFINE_float("budget", 0.5, "Mean density budget in (0, 1].")
_BLOCK = flags.DEFINE_integer("block", 16, "Profiling block size.")
_SINK = flags.DEFINE_integer("sink", 0, "Attention-sink length of the plan.")
_ALPHAS = flags.DEFINE_list(
  "alphas", ["0", "8", "16", "32", "64"], "Candidate alphas."
)
_BETAS = flags.DEFINE_list(
  "betas", ["0", "0.125", "0.25", "0.5", "1"], "Candidate betas."
)
_MAX_RULES = flags.DEFINE_integer(
  "max_rules_per_layer", 0, "Distinct rules per layer (0: no limit)."
)

flags.mark_flags_as_required(["out"])


def _model():
  if _WORKDIR.value:
    params, cfg, _ = training.load_model(_WORKDIR.value)
    return params, cfg
  cfg = training.apply_overrides(
    models.get_preset(_MODEL.value), training.parse_overrides(_OVERRIDE.value)
  )
  return models.init(jax.random.key(_SEED.value), cfg), cfg


def _calibration(seq_len: int, cfg):
  """`[batch, seq_len]` calibration tokens from --data."""
  return jnp.asarray(
    training.make_dataset(
      _DATA.value,
      seq_len=seq_len,
      global_batch_size=_BATCH.value,
      seed=_SEED.value,
      vocab_size=None if _DATA.value == "corpus" else cfg.vocab_size,
    ).batch(0)["inputs"]
  )


def _check_flags():
  """Lengths and candidate rules of the flags; ValueError on a bad flag."""
  if not 0.0 < _BUDGET.value <= 1.0:
    raise ValueError(f"--budget must be in (0, 1], got {_BUDGET.value}.")
  for name, flag, low in (
    ("batch", _BATCH, 1),
    ("block", _BLOCK, 1),
    ("sink", _SINK, 0),
    ("max_rules_per_layer", _MAX_RULES, 0),
  ):
    if flag.value < low:
      raise ValueError(f"--{name} must be >= {low}, got {flag.value}.")
  lengths = cli.parse_numbers("lengths", _LENGTHS.value, int, 2)
  alphas = cli.parse_numbers("alphas", _ALPHAS.value, float, 0.0)
  betas = cli.parse_numbers("betas", _BETAS.value, float, 0.0, 1.0)
  if _WORKDIR.value:
    cli.check_workdir(_WORKDIR.value)
  return lengths, list(itertools.product(alphas, betas))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  try:
    lengths, candidates = _check_flags()
    params, cfg = _model()
    calibration = {n: _calibration(n, cfg) for n in lengths}
  except cli.INPUT_ERRORS as e:
    cli.fail(e)
  found = moa.search_plan(
    params,
    cfg,
    calibration,
    candidates,
    budget=_BUDGET.value,
    block=_BLOCK.value,
    sink=_SINK.value,
    max_rules_per_layer=_MAX_RULES.value or None,
  )
  found.plan.save(_OUT.value)
  for i, n in enumerate(found.lengths):
    density, predicted = found.density_NxLxH[i], found.predicted_NxLxH[i]
    measured = moa.plan_loss_increase(
      params, cfg, found.plan, calibration[n], _SINK.value
    )
    print(
      f"N={n}: density per attention layer "
      f"{density.mean(-1).round(3).tolist()} (mean {density.mean():.3f});"
      f" predicted loss increase per layer "
      f"{predicted.sum(-1).round(5).tolist()} (total "
      f"{predicted.sum():.5f}); measured {measured:.5f}"
    )
  print(f"plan -> {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
