"""Timing helpers shared by the benchmark binaries (tools/bench*.py).

Figures are meant to be read as ratios measured in one run (against a matmul
of the same machine, or against a reference impl), since machines are noisy.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lightning_jax import models


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_fn(
  fn, *args, repeats: int = 5, warmup: int = 1, clock: str = "wall"
) -> float:
  """Median seconds of `fn(*args)` (already compiled by warm-up).

  Args:
    fn: a jitted function.
    *args: its arguments.
    repeats: timed calls; the median is returned.
    warmup: untimed calls first (compilation happens here).
    clock: "wall" (wall-clock seconds) or "cpu" (this process's CPU seconds,
      all threads: on a machine shared with other jobs it counts the work
      done rather than the waits for a core; read it as a ratio).

  Returns:
    Median seconds per call, after `jax.block_until_ready` of the output.
  """
  now = CLOCKS[clock]
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = now()
    jax.block_until_ready(fn(*args))
    times.append(now() - start)
  return float(np.median(times))


def matmul_gflops(
  n: int = 1024, dtype=jnp.float32, repeats: int = 5, clock: str = "wall"
) -> float:
  """GFLOP/s of an `[n, n] @ [n, n]` matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  seconds = time_fn(jax.jit(jnp.matmul), a, b, repeats=repeats, clock=clock)
  return 2 * n**3 / seconds / 1e9


def markdown_table(rows: list[dict]) -> str:
  """Renders a list of same-keyed dicts as a GitHub markdown table."""
  if not rows:
    return ""
  keys = list(rows[0])
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def _loss(params, tokens_BxT, cfg):
  logits, _ = models.forward(params, tokens_BxT[:, :-1], cfg)
  logp = jax.nn.log_softmax(logits, -1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], -1))


def train_step_fn(cfg, optimizer):
  """A jitted `(params, opt_state, tokens [B, T + 1]) -> (params, opt_state,
  loss)`: forward, backward and the optimiser update, using only
  `models.forward` (so any version of the library can be timed)."""

  @jax.jit
  def step(params, opt_state, tokens_BxT):
    loss, grads = jax.value_and_grad(_loss)(params, tokens_BxT, cfg)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step
