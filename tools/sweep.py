"""Runs a scaling sweep: `tools/train.py` over architectures x sizes x
tokens per parameter, then the held-out loss of each run.

  python -m tools.sweep --archs=tnl,transformer --sizes=32x1,32x2,64x2 \
      --tokens_per_param=5,20 --out=/tmp/sweep
  python -m tools.sweep ... --dry_run      # the grid and a CPU-time estimate
  python -m tools.scaling --runs=/tmp/sweep/runs.jsonl  # fits and plots

A size `WxL` is d_model W and L layers; the heads keep the preset's
head_dim (W / head_dim of them) and d_ff = 3 W (the presets' ratio), so a
size is one `--override` of tools/train. A run trains on
`ceil(M N / (batch_size seq_len))` steps of batch_size x seq_len tokens,
N the non-embedding parameters, M the tokens per parameter. Each run has
its workdir `<out>/<arch>-<size>-m<M>/` (tools/train resumes a killed run
from its checkpoint there); a finished run is one JSON row of
`<out>/runs.jsonl` and is skipped when the sweep runs again. The held-out
loss is tools/train's evaluation at the last step (`eval/loss`: the mean
cross-entropy of `--eval_batches` batches of the data's validation split).
Bad flags print one `error:` line and exit with status 2. docs/scaling.md
has the formulas.
"""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags

from lightning_jax import models
from lightning_jax import training
from tools import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS_FILE = "runs.jsonl"
SETTINGS_FILE = "sweep.json"

_ARCHS = flags.DEFINE_list(
  "archs", ["tnl", "transformer"], "Model presets (models.preset_names())."
)
_SIZES = flags.DEFINE_list(
  "sizes", ["32x1", "32x2", "64x2"], "Sizes `<d_model>x<num_layers>`."
)
_TOKENS_PER_PARAM = flags.DEFINE_list(
  "tokens_per_param", ["5", "20"], "Training tokens per parameter M."
)
_OUT = flags.DEFINE_string("out", None, "Sweep directory.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Tokens per sequence.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate of every run.")
_DATA = flags.DEFINE_string("data", "corpus", "tools/train --data.")
_SEED = flags.DEFINE_integer("seed", 0, "tools/train --seed.")
_EVAL_BATCHES = flags.DEFINE_integer(
  "eval_batches", 16, "Validation batches of the held-out loss."
)
_CHECKPOINT_EVERY = flags.DEFINE_integer(
  "checkpoint_every",
  500,
  "tools/train --checkpoint_every (resumption; the held-out loss reads the "
  "final checkpoint).",
)
_DRY_RUN = flags.DEFINE_bool(
  "dry_run", False, "Print the grid and an estimated CPU time; run nothing."
)
_CPU_FLOPS = flags.DEFINE_float(
  "cpu_flops", 1e10, "Training FLOP/s assumed by --dry_run's estimate."
)
_RUN_OVERHEAD_S = flags.DEFINE_float(
  "run_overhead_s", 20.0, "Start-up and compile seconds per run (estimate)."
)
# Settings every run of a sweep directory must share.
_SHARED = ("batch_size", "seq_len", "lr", "data", "seed", "eval_batches")


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the grid."""

  arch: str
  size: str
  tokens_per_param: float
  overrides: dict
  n_params: int
  n_params_total: int
  flops_per_token: float
  steps: int

  @property
  def name(self) -> str:
    return f"{self.arch}-{self.size}-m{self.tokens_per_param:g}"

  @property
  def n_tokens(self) -> int:
    return self.steps * _BATCH_SIZE.value * _SEQ_LEN.value


def make_grid(vocab_size: int) -> list[Run]:
  """The runs of the flags, validated; ValueError on a bad flag."""
  for name, flag in (
    ("batch_size", _BATCH_SIZE),
    ("seq_len", _SEQ_LEN),
    ("eval_batches", _EVAL_BATCHES),
    ("checkpoint_every", _CHECKPOINT_EVERY),
  ):
    if flag.value < 1:
      raise ValueError(f"--{name} must be >= 1, got {flag.value}.")
  try:
    budgets = [float(m) for m in _TOKENS_PER_PARAM.value]
  except ValueError:
    budgets = [-1.0]
  if not budgets or min(budgets) <= 0 or not all(map(math.isfinite, budgets)):
    raise ValueError(
      f"--tokens_per_param must be numbers > 0, got {_TOKENS_PER_PARAM.value}."
    )
  if not _ARCHS.value or not _SIZES.value:
    raise ValueError("--archs and --sizes must name at least one entry.")
  tokens_per_step = _BATCH_SIZE.value * _SEQ_LEN.value
  runs = []
  for arch in _ARCHS.value:
    preset = models.get_preset(arch)
    for size in _SIZES.value:
      overrides = cli.parse_size(size, preset.head_dim)
      cfg = training.apply_overrides(
        preset, {"vocab_size": str(vocab_size), **overrides}
      )
      n = models.non_embedding_params(cfg)
      for m in budgets:
        runs.append(
          Run(
            arch=arch,
            size=size,
            tokens_per_param=m,
            overrides=overrides,
            n_params=n,
            n_params_total=models.num_params(cfg),
            flops_per_token=models.flops_per_token(cfg, _SEQ_LEN.value),
            steps=max(1, math.ceil(m * n / tokens_per_step)),
          )
        )
  return runs


def train_command(run: Run, workdir: str) -> list[str]:
  """The tools/train command line of `run`."""
  override = ",".join(f"{k}={v}" for k, v in run.overrides.items())
  return [
    sys.executable,
    "-m",
    "tools.train",
    f"--model={run.arch}",
    f"--override={override}",
    f"--workdir={workdir}",
    f"--steps={run.steps}",
    f"--batch_size={_BATCH_SIZE.value}",
    f"--seq_len={_SEQ_LEN.value}",
    f"--lr={_LR.value}",
    f"--data={_DATA.value}",
    f"--seed={_SEED.value}",
    f"--checkpoint_every={_CHECKPOINT_EVERY.value}",
    f"--log_every={max(1, run.steps // 20)}",
    f"--eval_every={run.steps}",  # once, at the last step
    f"--eval_batches={_EVAL_BATCHES.value}",
  ]


def _last_row(workdir: str) -> dict:
  """The last row of the run's metrics.jsonl (it holds the final eval)."""
  path = os.path.join(workdir, training.metrics.METRICS_FILE)
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return rows[-1]


