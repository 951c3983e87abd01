"""Sequence parallelism in the model: time, memory and communication.

A training step here is one forward + backward of a model preset on
`--seq_len` tokens, on one device or on a mesh `seq=P` of fake CPU devices
(the layers split the work, see docs/parallel.md). Memory figures come from
the compiled step's `memory_analysis()` (per device; nothing is run),
communication from the collectives in its optimised HLO. `--report`:

- `step`: median step time on one device and on `seq=--seq`, their ratio,
  and the temp memory per device.
- `memory`: temp and argument + output memory per device on
  `seq=1, 2, 4, ...` up to `--seq`.
- `comm`: for a one-layer model of each mixer kind (the preset's sizes),
  the bytes each device receives per step on `seq=--seq` through the
  sequence-parallel collectives, at each of `--seq_lens`.
- `longest`: for each of `--models` and each `seq=P`, the longest
  power-of-two T (from 1024) whose step fits `--budget_mib` per device.

  python -m tools.bench_seqpar --report=step --model=deltanet \\
    --seq_len=16384 --seq=8
  python -m tools.bench_seqpar --report=comm --seq_lens=4096,8192
"""

from collections.abc import Sequence
import os
import re

from absl import app
from absl import flags

REPORTS = ("step", "memory", "comm", "longest")
# One-layer models for `comm`: every registered mixer but MoA (it needs a
# plan; its halo is a `collective-permute` like the convs') and the
# attention experts (softmax attention's gathers, per expert).
_COMM_SKIPPED = ("moa", "attention_experts")
# Bytes a device receives, from a collective's per-device result bytes and
# the axis size P: an all-gather receives P - 1 of its P pieces, a
# reduce-scatter P - 1 pieces of its result's size, a permute its result.
RECEIVED = {
  "all-gather": lambda size, p: size * (p - 1) / p,
  "reduce-scatter": lambda size, p: size * (p - 1),
  "collective-permute": lambda size, p: size,
}
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}

