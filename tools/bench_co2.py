"""CO2 vs synchronous data parallel: all-reduces per step, loss, step time.

Every device on `data`: for AdamW (synchronous data parallel) and CO2 at
each `--local_steps` tau, the all-reduce instructions of the compiled step's
HLO text and the values they reduce, split into those outside any
conditional (run every step) and those inside a `conditional`'s branches
(CO2's outer step: run once per round); then a `--steps` run of
`training.train` (same data, steps and tokens for every run): its last
training loss, the validation loss at the end, and the mean `step_time` of
its logged intervals after the first.

One process with 4 fake CPU devices, or 2 processes x 2 through
`jax.distributed` (the same `--workdir` for both; process 0 prints):

  JAX_NUM_CPU_DEVICES=4 python -m tools.bench_co2
  for i in 0 1; do JAX_NUM_CPU_DEVICES=2 python -m tools.bench_co2 \\
      --coordinator_address=127.0.0.1:12355 --num_processes=2 \\
      --process_id=$i --workdir=/tmp/bench_co2_mp & done; wait
"""

from collections.abc import Sequence
import math
import os
import re
import tempfile

from absl import app
from absl import flags

_STEPS = flags.DEFINE_integer("steps", 48, "Training steps of each run.")
_LOCAL_STEPS = flags.DEFINE_list("local_steps", ["1", "4", "12"], "CO2 taus.")
_STALENESS = flags.DEFINE_integer("staleness", 1, "CO2 staleness (0 or 1).")
_OVERRIDE = flags.DEFINE_string(
  "override",
  "d_model=64,num_layers=2",
  "tiny-hybrid fields to override (`field=value,...`).",
)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_SEQ = flags.DEFINE_integer("seq_len", 64, "Tokens per sequence.")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Parent of the runs' workdirs; default a fresh temp dir."
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Processes of a multi-process run."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index in a multi-process run."
)

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_BRANCHES = re.compile(
  r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+), "
  r"false_computation=%?([\w.\-]+))"
)
_ALL_REDUCE = re.compile(r" = (.*?) all-reduce(?:-start)?\(")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def all_reduces(hlo: str) -> dict:
  """All-reduce count and reduced values, outside / inside conditionals.

  Args:
    hlo: a compiled module's text (`compiled.as_text()`).

  Returns:
    `{"every_step": (count, values), "conditional": (count, values)}`.
  """
  branches, current = set(), None
  per_computation = {}
  for line in hlo.splitlines():
    match = _COMPUTATION.match(line.strip())
    if match and not line.startswith(" "):
      current = match.group(1)
      per_computation[current] = [0, 0]
      continue
    for names in _BRANCHES.findall(line):
      for group in names:
        branches.update(n.strip().lstrip("%") for n in group.split(",") if n)
    reduce = _ALL_REDUCE.search(line)
    if reduce and current is not None:
      per_computation[current][0] += 1
      per_computation[current][1] += sum(
        math.prod(int(d) for d in dims.split(",") if d)
        for dims in _SHAPE.findall(reduce.group(1))
      )
  totals = {"every_step": [0, 0], "conditional": [0, 0]}
  for name, (count, values) in per_computation.items():
    key = "conditional" if name in branches else "every_step"
    totals[key][0] += count
    totals[key][1] += values
  return {k: tuple(v) for k, v in totals.items()}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel

  from lightning_jax import models  # pylint: disable=import-outside-toplevel
  from lightning_jax import parallel  # pylint: disable=import-outside-toplevel
  from lightning_jax import training  # pylint: disable=import-outside-toplevel

  if _NUM_PROCESSES.value is not None:
    parallel.initialize_distributed(
      _COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
  steps, batch_size, seq_len = _STEPS.value, _BATCH.value, _SEQ.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="bench_co2_")
  model = training.apply_overrides(
    models.get_preset("tiny-hybrid"),
    training.parse_overrides(["vocab_size=256", _OVERRIDE.value]),
  )
  variants = [("sync data parallel", None)] + [
    (
      f"co2 tau={t}",
      training.CO2Config(local_steps=int(t), staleness=_STALENESS.value),
    )
    for t in _LOCAL_STEPS.value
  ]
  mesh = parallel.make_mesh(None)
  show = print if jax.process_index() == 0 else lambda *a, **k: None
  show(
    f"{jax.process_count()} process(es) x {jax.local_device_count()} "
    f"devices, all on data; tiny-hybrid {_OVERRIDE.value}, batch "
    f"{batch_size} x {seq_len}, {steps} steps "
    f"({steps * batch_size * seq_len:,} tokens)"
  )
  show(
    "| run | all-reduces every step (values) | in conditionals (values) "
    f"| values / step | s/step | loss@{steps} | eval loss@{steps} |"
  )
  show("|---|---|---|---|---|---|---|")
  for name, co2_cfg in variants:
    config = training.TrainConfig(
      model=model,
      workdir=os.path.join(workdir, name.replace(" ", "_")),
      steps=steps,
      batch_size=batch_size,
      seq_len=seq_len,
      checkpoint_every=0,
      log_every=max(steps // 4, 1),
      eval_every=steps,
      optim=training.OptimConfig(
        total_steps=steps,
        warmup_steps=steps // 10,
        optimizer="adamw" if co2_cfg is None else "co2",
        co2=co2_cfg,
      ),
    )
    runner = training.make_runner(config, mesh)
    optimizer = training.make_optimizer(config.optim)
    abstract = jax.eval_shape(
      lambda key, r=runner, o=optimizer: r.init_state(
        models.init(key, model), o, key
      ),
      jax.random.key(0),
    )
    batch = {
      k: jax.ShapeDtypeStruct((batch_size, seq_len), dtype)
      for k, dtype in (("inputs", "int32"), ("targets", "int32"))
    }
    batch["mask"] = jax.ShapeDtypeStruct((batch_size, seq_len), "float32")
    step = parallel.shard_step(
      runner.make_step(
        optimizer, training.learning_rate(config.optim), runner.grad_fn
      ),
      mesh,
      runner.state_shardings(abstract, mesh),
      parallel.batch_sharding(mesh),
    )
    counts = all_reduces(step.lower(abstract, batch).compile().as_text())
    history = training.train(config).history
    if not history:  # only process 0 logs
      continue
    every, cond = counts["every_step"], counts["conditional"]
    per_round = co2_cfg.local_steps if co2_cfg else 1
    step_time = sum(r["step_time"] for r in history[1:]) / len(history[1:])
    show(
      f"| {name} | {every[0]} ({every[1]:,}) | {cond[0]} ({cond[1]:,}) "
      f"| {every[1] + cond[1] / per_round:,.0f} | {step_time:.3f} "
      f"| {history[-1]['loss']:.4f} | {history[-1]['eval/loss']:.4f} |",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
