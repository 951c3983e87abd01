r"""Upcycling at equal extra tokens: dense vs BTX vs BAM vs split (issue 17).

The whole pipeline of docs/upcycling.md at toy scale, into `--workdir`:

  1. seed: a dense model trained on the domain mixture (`--seed_steps`);
  2. branches: one copy of the seed continued on each domain
     (`--branch_steps` each);
  3. dense: the seed continued on the mixture for the branches' steps
     together (the dense model of equal tokens, the split's source);
  4. the variants, each trained `--moe_steps` on the mixture from:
     dense (continued), btx, bam, bam-shared-kv, bam-top1-attn (BAM with
     top-1 attention experts instead of soft) from the branches, and split
     from the stage-3 dense model.

So every variant has seen the same extra tokens after the seed:
`len(domains) * branch_steps + moe_steps` batches. The mixture alternates
whole batches (step s reads domain s % n), so each domain weighs equally
in the loss whatever its masked-target count (MQAR scores only queries).
Every stage is a `training.train` run (tools/train.py's loop) started
from the previous stage's params by `training.save_initial_state` (as
tools/upcycle.py starts its runs), with its own warmup + cosine schedule;
the MoEs come from `adapt.upcycle` (tools/upcycle.py's transforms).

Prints, for the seed, the branches, the stage-3 dense model and every
variant, the validation loss of each domain (the same `--eval_batches`
held-out batches for all) and their mean, MQAR accuracy, total and active
parameters and training FLOPs per token; for the variants also the mean
loss where their last stage started and the training (forward + backward)
tokens/s, timed interleaved after training (read the ratio to dense: the
machine is shared).

  python -m tools.bench_upcycle --workdir=/tmp/bench_upcycle
"""

import dataclasses
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from lightning_jax import models
from lightning_jax import training
from lightning_jax.adapt import upcycle
from tools import benchlib
from tools import cli