def _finished(out: str) -> set[str]:
  path = os.path.join(out, RUNS_FILE)
  if not os.path.exists(path):
    return set()
  with open(path, encoding="utf-8") as f:
    return {json.loads(line)["run"] for line in f if line.strip()}


def _check_settings(out: str) -> None:
  """Writes `<out>/sweep.json`, or checks the flags agree with it."""
  settings = {name: flags.FLAGS[name].value for name in _SHARED}
  path = os.path.join(out, SETTINGS_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    if saved != settings:
      raise ValueError(
        f"--out={out} holds a sweep with other settings {saved}; "
        f"these flags give {settings}."
      )
    return
  os.makedirs(out, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(settings, f)


def _estimate_s(run: Run) -> float:
  return (
    run.flops_per_token * run.n_tokens / _CPU_FLOPS.value
    + _RUN_OVERHEAD_S.value
  )


def print_grid(runs: list[Run], finished: set[str]) -> None:
  print(f"{'run':<28}{'N':>10}{'D':>12}{'steps':>8}{'est. s':>8}")
  todo = [r for r in runs if r.name not in finished]
  for r in runs:
    done = " (done)" if r.name in finished else ""
    print(
      f"{r.name:<28}{r.n_params:>10,}{r.n_tokens:>12,}{r.steps:>8}"
      f"{_estimate_s(r):>8.0f}{done}"
    )
  total = sum(_estimate_s(r) for r in todo)
  print(
    f"{len(todo)} of {len(runs)} runs to do, estimated {total / 60:.1f} CPU "
    f"minutes at {_CPU_FLOPS.value:.2g} FLOP/s + {_RUN_OVERHEAD_S.value:g} s "
    "per run."
  )


def run_one(run: Run, out: str) -> dict | None:
  """Trains (or resumes) `run`, evaluates it and returns its row; None if
  training failed (its log is `<workdir>/train.log`)."""
  workdir = os.path.join(out, run.name)
  os.makedirs(workdir, exist_ok=True)
  command = train_command(run, workdir)
  start = time.time()
  with open(os.path.join(workdir, "train.log"), "a", encoding="utf-8") as log:
    status = subprocess.run(
      command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False
    ).returncode
  if status:
    return None
  last = _last_row(workdir)
  return {
    "run": run.name,
    "arch": run.arch,
    "size": run.size,
    **{k: int(v) for k, v in run.overrides.items()},
    "tokens_per_param": run.tokens_per_param,
    "n_params": run.n_params,
    "n_params_total": run.n_params_total,
    "n_tokens": run.n_tokens,
    "steps": run.steps,
    "flops_per_token": run.flops_per_token,
    "compute": run.flops_per_token * run.n_tokens,
    "val_loss": last["eval/loss"],
    "train_loss": last["loss"],
    "seconds": round(time.time() - start, 1),
    "workdir": workdir,
    "command": " ".join(command[1:]),
  }


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  if not _OUT.value:
    cli.fail("--out (the sweep directory) is required.")
  out = os.path.abspath(_OUT.value)
  try:
    vocab = training.make_dataset(
      _DATA.value,
      seq_len=_SEQ_LEN.value,
      global_batch_size=_BATCH_SIZE.value,
      seed=_SEED.value,
    ).vocab_size
    runs = make_grid(vocab)
    if not _DRY_RUN.value:
      _check_settings(out)
  except ValueError as e:
    cli.fail(e)
  finished = _finished(out)
  print_grid(runs, finished)
  if _DRY_RUN.value:
    return
  failed = []
  for run in runs:
    if run.name in finished:
      continue
    print(f"running {run.name} ({run.steps} steps)", flush=True)
    row = run_one(run, out)
    if row is None:
      failed.append(run.name)
      print(f"{run.name} failed: see {out}/{run.name}/train.log", flush=True)
      continue
    with open(os.path.join(out, RUNS_FILE), "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    print(
      f"{run.name}: val_loss {row['val_loss']:.4f} ({row['seconds']} s)",
      flush=True,
    )
  if failed:
    print(f"error: {len(failed)} run(s) failed: {failed}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
