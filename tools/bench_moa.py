"""Benchmark: MoA block-sparse attention vs dense blocked attention.

Times forward and forward+backward of `moa_attention(impl="blocked")` at
several densities against `attention(impl="blocked")` (dense causal) in the
same run, and the dense kernel's GFLOP/s against a matmul of the same run.

  PYTHONPATH=. python tools/bench_moa.py --seq=4096 --heads=8 --dim=64
"""

from collections.abc import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from lightning_jax import ops
from tools import benchlib

_SEQ = flags.DEFINE_integer("seq", 4096, "Sequence length.")
_HEADS = flags.DEFINE_integer("heads", 8, "Heads (q and kv).")
_DIM = flags.DEFINE_integer("dim", 64, "Head dimension.")
_BLOCK = flags.DEFINE_integer("block_size", 64, "Kernel block size.")
_DENSITIES = flags.DEFINE_list("densities", ["1", "0.5", "0.25", "0.125"],
                               "Target densities of the MoA rows.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per figure.")


def window_for_density(density: float, seq: int) -> int:
  """Smallest window whose causal density reaches `density` (no sink)."""
  lo, hi = 1, seq
  while lo < hi:
    mid = (lo + hi) // 2
    if ops.moa_density([mid], seq)[0] >= density:
      hi = mid
    else:
      lo = mid + 1
  return lo


def _fwd_and_fwd_bwd(fn, q, k, v):
  fwd = jax.jit(fn)
  dout = jnp.ones_like(q)
  fwd_bwd = jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v)[1](dout))
  return fwd, fwd_bwd


def run(seq: int = 4096, heads: int = 8, dim: int = 64, *,
        block_size: int = 64, densities: Sequence[float] = (1.0, 0.5, 0.25,
                                                             0.125),
        repeats: int = 3, batch: int = 1) -> list[dict]:
  """Benchmark rows (fp32): the dense blocked kernel, then MoA per density.

  Args:
    seq: sequence length.
    heads: query (= kv) heads.
    dim: head dimension.
    block_size: block size of both kernels.
    densities: target fractions of the causal pairs kept (all heads share
      the window meeting the target).
    repeats: timed calls (median).
    batch: batch size.

  Returns:
    Dicts with the impl, density, window, median milliseconds of forward and
    forward+backward, their ratio to dense, and for the dense row its useful
    GFLOP/s (4 D flops per causal pair forward, 2.5x that backward) and that
    as a fraction of the same run's matmul GFLOP/s.

  Example:
    >>> rows = run(seq=512, heads=2, dim=32, densities=(0.5,))
  """
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (batch, seq, heads, dim)) for key in keys)
  pairs = batch * heads * seq * (seq + 1) / 2
  fwd_flops, fwd_bwd_flops = 4 * dim * pairs, 3.5 * 4 * dim * pairs
  matmul = benchlib.matmul_gflops()

  def measure(fn):
    fwd, fwd_bwd = _fwd_and_fwd_bwd(fn, q, k, v)
    return (benchlib.time_fn(fwd, q, k, v, repeats=repeats),
            benchlib.time_fn(fwd_bwd, q, k, v, repeats=repeats))

  dense_fwd, dense_fwd_bwd = measure(
      lambda q, k, v: ops.attention(q, k, v, block_size=block_size))
  rows = [dict(impl="attention blocked (dense)", density=1.0, window=seq,
               fwd_ms=1e3 * dense_fwd, fwd_bwd_ms=1e3 * dense_fwd_bwd,
               fwd_vs_dense=1.0, fwd_bwd_vs_dense=1.0,
               fwd_gflops=fwd_flops / dense_fwd / 1e9,
               fwd_bwd_gflops=fwd_bwd_flops / dense_fwd_bwd / 1e9,
               matmul_gflops=matmul)]
  for density in densities:
    window = window_for_density(density, seq)
    fwd, fwd_bwd = measure(
        lambda q, k, v, w=window: ops.moa_attention(
            q, k, v, [w] * heads, block_size=block_size))
    rows.append(dict(impl="moa_attention blocked",
                     density=float(ops.moa_density([window], seq)[0]),
                     window=window, fwd_ms=1e3 * fwd, fwd_bwd_ms=1e3 * fwd_bwd,
                     fwd_vs_dense=fwd / dense_fwd,
                     fwd_bwd_vs_dense=fwd_bwd / dense_fwd_bwd,
                     fwd_gflops=float("nan"), fwd_bwd_gflops=float("nan"),
                     matmul_gflops=matmul))
  return rows


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  densities = [float(d) for d in _DENSITIES.value]
  if not all(0.0 < d <= 1.0 for d in densities):
    raise app.UsageError(f"--densities must lie in (0, 1], got {densities}.")
  for flag in (_SEQ, _HEADS, _DIM, _BLOCK, _REPEATS):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name} must be >= 1, got {flag.value}.")
  rows = run(_SEQ.value, _HEADS.value, _DIM.value, block_size=_BLOCK.value,
             densities=densities, repeats=_REPEATS.value)
  print(benchlib.markdown_table(rows))
  dense = rows[0]
  print(f"\ndense blocked: {dense['fwd_gflops'] / dense['matmul_gflops']:.0%} "
        f"(fwd), {dense['fwd_bwd_gflops'] / dense['matmul_gflops']:.0%} "
        f"(fwd+bwd) of matmul GFLOP/s on {jax.devices()[0].device_kind}.")


if __name__ == "__main__":
  app.run(main)
