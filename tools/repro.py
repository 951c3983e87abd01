"""Two papers' claims at toy scale, one command each (docs/reproductions.md).

  python -m tools.repro --claim=moa      # MoA vs a uniform window
  python -m tools.repro --claim=mhmoe    # MH-MoE vs MoE

`moa` (Fu et al., 2024, arXiv 2406.14909): trains a small transformer with
`training.train` on corpus windows holding planted key-value pairs
(`reprolib.recall_batch`), plans it with MoA (`moa.search_plan`: profile at
`--profile_lengths`, exact search under each of `--densities`, as
tools/moa_plan.py does), and compares at every `--eval_lengths` the dense
model, the MoA plan and a uniform window of the plan's density at that
length (a plan of `alpha = w, beta = 0` for every head, so both sparse
models run the same MoA kernel): text loss on the validation split and
recall accuracy of the planted pairs.

`mhmoe` (Wu et al., 2024, arXiv 2404.15045): trains a transformer with
top-k MoE FFNs and one with MH-MoE FFNs whose experts and expert width
are chosen to match its parameters and training FLOPs
(`reprolib.matched_mhmoe`), then reports the validation loss and the
fraction of experts each token, each sequence and each batch activates
(`reprolib.expert_activation`).

Each run trains in `<out>/<name>/` (tools/train's layout: rerunning resumes
or reuses it); the tables are printed as markdown and written to
`<out>/<claim>.json`. Bad flags print one `error:` line and exit 2.
"""

import functools
import itertools
import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import moa
from lightning_jax import models
from lightning_jax import training
from tools import cli
from tools import reprolib

CLAIMS = ("moa", "mhmoe")

_CLAIM = flags.DEFINE_enum("claim", None, CLAIMS, "Which claim to test.")
_OUT = flags.DEFINE_string(
  "out", "/tmp/lightning_jax/repro", "Directory of the runs and results."
)
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps of each model.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Training sequence length.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
_D_MODEL = flags.DEFINE_integer("d_model", 64, "Residual width.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Transformer layers.")
_HEAD_DIM = flags.DEFINE_integer(
  "head_dim", 16, "Attention head width (d_model / head_dim heads)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of params, data and plans.")
_EVAL_BATCHES = flags.DEFINE_integer(
  "eval_batches", 4, "Validation batches (of --batch_size) per measurement."
)
# --claim=moa
_DENSITIES = flags.DEFINE_list(
  "densities", ["0.25", "0.5"], "MoA density budgets."
)
_PROFILE_LENGTHS = flags.DEFINE_list(
  "profile_lengths", ["64", "128"], "MoA profiled lengths N."
)
_EVAL_LENGTHS = flags.DEFINE_list(
  "eval_lengths", ["128", "256", "512"], "Lengths of the comparison."
)
_PROFILE_BATCH = flags.DEFINE_integer(
  "profile_batch", 16, "Calibration sequences per profiled length."
)
_BLOCK = flags.DEFINE_integer("block", 16, "MoA profiling block size.")
_SINK = flags.DEFINE_integer("sink", 0, "Attention sink of both sparse models.")
_ALPHAS = flags.DEFINE_list(
  "alphas", ["0", "8", "16", "32", "64"], "MoA candidate alphas."
)
_BETAS = flags.DEFINE_list(
  "betas", ["0", "0.125", "0.25", "0.5", "1"], "MoA candidate betas."
)
_TOKENS_PER_PAIR = flags.DEFINE_integer(
  "tokens_per_pair", 16, "One planted key-value pair per this many tokens."
)
# --claim=mhmoe
_NUM_EXPERTS = flags.DEFINE_integer("num_experts", 8, "MoE experts.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per (sub-)token.")
_MOE_D_FF = flags.DEFINE_integer("moe_d_ff", 128, "MoE expert hidden width.")
_MHMOE_HEADS = flags.DEFINE_integer(
  "mhmoe_heads", 2, "MH-MoE sub-tokens per token."
)


def _transformer(**fields) -> models.ModelConfig:
  """The flags' transformer with `fields` replaced."""
  return models.get_preset(
    "transformer",
    d_model=_D_MODEL.value,
    num_layers=_NUM_LAYERS.value,
    num_heads=_D_MODEL.value // _HEAD_DIM.value,
    head_dim=_HEAD_DIM.value,
    d_ff=3 * _D_MODEL.value,
    **fields,
  )


