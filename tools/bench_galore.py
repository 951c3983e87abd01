"""GaLore vs AdamW: optimiser-state bytes and step time, in one process.

For each `--presets` model and each optimiser (AdamW, and GaLore at its
`OptimConfig` defaults): the bytes of the params' and of the optimiser
state's leaves (GaLore's projectors included), and the time of the jitted
train step on one fixed random batch. After a first step (compilation, and
GaLore's SVDs), `--rounds` rounds of `--steps` steps, the optimisers
interleaved within each round so both see the same machine load; the
fastest round of each is reported. Validation losses come from
`tools.train` runs (docs/benchmarks.md).

  python -m tools.bench_galore --presets=tiny-hybrid,moe-hybrid
"""

from collections.abc import Sequence
import os
import time

from absl import app
from absl import flags

_PRESETS = flags.DEFINE_list(
  "presets", ["tiny-hybrid", "moe-hybrid"], "Model presets."
)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Batch size.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")

_OPTIMIZERS = ("adamw", "galore")


def tree_bytes(tree) -> int:
  """Bytes of every array (or `ShapeDtypeStruct`) leaf of `tree`."""
  import jax  # pylint: disable=import-outside-toplevel

  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel

  from lightning_jax import models  # pylint: disable=import-outside-toplevel
  from lightning_jax import training  # pylint: disable=import-outside-toplevel

  shape = (_BATCH.value, _SEQ.value)
  print(
    f"batch {shape[0]} x {shape[1]}, fastest of {_ROUNDS.value} rounds of "
    f"{_STEPS.value} steps, {jax.device_count()} device(s)"
  )
  print("| preset | optimiser | params bytes | opt-state bytes | s/step |")
  print("|---|---|---|---|---|")
  for preset in _PRESETS.value:
    model = models.get_preset(preset, vocab_size=256)
    tokens = jax.random.randint(
      jax.random.key(2), (shape[0], shape[1] + 1), 0, 256
    )
    batch = {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "mask": jax.numpy.ones(shape),
    }
    grad_fn = training.default_grad_fn(model, training.LossConfig())
    runs = {}
    for name in _OPTIMIZERS:
      optim = training.OptimConfig(optimizer=name)
      optimizer = training.make_optimizer(optim)
      params = models.init(jax.random.key(0), model)
      step = jax.jit(
        training.make_train_step(
          optimizer, training.learning_rate(optim), grad_fn
        )
      )
      state, _ = step(
        training.init_train_state(params, optimizer, jax.random.key(1)), batch
      )
      runs[name] = {
        "step": step,
        "state": jax.block_until_ready(state),
        "bytes": (tree_bytes(params), tree_bytes(state.opt_state)),
        "times": [],
      }
    for _ in range(_ROUNDS.value):
      for run in runs.values():
        begin, state = time.perf_counter(), run["state"]
        for _ in range(_STEPS.value):
          state, _ = run["step"](state, batch)
        run["state"] = jax.block_until_ready(state)
        run["times"].append((time.perf_counter() - begin) / _STEPS.value)
    for name, run in runs.items():
      params_bytes, state_bytes = run["bytes"]
      print(
        f"| {preset} | {name} | {params_bytes:,} | {state_bytes:,} "
        f"| {min(run['times']):.3f} |",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