_REPORT = flags.DEFINE_enum("report", "step", REPORTS, "What to measure.")
_MODEL = flags.DEFINE_string("model", "tiny-hybrid", "Model preset.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 16384, "Tokens per sequence T.")
_SEQ = flags.DEFINE_integer("seq", 8, "Devices P of the seq axis (largest).")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per step.")
_TIMED = flags.DEFINE_integer("timed_steps", 3, "Timed steps (median).")
_SEQ_LENS = flags.DEFINE_list(
  "seq_lens", ["4096", "8192"], "`comm`: sequence lengths."
)
_MODELS = flags.DEFINE_list(
  "models", ["deltanet", "tiny-hybrid"], "`longest`: model presets."
)
_BUDGET = flags.DEFINE_float(
  "budget_mib", 512.0, "`longest`: memory per device (temp + args + out)."
)
_MAX_SEQ_LEN = flags.DEFINE_integer(
  "max_seq_len", 2**17, "`longest`: the largest T tried."
)


def _validate() -> None:
  """One `error:` line (app.UsageError) for bad flags, before compiling."""
  p = _SEQ.value
  if p < 1 or p & (p - 1):
    raise app.UsageError(f"--seq must be a power of two >= 1, got {p}.")
  lens = [_SEQ_LEN.value] if _REPORT.value != "comm" else _SEQ_LENS.value
  for t in lens:
    if not str(t).isdigit() or int(t) % p:
      raise app.UsageError(
        f"sequence length {t} must be a positive multiple of --seq={p}."
      )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _validate()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_num_cpu_devices", _SEQ.value)
  from tools import benchlib  # pylint: disable=import-outside-toplevel

  rows, title = {
    "step": _step_report,
    "memory": _memory_report,
    "comm": _comm_report,
    "longest": _longest_report,
  }[_REPORT.value]()
  print(title)
  print(benchlib.markdown_table(rows))


def _step(cfg, seq_len: int, p: int, concrete: bool = False):
  """`(compiled forward + backward, its args)` on `seq=p` (p = 1: one
  device); the args are ShapeDtypeStructs unless `concrete`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from lightning_jax import models  # pylint: disable=import-outside-toplevel
  from lightning_jax import parallel  # pylint: disable=import-outside-toplevel

  def loss(params, tokens):
    logits, _ = models.forward(params, tokens, cfg)
    ones = jnp.ones(tokens.shape)
    return models.masked_ce_sum(logits, tokens, ones) / tokens.size

  mesh = parallel.make_mesh({"seq": p}, devices=jax.devices()[:p])
  shardings = (
    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "seq")),
  )
  init = lambda: models.init(jax.random.key(0), cfg)
  shape = (_BATCH.value, seq_len)
  if concrete:
    tokens = jax.random.randint(jax.random.key(1), shape, 0, cfg.vocab_size)
    args = jax.device_put((init(), tokens), shardings)
  else:
    args = tuple(
      jax.tree.map(
        lambda x, s=s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), a
      )
      for a, s in zip(
        (jax.eval_shape(init), jax.ShapeDtypeStruct(shape, jnp.int32)),
        shardings,
        strict=True,
      )
    )
  grad = jax.value_and_grad(loss)
  fn = jax.jit(grad if p == 1 else parallel.traced_on(mesh, grad))
  return fn.lower(*args).compile(), args


def _mib(compiled) -> dict:
  m = compiled.memory_analysis()
  total = m.temp_size_in_bytes + m.argument_size_in_bytes
  total += m.output_size_in_bytes
  return {
    "temp MiB/device": m.temp_size_in_bytes / 2**20,
    "total MiB/device": total / 2**20,
  }


def _step_report():
  from lightning_jax import models  # pylint: disable=import-outside-toplevel
  from tools import benchlib  # pylint: disable=import-outside-toplevel

  cfg = models.get_preset(_MODEL.value)
  rows = []
  for p in (1, _SEQ.value):
    compiled, args = _step(cfg, _SEQ_LEN.value, p, concrete=True)
    seconds = benchlib.time_fn(compiled, *args, repeats=_TIMED.value)
    name = "1 device" if p == 1 else f"seq={p}"
    rows.append({"run": name, "step s": seconds, **_mib(compiled)})
    rows[-1]["step ratio"] = seconds / rows[0]["step s"]
    print(rows[-1], flush=True)
  return rows, (
    f"{_MODEL.value}, T={_SEQ_LEN.value}, batch {_BATCH.value}, "
    "forward + backward"
  )


def _seq_sizes():
  return [2**i for i in range(_SEQ.value.bit_length())]


def _memory_report():
  from lightning_jax import models  # pylint: disable=import-outside-toplevel

  cfg = models.get_preset(_MODEL.value)
  rows = []
  for p in _seq_sizes():
    rows.append({"seq": p, **_mib(_step(cfg, _SEQ_LEN.value, p)[0])})
    rows[-1]["temp x seq=1"] = (
      rows[-1]["temp MiB/device"] / rows[0]["temp MiB/device"]
    )
    print(rows[-1], flush=True)
  return rows, (
    f"{_MODEL.value}, T={_SEQ_LEN.value}, batch {_BATCH.value}, "
    "forward + backward, compiled memory per device"
  )


def collective_bytes(hlo_text: str, p: int) -> dict[str, float]:
  """Bytes a device receives per kind of sequence-parallel collective in an
  optimised HLO module (`RECEIVED`), plus `all-reduce` result bytes (the
  replicated weights' gradient sums, as in data parallelism)."""
  pattern = re.compile(
    r"^\s*%\S+ = (.*?) "
    r"(all-gather|reduce-scatter|collective-permute|all-reduce)(-start)?\(",
    re.MULTILINE,
  )
  out = dict.fromkeys((*RECEIVED, "all-reduce"), 0.0)
  for shapes, kind, _ in pattern.findall(hlo_text):
    size = sum(
      DTYPE_BYTES[dtype] * _prod(dims)
      for dtype, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", shapes)
    )
    out[kind] += RECEIVED[kind](size, p) if kind in RECEIVED else size
  return out


def _prod(dims: str) -> int:
  n = 1
  for d in filter(None, dims.split(",")):
    n *= int(d)
  return n


def _comm_report():
  from lightning_jax import models  # pylint: disable=import-outside-toplevel
  from lightning_jax.layers import mixers  # pylint: disable=import-outside-toplevel

  p = _SEQ.value
  rows = []
  for kind in (k for k in mixers.kinds() if k not in _COMM_SKIPPED):
    cfg = models.get_preset(_MODEL.value, pattern=(kind,), num_layers=1)
    for t in map(int, _SEQ_LENS.value):
      hlo = _step(cfg, t, p)[0].as_text()
      got = collective_bytes(hlo, p)
      kib = {k: v / 2**10 for k, v in got.items()}
      sp = sum(kib[k] for k in RECEIVED)
      rows.append(
        {"mixer": kind, "T": t, **{f"{k} KiB": v for k, v in kib.items()}}
      )
      rows[-1]["sequence-parallel KiB"] = sp
      print(rows[-1], flush=True)
  return rows, (
    f"one {_MODEL.value}-sized layer, seq={p}, batch {_BATCH.value}, "
    "forward + backward: KiB each device receives"
  )


def _longest_report():
  from lightning_jax import models  # pylint: disable=import-outside-toplevel

  rows = []
  for name in _MODELS.value:
    cfg = models.get_preset(name)
    row, t = {"model": name}, None
    for p in _seq_sizes():
      # Memory per device only falls with P at a given T: start from the
      # longest T of P / 2.
      fits = max(p, 1024) if t is None else t
      while fits <= _MAX_SEQ_LEN.value:
        used = _mib(_step(cfg, fits, p)[0])["total MiB/device"]
        print(f"{name} seq={p} T={fits}: {used:.0f} MiB", flush=True)
        if used > _BUDGET.value:
          break
        t, fits = fits, 2 * fits
      row[f"seq={p}"] = t if t is not None else "-"
    rows.append(row)
  return rows, (
    f"longest power-of-two T with forward + backward <= {_BUDGET.value:g} "
    f"MiB per device (batch {_BATCH.value}, compiled memory)"
  )


if __name__ == "__main__":
  app.run(main)