def _train(name: str, model: models.ModelConfig, dataset=None):
  """Trains `model` in `<out>/<name>` (reused when finished); its params."""
  steps = _STEPS.value
  config = training.TrainConfig(
    model=model,
    workdir=os.path.join(_OUT.value, name),
    steps=steps,
    batch_size=_BATCH_SIZE.value,
    seq_len=_SEQ_LEN.value,
    seed=_SEED.value,
    checkpoint_every=steps,
    log_every=max(steps // 10, 1),
    optim=training.OptimConfig(
      lr=_LR.value,
      total_steps=steps,
      warmup_steps=training.default_warmup_steps(steps),
    ),
  )
  print(f"training {name} ({models.num_params(model):,} params)", flush=True)
  training.train(config, dataset=dataset)
  params, _, _ = training.load_model(config.workdir)
  return params


def _moa_settings():
  """`(densities, profile lengths, eval lengths, candidate rules)` of the
  flags; ValueError naming a bad one."""
  # Every length holds 1 to reprolib.RECALL_KEYS planted pairs.
  shortest = _TOKENS_PER_PAIR.value
  longest = reprolib.RECALL_KEYS * shortest
  if not shortest <= _SEQ_LEN.value <= longest:
    raise ValueError(
      f"--seq_len must be in [{shortest}, {longest}] (--tokens_per_pair "
      f"times [1, {reprolib.RECALL_KEYS}]), got {_SEQ_LEN.value}."
    )
  lengths = [
    cli.parse_numbers(name, flag.value, int, shortest, longest)
    for name, flag in (
      ("profile_lengths", _PROFILE_LENGTHS),
      ("eval_lengths", _EVAL_LENGTHS),
    )
  ]
  return (
    cli.parse_numbers("densities", _DENSITIES.value, float, 1e-3, 1.0),
    *lengths,
    list(
      itertools.product(
        cli.parse_numbers("alphas", _ALPHAS.value, float, 0.0),
        cli.parse_numbers("betas", _BETAS.value, float, 0.0, 1.0),
      )
    ),
  )


def _run_moa(densities, profile_lengths, eval_lengths, candidates) -> dict:
  sink, seed, batch = _SINK.value, _SEED.value, _BATCH_SIZE.value
  mix = functools.partial(
    reprolib.RecallMix, tokens_per_pair=_TOKENS_PER_PAIR.value
  )
  cfg = _transformer(vocab_size=reprolib.RECALL_VOCAB)
  params = _train("moa-dense", cfg, mix(_SEQ_LEN.value, batch, seed))
  calibration = {  # an unseen seed of the training mix
    n: jnp.asarray(
      mix(n, _PROFILE_BATCH.value, seed + 1).full_batch(0)["inputs"]
    )
    for n in profile_lengths
  }
  plans = {
    d: moa.search_plan(
      params,
      cfg,
      calibration,
      candidates,
      budget=d,
      block=_BLOCK.value,
      sink=sink,
    ).plan
    for d in densities
  }
  rows = []
  for n in eval_lengths:
    data = mix(n, batch, seed, split="validation")
    batches = [data.full_batch(i) for i in range(_EVAL_BATCHES.value)]
    dense = reprolib.recall_scores(params, cfg, batches)
    rows.append({"length": n, "model": "dense", "density": 1.0, **dense})
    for d, plan in plans.items():
      density = reprolib.plan_density(plan, n, sink)
      w = reprolib.uniform_window(density, n, sink)
      uniform = reprolib.uniform_plan(w, plan)
      for name, p in (
        (f"moa {d:g}", plan),
        (f"uniform {d:g} (w={w})", uniform),
      ):
        rows.append(
          {
            "length": n,
            "model": name,
            "density": reprolib.plan_density(p, n, sink),
            **reprolib.recall_scores(
              params, reprolib.sparse_config(cfg, p, sink), batches
            ),
          }
        )
  print("| length | model | density | text loss | recall acc. |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['length']} | {r['model']} | {r['density']:.3f} | "
      f"{r['loss']:.4f} | {r['recall']:.3f} |"
    )
  for d, plan in plans.items():
    print(f"MoA plan at density {d:g}: {plan.to_json()}")
  return {
    "rows": rows,
    "plans": {d: json.loads(p.to_json()) for d, p in plans.items()},
  }


def _mhmoe_settings():
  """`(MoE config, matched MH-MoE config, its parameter and FLOP
  mismatch)`; ValueError on a bad flag."""
  base = _transformer(
    ffn_pattern=("moe",),
    num_experts=_NUM_EXPERTS.value,
    top_k=_TOP_K.value,
    moe_d_ff=_MOE_D_FF.value,
    lbl_scope="global",
  )
  return base, *reprolib.matched_mhmoe(base, _MHMOE_HEADS.value, _SEQ_LEN.value)


def _run_mhmoe(base, mh, dp, df) -> dict:
  data = training.make_dataset(
    "corpus",
    seq_len=_SEQ_LEN.value,
    global_batch_size=_BATCH_SIZE.value,
    seed=_SEED.value,
    split="validation",
  )
  batches = [data.batch(i) for i in range(_EVAL_BATCHES.value)]
  routes = jax.jit(reprolib.expert_routes, static_argnums=2)
  rows = []
  for name, cfg in (("moe", base), ("mhmoe", mh)):
    params = _train(name, cfg)
    ce = count = 0.0
    stats = []
    for b in batches:
      logits, _ = reprolib.forward(params, jnp.asarray(b["inputs"]), cfg)
      ce += float(models.masked_ce_sum(logits, b["targets"], b["mask"]))
      count += float(b["mask"].sum())
      stats += [
        reprolib.expert_activation(r, cfg.num_experts)
        for r in routes(params, jnp.asarray(b["inputs"]), cfg)
      ]
    rows.append(
      {
        "model": name,
        "num_experts": cfg.num_experts,
        "moe_d_ff": cfg.moe_d_ff,
        "params": models.num_params(cfg),
        "flops_per_token": models.flops_per_token(cfg, _SEQ_LEN.value),
        "loss": ce / count,
        **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]},
      }
    )
  print(
    f"MH-MoE matched to MoE: params {dp:+.2%}, training FLOPs/token {df:+.2%}"
  )
  print(
    "| model | experts | expert d_ff | params | FLOPs/token | val. loss | "
    "experts/token | per token | per sequence | per batch |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['model']} | {r['num_experts']} | {r['moe_d_ff']} | "
      f"{r['params']:,} | {r['flops_per_token']:.3g} | {r['loss']:.4f} | "
      f"{r['experts_per_token']:.2f} | {r['token']:.1%} | "
      f"{r['sequence']:.1%} | {r['batch']:.1%} |"
    )
  return {"rows": rows, "param_mismatch": dp, "flop_mismatch": df}


