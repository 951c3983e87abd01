r"""Where the time of a training step goes, per source function.

Compiles the training step of a preset (forward + backward + AdamW,
`benchlib.train_step_fn`), runs it once under `jax.profiler.trace`, and
charges the self time of every executed XLA instruction (its time minus
that of the instructions nested in it, e.g. a while loop's body) to the
innermost function of this repository in the instruction's source stack
(XLA keeps it in the HLO metadata). Backward-pass instructions are charged
to the forward function they differentiate. Prints the step's XLA cost
analysis (FLOPs, bytes accessed) and a table of the functions with their
share of the profiled time.

Shares, not absolute times, are the result: profiled times include the
profiler's overhead and, on a shared machine, waits for a core.

Usage (from the repository root):
  python -m tools.profile_step --preset=deltanet --seq_len=4096 --batch=4
"""

import collections
import gzip
import json
import pathlib
import re
import tempfile

from absl import app
from absl import flags
import jax
import optax

from lightning_jax import models
from tools import benchlib

_PRESET = flags.DEFINE_string("preset", "deltanet", "Model preset.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Sequence length T.")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.")
_TOP = flags.DEFINE_integer("top", 20, "Rows of the table.")
_ROOTS = ("lightning_jax/", "tools/")


def _section(hlo: str, name: str) -> dict[int, str]:
  """`{id: text}` of a section (e.g. `StackFrames`) of an HLO module dump."""
  start = hlo.find(f"\n{name}\n")
  if start < 0:
    return {}
  body = hlo[start + len(name) + 2 :].split("\n\n")[0]
  rows = (
    line.split(" ", 1) for line in body.splitlines() if line[:1].isdigit()
  )
  return {int(i): text for i, text in rows}


def source_functions(hlo: str) -> dict[str, str]:
  """`{instruction: "file:function"}`, the innermost frame of this repository.

  Args:
    hlo: `compiled.as_text()`, with its `FileNames`, `FunctionNames`,
      `FileLocations` and `StackFrames` sections (jax >= 0.9).
  """
  fields = lambda text: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}
  files = {k: v.strip('"') for k, v in _section(hlo, "FileNames").items()}
  names = {k: v.strip('"') for k, v in _section(hlo, "FunctionNames").items()}
  locations = {
    k: (files[f["file_name_id"]], names[f["function_name_id"]])
    for k, f in (
      (k, fields(v)) for k, v in _section(hlo, "FileLocations").items()
    )
  }
  frames = {k: fields(v) for k, v in _section(hlo, "StackFrames").items()}

  def innermost(frame: int) -> str:
    seen = set()
    while frame in frames and frame not in seen:
      seen.add(frame)
      path, function = locations[frames[frame]["file_location_id"]]
      for root in _ROOTS:
        if root in path:
          return f"{root}{path.split(root, 1)[1]}:{function}"
      frame = frames[frame].get("parent_frame_id", 0)
    return "(no source: optimizer, copies)"

  return {
    name: innermost(int(frame))
    for name, frame in re.findall(
      r"^\s*(?:ROOT )?%([\w.\-]+) = .*stack_frame_id=(\d+)", hlo, re.M
    )
  }


def self_times(events: list[dict]) -> collections.Counter:
  """Self time (us) per event name: its duration minus its children's."""
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[(e["pid"], e["tid"])].append(e)
  totals = collections.Counter()
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack, child = [], collections.Counter()
    for i, e in enumerate(thread):
      while (
        stack and thread[stack[-1]]["ts"] + thread[stack[-1]]["dur"] <= e["ts"]
      ):
        stack.pop()
      if stack:
        child[stack[-1]] += e["dur"]
      stack.append(i)
    for i, e in enumerate(thread):
      totals[e["name"]] += e["dur"] - child[i]
  return totals


def profile(cfg, batch: int, seq: int) -> tuple[dict, list[dict]]:
  """`(cost analysis, rows {function, ms, pct})` of one training step."""
  params = models.init(jax.random.key(0), cfg)
  optimizer = optax.adamw(1e-3)
  opt_state = optimizer.init(params)
  tokens = jax.random.randint(
    jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size
  )
  step = benchlib.train_step_fn(cfg, optimizer)
  compiled = step.lower(params, opt_state, tokens).compile()
  functions = source_functions(compiled.as_text())
  jax.block_until_ready(compiled(params, opt_state, tokens))  # warm up
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      jax.block_until_ready(compiled(params, opt_state, tokens))
    (path,) = pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz")
    events = json.load(gzip.open(path))["traceEvents"]
  times = self_times(
    [e for e in events if e.get("ph") == "X" and e["name"] in functions]
  )
  per_function = collections.Counter()
  for name, us in times.items():
    per_function[functions[name]] += us
  total = sum(per_function.values()) or 1
  rows = [
    dict(function=f, ms=us / 1e3, pct=100 * us / total)
    for f, us in per_function.most_common()
  ]
  return compiled.cost_analysis(), rows


def main(argv):
  del argv
  cfg = models.get_preset(_PRESET.value)
  cost, rows = profile(cfg, _BATCH.value, _SEQ_LEN.value)
  print(
    f"# {_PRESET.value}, batch {_BATCH.value}, T {_SEQ_LEN.value}: "
    f"{cost.get('flops', 0):.3g} FLOPs, "
    f"{cost.get('bytes accessed', 0):.3g} bytes accessed per step\n"
  )
  print(benchlib.markdown_table(rows[: _TOP.value]))


if __name__ == "__main__":
  app.run(main)
