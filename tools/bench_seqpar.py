"""Sequence parallelism in the model: step time and compiled temp memory.

One forward + backward of a model preset on `--seq_len` tokens, on one
device and on a mesh `seq=P` of fake CPU devices (the layers split the work,
see docs/parallel.md): median step time, their ratio, and the compiled
per-device temp memory (`memory_analysis().temp_size_in_bytes`).

  python -m tools.bench_seqpar --model=tiny-hybrid --seq_len=16384 --seq=8
"""

from collections.abc import Sequence
import os

from absl import app
from absl import flags

_MODEL = flags.DEFINE_string("model", "tiny-hybrid", "Model preset.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 16384, "Tokens per sequence T.")
_SEQ = flags.DEFINE_integer("seq", 8, "Devices P of the seq axis.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per step.")
_TIMED = flags.DEFINE_integer("timed_steps", 3, "Timed steps (median).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_num_cpu_devices", _SEQ.value)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from lightning_jax import models  # pylint: disable=import-outside-toplevel
  from lightning_jax import parallel  # pylint: disable=import-outside-toplevel
  from tools import benchlib  # pylint: disable=import-outside-toplevel

  cfg = models.get_preset(_MODEL.value)
  params = models.init(jax.random.key(0), cfg)
  shape = (_BATCH.value, _SEQ_LEN.value)
  tokens = jax.random.randint(jax.random.key(1), shape, 0, cfg.vocab_size)

  def loss(p, t):
    logits, _ = models.forward(p, t, cfg)
    return models.masked_ce_sum(logits, t, jnp.ones(t.shape)) / t.size

  grad = jax.value_and_grad(loss)
  one = jax.devices()[0]
  mesh = parallel.make_mesh({"seq": _SEQ.value})
  split = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(None, "seq")
  )
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  runs = {
    "1 device": (jax.jit(grad), jax.device_put((params, tokens), one)),
    f"seq={_SEQ.value}": (
      jax.jit(parallel.traced_on(mesh, grad)),
      (jax.device_put(params, whole), jax.device_put(tokens, split)),
    ),
  }
  rows = []
  for name, (fn, args) in runs.items():
    compiled = fn.lower(*args).compile()
    memory = compiled.memory_analysis().temp_size_in_bytes
    seconds = benchlib.time_fn(compiled, *args, repeats=_TIMED.value)
    rows.append(
      {"run": name, "step s": seconds, "temp MiB/device": memory / 2**20}
    )
    print(rows[-1], flush=True)
  rows[1]["step ratio"] = rows[1]["step s"] / rows[0]["step s"]
  rows[0]["step ratio"] = 1.0
  print(
    f"{_MODEL.value}, T={_SEQ_LEN.value}, batch {_BATCH.value}, "
    f"forward + backward"
  )
  print(benchlib.markdown_table(rows))


if __name__ == "__main__":
  app.run(main)