def _check_flags() -> None:
  """ValueError naming the first bad flag."""
  if _CLAIM.value is None:
    raise ValueError(f"--claim is required: one of {list(CLAIMS)}.")
  for flag, low in (
    (_STEPS, 1),
    (_BATCH_SIZE, 1),
    (_SEQ_LEN, 1),
    (_D_MODEL, 1),
    (_NUM_LAYERS, 1),
    (_HEAD_DIM, 1),
    (_EVAL_BATCHES, 1),
    (_PROFILE_BATCH, 1),
    (_BLOCK, 1),
    (_SINK, 0),
    (_TOKENS_PER_PAIR, 4),
    (_NUM_EXPERTS, 1),
    (_TOP_K, 1),
    (_MOE_D_FF, 1),
    (_MHMOE_HEADS, 1),
  ):
    if flag.value < low:
      raise ValueError(f"--{flag.name} must be >= {low}, got {flag.value}.")
  for flag in (_HEAD_DIM, _MHMOE_HEADS):
    if _D_MODEL.value % flag.value:
      raise ValueError(
        f"--{flag.name} ({flag.value}) must divide --d_model "
        f"({_D_MODEL.value})."
      )


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  try:
    _check_flags()
    moa_claim = _CLAIM.value == "moa"
    settings = _moa_settings() if moa_claim else _mhmoe_settings()
  except ValueError as e:
    cli.fail(e)
  result = (_run_moa if moa_claim else _run_mhmoe)(*settings)
  path = os.path.join(_OUT.value, f"{_CLAIM.value}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"results -> {path}")


if __name__ == "__main__":
  app.run(main)
