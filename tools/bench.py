r"""Kernel benchmark: tokens/s, GFLOP/s and peak memory of the recurrence ops.

Every figure is also given as a fraction of the GFLOP/s of a plain fp32
`[n, n] @ [n, n]` matmul measured in the same run, so results from a noisy
machine can still be compared. FLOPs are those of each impl's own algorithm
(see `flops_per_token`); forward+backward counts 3x the forward FLOPs.

Usage (from the repository root):
  python -m tools.bench                       # kernels: docs/benchmarks.md
  python -m tools.bench --suite=moa           # MoA vs dense attention
  python -m tools.bench --sweep= --dtypes=float32 --ops=delta_rule
"""

import math
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from lightning_jax import ops
from tools import bench_moa
from tools import benchlib

OPS = ("linear_attention", "gated_linear_attention", "delta_rule")
SUITES = ("kernels", "moa")

_SUITE = flags.DEFINE_list(
  "suite",
  ["kernels"],
  f"Suites to run, among {SUITES}"
  ": the recurrence kernels; MoA attention at densities "
  "1, 1/2, 1/4, 1/8 vs dense (seq --moa_seq).",
)
_MOA_SEQ = flags.DEFINE_integer(
  "moa_seq", 4096, "Sequence length of --suite=moa."
)

_OPS = flags.DEFINE_list("ops", list(OPS), f"Ops to time, among {OPS}.")
_IMPLS = flags.DEFINE_list("impls", ["chunked", "recurrent"], "Impls to time.")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 8, "Heads.")
_DIM = flags.DEFINE_integer("dim", 64, "key_dim = value_dim.")
_SEQ = flags.DEFINE_integer("seq", 2048, "Sequence length of the main table.")
_SWEEP = flags.DEFINE_list(
  "sweep",
  ["512", "1024", "2048", "4096", "8192"],
  "Sequence lengths of the per-token sweep (fwd, "
  "chunked and recurrent, first dtype).",
)
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Input dtypes.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk size of chunked impls.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (median).")
_MEMORY_SEQ = flags.DEFINE_integer(
  "memory_seq",
  8192,
  "Sequence length of the compiled peak-memory table (fwd+bwd); 0 skips it.",
)
_MATMUL_N = flags.DEFINE_integer("matmul_n", 1024, "Size of the ref matmul.")
_CLOCK = flags.DEFINE_enum(
  "clock",
  "wall",
  list(benchlib.CLOCKS),
  "wall, or cpu: process CPU seconds (on a loaded machine; ratios only).",
)


def flops_per_token(op: str, impl: str, c: int, dk: int, dv: int) -> float:
  """Forward FLOPs per token and head of `op`'s `impl` (matmuls only).

  Chunked linear / gated: intra scores `2C Dk`, scores @ V `2C Dv`, chunk
  state increment `2 Dk Dv`, inter-chunk readout `2 Dk Dv`. Chunked delta
  rule: `K K^T`, `T K`, `Q K^T` (`2C Dk` each), `T V`, `A U'` (`2C Dv` each),
  `W S`, `K^T U'`, `Q S` (`2 Dk Dv` each), plus the blocked UT inverse.
  Recurrent: outer-product update and readout (`2 Dk Dv` each; the delta rule
  adds the `S^T k` prediction).
  """
  if impl == "recurrent":
    return (6 if op == "delta_rule" else 4) * dk * dv
  if op != "delta_rule":
    return 2 * c * (dk + dv) + 4 * dk * dv
  return 6 * c * dk + 4 * c * dv + 6 * dk * dv + _inverse_flops(c) / c


def _inverse_flops(c: int) -> float:
  """Matmul FLOPs of `ops.unit_lower_inverse` on one `[c, c]` matrix."""
  base = 16
  if c <= base:
    return max(math.ceil(math.log2(max(c, 1))) - 1, 0) * 2 * 2 * c**3
  size = base * 2 ** math.ceil(math.log2(c / base))
  total = (size // base) * 3 * 2 * 2 * base**3  # squarings + products
  m = base
  while m < size:
    total += (size // (2 * m)) * 2 * 2 * m**3  # -D^-1 C A^-1
    m *= 2
  return total


def make_inputs(op, b, t, h, d, dtype):
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (b, t, h, d), dtype)
  k = jax.random.normal(keys[1], (b, t, h, d), jnp.float32)
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, h, d), dtype)
  if op == "linear_attention":
    gate = jax.nn.log_sigmoid(jax.random.normal(keys[3], (b, t, h)) + 4)
    return (q, k, v, gate)
  if op == "gated_linear_attention":
    return (
      q,
      k,
      v,
      jax.nn.log_sigmoid(jax.random.normal(keys[3], q.shape) + 4),
    )
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (b, t, h)))
  gate = jax.nn.log_sigmoid(jax.random.normal(keys[3], (b, t, h)) + 4)
  return (q, k, v, beta, gate)


