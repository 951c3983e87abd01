"""Benchmark: MoA block-sparse attention vs dense blocked attention.

Times forward and forward+backward of `moa_attention(impl="blocked")` at
several densities against `attention(impl="blocked")` (dense causal) in the
same run, and the dense kernel's GFLOP/s against a matmul of the same run.

  python -m tools.bench_moa --seq=4096 --heads=8 --dim=64

`python -m tools.bench --suite=moa` runs the same `run` from the main
benchmark binary (this module's flags exist only when it is the program).
"""

from collections.abc import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import ops
from tools import benchlib


def _define_flags():
  flags.DEFINE_integer("seq", 4096, "Sequence length.")
  flags.DEFINE_integer("heads", 8, "Heads (q and kv).")
  flags.DEFINE_integer("dim", 64, "Head dimension.")
  flags.DEFINE_integer("block_size", 64, "Kernel block size.")
  flags.DEFINE_list(
    "densities",
    ["1", "0.5", "0.25", "0.125"],
    "Target densities of the MoA rows.",
  )
  flags.DEFINE_integer("repeats", 15, "Timing rounds.")


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


def _fwd_and_fwd_bwd(fn, dout):
  fwd = jax.jit(fn)
  fwd_bwd = jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v)[1](dout))
  return fwd, fwd_bwd


def run(
  seq: int = 4096,
  heads: int = 8,
  dim: int = 64,
  *,
  block_size: int = 64,
  densities: Sequence[float] = (1.0, 0.5, 0.25, 0.125),
  repeats: int = 15,
  batch: int = 1,
) -> list[dict]:
  """Benchmark rows (fp32): the dense blocked kernel, then MoA per density.

  Every program is compiled first; then `repeats` rounds time each program
  once, in turn. Each figure is the best (minimum) time over the rounds, as
  `timeit` advises: on a shared or virtual machine the noise only ever adds
  time (two consecutive calls differ by up to 2x here), so the minimum is
  the stable estimate of a program's own cost, and ratios are of minima.

  Args:
    seq: sequence length.
    heads: query (= kv) heads.
    dim: head dimension.
    block_size: block size of both kernels.
    densities: target fractions of the causal pairs kept (all heads share
      the window meeting the target).
    repeats: timing rounds.
    batch: batch size.

  Returns:
    Same-keyed dicts, dense row first: impl, density, window, best
    milliseconds of forward and forward+backward, their ratio to dense, the
    useful GFLOP/s (4 D flops per kept pair forward, 2.5x that backward; the
    recomputation not counted) and that as a fraction of the best matmul
    GFLOP/s of the same rounds.

  Example:
    >>> rows = run(seq=512, heads=2, dim=32, densities=(0.5,))
  """
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (batch, seq, heads, dim)) for key in keys)
  dout = jnp.ones_like(q)
  windows = [seq] + [window_for_density(d, seq) for d in densities]
  fns = [lambda q, k, v: ops.attention(q, k, v, block_size=block_size)]
  fns += [
    lambda q, k, v, w=w: ops.moa_attention(
      q, k, v, [w] * heads, block_size=block_size
    )
    for w in windows[1:]
  ]
  programs = [p for fn in fns for p in _fwd_and_fwd_bwd(fn, dout)]
  for program in programs:  # compile
    jax.block_until_ready(program(q, k, v))
  rounds = []
  for _ in range(repeats):
    times = [
      benchlib.time_fn(p, q, k, v, repeats=1, warmup=0) for p in programs
    ]
    rounds.append((benchlib.matmul_gflops(repeats=1), np.array(times)))
  matmul = np.array([m for m, _ in rounds])
  times = np.stack([t for _, t in rounds]).reshape(repeats, len(fns), 2)
  best = times.min(0)  # [programs, 2]
  matmul_best = float(matmul.max())
  pairs = batch * heads * seq * (seq + 1) / 2
  unit_flops = np.array([4 * dim * pairs, 3.5 * 4 * dim * pairs])  # fwd, +bwd
  rows = []
  for i, window in enumerate(windows):
    density = float(ops.moa_density([window], seq)[0])
    gflops = density * unit_flops / best[i] / 1e9  # [2]
    rows.append(
      dict(
        impl="attention blocked (dense)" if i == 0 else "moa_attention",
        density=density,
        window=window,
        fwd_ms=1e3 * float(best[i, 0]),
        fwd_bwd_ms=1e3 * float(best[i, 1]),
        fwd_vs_dense=float(best[i, 0] / best[0, 0]),
        fwd_bwd_vs_dense=float(best[i, 1] / best[0, 1]),
        fwd_gflops=float(gflops[0]),
        fwd_bwd_gflops=float(gflops[1]),
        fwd_of_matmul=float(gflops[0] / matmul_best),
        fwd_bwd_of_matmul=float(gflops[1] / matmul_best),
        matmul_gflops=matmul_best,
      )
    )
  return rows


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  densities = [float(d) for d in fl.densities]
  if not all(0.0 < d <= 1.0 for d in densities):
    raise app.UsageError(f"--densities must lie in (0, 1], got {densities}.")
  for name in ("seq", "heads", "dim", "block_size", "repeats"):
    if fl[name].value < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {fl[name].value}.")
  rows = run(
    fl.seq,
    fl.heads,
    fl.dim,
    block_size=fl.block_size,
    densities=densities,
    repeats=fl.repeats,
  )
  print(benchlib.markdown_table(rows))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