_WORKDIR = flags.DEFINE_string(
  "workdir", "/tmp/bench_upcycle", "Directory of every stage's run (fresh)."
)
_MODEL = flags.DEFINE_string("model", "transformer", "Seed model preset.")
_OVERRIDE = flags.DEFINE_string(
  "override",
  "d_model=64,num_layers=2,num_heads=4,num_kv_heads=2,head_dim=16,"
  "d_ff=256,parallel_block=true",
  "Preset fields, `field=value,...` (tools/train.py's --override).",
)
_DOMAINS = flags.DEFINE_list(
  "domains", ["corpus", "mqar"], "Data specs, one per branch (vocab 256)."
)
_SEED_STEPS = flags.DEFINE_integer("seed_steps", 600, "Seed model steps.")
_BRANCH_STEPS = flags.DEFINE_integer(
  "branch_steps", 300, "Steps of each branch on its domain."
)
_MOE_STEPS = flags.DEFINE_integer(
  "moe_steps", 400, "Steps of every variant on the mixture."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Tokens per sequence.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate of every stage.")
_TOP_K = flags.DEFINE_integer("top_k", 1, "FFN experts per token.")
_PARTITION = flags.DEFINE_enum(
  "partition", "cluster", list(upcycle.PARTITIONS), "split's neuron groups."
)
_EVAL_BATCHES = flags.DEFINE_integer(
  "eval_batches", 8, "Validation batches per domain."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the params and data.")


@dataclasses.dataclass(frozen=True)
class Alternating:
  """The domains' batches in turn: step s is domain s % n's batch s // n
  (a `training.Dataset`)."""

  domains: tuple

  @property
  def vocab_size(self) -> int:
    return max(d.vocab_size for d in self.domains)

  def batch(self, step: int):
    n = len(self.domains)
    return self.domains[step % n].batch(step // n)


def _dataset(spec: str, split: str, seed: int):
  return training.make_dataset(
    spec,
    seq_len=_SEQ_LEN.value,
    global_batch_size=_BATCH_SIZE.value,
    seed=seed,
    split=split,
  )


def _run(name, data, cfg, params, steps, dataset, seed):
  """Trains `cfg` from `params` (None: `models.init`) for `steps` on
  `dataset` (described by `data`) in `<workdir>/<name>`; returns the final
  params."""
  config = training.TrainConfig(
    model=cfg,
    workdir=os.path.join(_WORKDIR.value, name),
    steps=steps,
    batch_size=_BATCH_SIZE.value,
    seq_len=_SEQ_LEN.value,
    seed=seed,
    data=data,
    checkpoint_every=steps,
    keep_checkpoints=1,
    log_every=max(steps // 4, 1),
    optim=training.OptimConfig(
      lr=_LR.value,
      total_steps=steps,
      warmup_steps=training.default_warmup_steps(steps),
    ),
  )
  training.validate(config, jax.device_count())
  if params is not None:
    training.save_initial_state(config, params)
  training.train(config, dataset=dataset)
  return training.load_model(config.workdir)[0]


def _tokens_per_sec(variants: dict, batch, rounds: int = 3) -> dict:
  """name -> training (forward + backward) tokens/s of each `(params, cfg)`
  on `batch`: the best of `rounds` interleaved timings, so that the load of
  the shared machine weighs on every variant alike."""
  steps = {
    name: jax.jit(training.default_grad_fn(cfg, training.LossConfig()))
    for name, (_, cfg) in variants.items()
  }
  key = jax.random.key(0)
  best = dict.fromkeys(variants, np.inf)
  for _ in range(rounds):
    for name, (params, _) in variants.items():
      seconds = benchlib.time_fn(steps[name], params, batch, key, repeats=3)
      best[name] = min(best[name], seconds)
  return {name: batch["inputs"].size / s for name, s in best.items()}


def _evaluator(cfg, batches):
  """`params -> [(loss, accuracy)]`, one per domain's validation batches."""

  @jax.jit
  def sums(params, batch):
    logits, _ = models.forward(params, batch["inputs"], cfg)
    ce = models.masked_ce_sum(logits, batch["targets"], batch["mask"])
    hits, count = training.data.masked_hits(logits, batch)
    return ce, hits, count

  def evaluate(params):
    out = []
    for domain in batches:
      ce, hits, count = np.sum([sums(params, b) for b in domain], axis=0)
      out.append((float(ce / count), float(hits / count)))
    return out

  return evaluate


def _variants(branches, dense, cfg) -> dict:
  """name -> (params, cfg) where each variant's last stage starts."""
  top_k, seed = _TOP_K.value, _SEED.value
  out = {"dense": (dense, cfg)}
  for method in ("btx", "bam", "bam-shared-kv"):
    out[method] = upcycle.upcycle(method, branches, cfg, top_k=top_k, seed=seed)
  out["bam-top1-attn"] = upcycle.bam(
    branches, cfg, top_k=top_k, attention_top_k=1, key=jax.random.key(seed)
  )
  out["split"] = upcycle.upcycle(
    "split",
    [dense],
    cfg,
    num_experts=len(branches),
    top_k=top_k,
    seed=seed,
    partition=_PARTITION.value,
  )
  return out


def _check_flags() -> None:
  """ValueError on a bad flag (before anything compiles)."""
  for flag in (_SEED_STEPS, _BRANCH_STEPS, _MOE_STEPS, _EVAL_BATCHES):
    if flag.value < 1:
      raise ValueError(f"--{flag.name} must be >= 1, got {flag.value}.")
  if len(_DOMAINS.value) < 2:
    raise ValueError(f"--domains must name >= 2 datasets: {_DOMAINS.value}.")
  if os.path.exists(_WORKDIR.value) and os.listdir(_WORKDIR.value):
    raise ValueError(
      f"--workdir={_WORKDIR.value} is not empty; use a fresh one."
    )


def _row(name, cfg, losses, start=None, rate=None, dense_rate=None) -> dict:
  """One table row: per-domain losses (and MQAR accuracy), their mean, the
  mean at the start of the last stage, the model's size and cost."""
  row = {"model": name}
  for spec, (loss, accuracy) in zip(_DOMAINS.value, losses, strict=True):
    row[f"{spec} loss"] = f"{loss:.4f}"
    if spec.startswith("mqar"):
      row[f"{spec} acc"] = f"{accuracy:.3f}"
  row["mean loss"] = f"{np.mean([loss for loss, _ in losses]):.4f}"
  row["at start"] = "" if start is None else f"{np.mean(start):.3f}"
  row["params"] = f"{models.num_params(cfg) / 1e3:.0f}k"
  row["active"] = f"{models.active_params(cfg) / 1e3:.0f}k"
  flops = models.flops_per_token(cfg, _SEQ_LEN.value)
  row["MFLOP/token"] = f"{flops / 1e6:.2f}"
  row["tokens/s"] = "" if rate is None else f"{rate:,.0f}"
  row["vs dense"] = "" if rate is None else f"{rate / dense_rate:.2f}"
  return row


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  start = time.perf_counter()
  seed, specs = _SEED.value, _DOMAINS.value
  try:
    _check_flags()
    domains = tuple(_dataset(s, "train", seed) for s in specs)
    mixture = Alternating(domains)
    cfg = training.apply_overrides(
      models.get_preset(_MODEL.value, vocab_size=mixture.vocab_size),
      training.parse_overrides([_OVERRIDE.value]),
    )
    val = [_dataset(s, "validation", seed) for s in specs]
    init = models.init(jax.random.key(seed), cfg)
    _variants([init] * len(specs), init, cfg)  # every method accepts cfg
  except cli.INPUT_ERRORS as e:
    cli.fail(e)
  mix, n = "+".join(specs), len(domains)
  sources = {
    "seed": _run("seed", mix, cfg, None, _SEED_STEPS.value, mixture, seed)
  }
  for i, (spec, domain) in enumerate(zip(specs, domains, strict=True)):
    sources[f"branch {spec}"] = _run(
      f"branch_{i}",
      spec,
      cfg,
      sources["seed"],
      _BRANCH_STEPS.value,
      domain,
      seed + 1,
    )
  sources["dense, stage 3"] = _run(
    "dense_stage3",
    mix,
    cfg,
    sources["seed"],
    n * _BRANCH_STEPS.value,
    mixture,
    seed + 2,
  )
  batches = [[v.batch(i) for i in range(_EVAL_BATCHES.value)] for v in val]
  evaluate = _evaluator(cfg, batches)
  rows = [_row(name, cfg, evaluate(p)) for name, p in sources.items()]
  branches = [sources[f"branch {spec}"] for spec in specs]
  variants = _variants(branches, sources["dense, stage 3"], cfg)
  starts, trained = {}, {}
  for name, (params, vcfg) in variants.items():
    evaluate = _evaluator(vcfg, batches)
    starts[name] = [loss for loss, _ in evaluate(params)]
    params = _run(name, mix, vcfg, params, _MOE_STEPS.value, mixture, seed + 3)
    trained[name] = (params, vcfg, evaluate(params))
  rates = _tokens_per_sec(
    {name: (p, c) for name, (p, c, _) in trained.items()}, mixture.batch(0)
  )
  for name, (_, vcfg, losses) in trained.items():
    rows.append(
      _row(name, vcfg, losses, starts[name], rates[name], rates["dense"])
    )
  print(
    f"{_MODEL.value} {_OVERRIDE.value}; domains {specs}; "
    f"{_BATCH_SIZE.value} x {_SEQ_LEN.value} tokens per step; seed "
    f"{_SEED_STEPS.value} steps, then {n} x {_BRANCH_STEPS.value} + "
    f"{_MOE_STEPS.value} steps per model; FFN top_k {_TOP_K.value}; "
    f"{time.perf_counter() - start:.0f} s; load {os.getloadavg()[0]:.1f}"
  )
  print(benchlib.markdown_table(rows))


if __name__ == "__main__":
  app.run(main)