def op_functions(op, impl, chunk):
  """Jitted forward and forward+backward (grads w.r.t. every input)."""
  fn = getattr(ops, op)
  fwd = lambda *args: fn(*args, impl=impl, chunk_size=chunk)
  loss = lambda *args: jnp.sum(fwd(*args).astype(jnp.float32))
  n_args = 5 if op == "delta_rule" else 4
  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=tuple(range(n_args))))


def time_row(op, impl, mode, dtype, t, peak):
  b, h, d, c = _BATCH.value, _HEADS.value, _DIM.value, _CHUNK.value
  args = make_inputs(op, b, t, h, d, jnp.dtype(dtype))
  fwd, fwd_bwd = op_functions(op, impl, c)
  seconds = benchlib.time_fn(
    fwd if mode == "fwd" else fwd_bwd,
    *args,
    repeats=_REPEATS.value,
    clock=_CLOCK.value,
  )
  tokens = b * t
  flops = (
    b * t * h * flops_per_token(op, impl, c, d, d) * (1 if mode == "fwd" else 3)
  )
  gflops = flops / seconds / 1e9
  return dict(
    op=op,
    impl=impl,
    mode=mode,
    dtype=dtype,
    seq=t,
    ms=seconds * 1e3,
    us_per_token=seconds / tokens * 1e6,
    tokens_per_s=tokens / seconds,
    gflops=gflops,
    pct_of_matmul=100 * gflops / peak,
  )


def memory_row(op, impl, t):
  b, h, d, c = _BATCH.value, _HEADS.value, _DIM.value, _CHUNK.value
  shapes = [
    jax.ShapeDtypeStruct(x.shape, x.dtype)
    for x in jax.eval_shape(lambda: make_inputs(op, b, t, h, d, jnp.float32))
  ]
  _, fwd_bwd = op_functions(op, impl, c)
  stats = fwd_bwd.lower(*shapes).compile().memory_analysis()
  return dict(
    op=op,
    impl=impl,
    seq=t,
    temp_mib=stats.temp_size_in_bytes / 2**20,
    per_step_states_mib=b * t * h * d * d * 4 / 2**20,
  )


def kernels_suite():
  peak = benchlib.matmul_gflops(_MATMUL_N.value, clock=_CLOCK.value)
  n = _MATMUL_N.value
  print(
    f"# devices: {jax.devices()}; reference fp32 matmul {n}x{n}x{n}: "
    f"{peak:.1f} GFLOP/s\n"
  )
  print(
    f"## batch {_BATCH.value}, heads {_HEADS.value}, dim {_DIM.value}, "
    f"seq {_SEQ.value}, chunk {_CHUNK.value}\n"
  )
  rows = [
    time_row(op, impl, mode, dtype, _SEQ.value, peak)
    for op in _OPS.value
    for dtype in _DTYPES.value
    for impl in _IMPLS.value
    for mode in ("fwd", "fwd+bwd")
  ]
  print(benchlib.markdown_table(rows), "\n", flush=True)
  if _SWEEP.value:
    print(f"## sequence sweep (fwd, {_DTYPES.value[0]}): time per token\n")
    rows = [
      time_row(op, impl, "fwd", _DTYPES.value[0], int(t), peak)
      for op in _OPS.value
      for impl in _IMPLS.value
      for t in _SWEEP.value
    ]
    print(benchlib.markdown_table(rows), "\n", flush=True)
  if _MEMORY_SEQ.value:
    print(f"## compiled fwd+bwd temp memory at seq {_MEMORY_SEQ.value}\n")
    rows = [
      memory_row(op, impl, _MEMORY_SEQ.value)
      for op in _OPS.value
      for impl in _IMPLS.value
    ]
    print(benchlib.markdown_table(rows), flush=True)


def main(argv):
  del argv
  for name, values, allowed in (
    ("suite", _SUITE.value, SUITES),
    ("ops", _OPS.value, OPS),
  ):
    unknown = [v for v in values if v not in allowed]
    if unknown:
      sys.exit(f"--{name}: unknown {unknown}; expected some of {allowed}.")
  if "kernels" in _SUITE.value:
    kernels_suite()
  if "moa" in _SUITE.value:
    print(
      f"## MoA attention, seq {_MOA_SEQ.value}, heads {_HEADS.value}, "
      f"dim {_DIM.value}, fp32\n"
    )
    rows = bench_moa.run(
      _MOA_SEQ.value, _HEADS.value, _DIM.value, repeats=_REPEATS.value
    )
    print(benchlib.markdown_table(rows), flush=True)


if __name__ == "__main__":
  app.run(main)
