"""MoA plan: profile a model on calibration data, search rules under a budget.

Writes the plan JSON (`{"alphas": [[...]], "betas": [[...]]}`, the MoA
authors' format) and prints per-layer density and the predicted loss increase
at every profiled length, with the measured loss of the sparse model.

  python -m tools.moa_plan --calib=README.md --lengths=64,128 \
      --budget=0.5 --out=/tmp/plan.json

The model is the tiny attention-only LM of `lightning_jax.layers.moa_profile`
(random init, or `--params` .npz with keys `embed`, `head`,
`layers/<i>/<wq|wk|wv|wo>`); tokens are the bytes of `--calib` (vocab 256).
"""

from collections.abc import Sequence
import itertools
import pathlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import layers

_CALIB = flags.DEFINE_string("calib", None, "Calibration text file (bytes).")
_OUT = flags.DEFINE_string("out", None, "Where to write the plan JSON.")
_PARAMS = flags.DEFINE_string("params", "", "Params .npz; empty: random init.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random init.")
_LENGTHS = flags.DEFINE_list("lengths", ["64", "128"], "Profiled lengths N.")
_BATCH = flags.DEFINE_integer("batch", 4, "Calibration sequences per length.")
_BUDGET = flags.DEFINE_float("budget", 0.5, "Mean density budget in (0, 1].")
_BLOCK = flags.DEFINE_integer("block", 16, "Profiling block size.")
_SINK = flags.DEFINE_integer("sink", 0, "Attention-sink length of the plan.")
_ALPHAS = flags.DEFINE_list("alphas", ["0", "8", "16", "32", "64"],
                            "Candidate alphas.")
_BETAS = flags.DEFINE_list("betas", ["0", "0.125", "0.25", "0.5", "1"],
                           "Candidate betas.")
_MAX_RULES = flags.DEFINE_integer("max_rules_per_layer", 0,
                                  "Distinct rules per layer (0: no limit).")
_LAYERS = flags.DEFINE_integer("num_layers", 2, "Model layers.")
_D_MODEL = flags.DEFINE_integer("d_model", 64, "Model width.")
_HEADS = flags.DEFINE_integer("num_heads", 4, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 16, "Head width.")

flags.mark_flags_as_required(["calib", "out"])


def _load_params(path: str, cfg: layers.AttentionLMConfig) -> dict:
  with np.load(path) as data:
    return {"embed": jnp.asarray(data["embed"]),
            "head": jnp.asarray(data["head"]),
            "layers": [{name: jnp.asarray(data[f"layers/{i}/{name}"])
                        for name in ("wq", "wk", "wv", "wo")}
                       for i in range(cfg.num_layers)]}


def _calibration(path: str, lengths: Sequence[int], batch: int) -> dict:
  data = np.frombuffer(pathlib.Path(path).read_bytes(), np.uint8)
  out = {}
  for n in lengths:
    if data.size < n * batch:
      raise app.UsageError(f"--calib holds {data.size} bytes, fewer than "
                           f"--batch * length = {batch * n}.")
    out[n] = jnp.asarray(data[:n * batch].reshape(batch, n).astype(np.int32))
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  lengths = [int(n) for n in _LENGTHS.value]
  if not lengths or min(lengths) < 2:
    raise app.UsageError(f"--lengths must be integers >= 2, got {lengths}.")
  if not 0.0 < _BUDGET.value <= 1.0:
    raise app.UsageError(f"--budget must be in (0, 1], got {_BUDGET.value}.")
  candidates = list(itertools.product([float(a) for a in _ALPHAS.value],
                                      [float(b) for b in _BETAS.value]))
  cfg = layers.AttentionLMConfig(
      vocab_size=256, num_layers=_LAYERS.value,
      attention=layers.AttentionConfig(
          _D_MODEL.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value,
          sink=_SINK.value, block_size=_BLOCK.value))  # dense until a plan
  params = (_load_params(_PARAMS.value, cfg) if _PARAMS.value else
            layers.init_attention_lm(jax.random.key(_SEED.value), cfg))
  calibration = _calibration(_CALIB.value, lengths, _BATCH.value)

  found = layers.search_attention_lm_plan(
      params, cfg, calibration, candidates, budget=_BUDGET.value,
      block=_BLOCK.value, sink=_SINK.value,
      max_rules_per_layer=_MAX_RULES.value or None)
  found.plan.save(_OUT.value)
  for i, n in enumerate(found.lengths):
    dense = layers.attention_lm_loss(params, calibration[n], cfg)
    sparse = layers.attention_lm_loss(params, calibration[n], cfg, found.plan)
    density, predicted = found.density_NxLxH[i], found.predicted_NxLxH[i]
    print(f"N={n}: density per layer {density.mean(-1).round(3).tolist()} "
          f"(mean {density.mean():.3f}); predicted loss increase per layer "
          f"{predicted.sum(-1).round(5).tolist()} (total "
          f"{predicted.sum():.5f}); measured {float(sparse - dense):.5f} "
          f"(dense loss {float(dense):.4f})")
  print(f"plan -> {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
