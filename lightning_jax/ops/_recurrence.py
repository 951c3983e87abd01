"""Plumbing shared by the linear-recurrence kernels: checks, chunking, output.

Internal layout of the chunked kernels is `[batch, heads, chunks, chunk, dim]`
(`BxHxNxCxD`): the heads and chunks become batch dimensions of every matmul.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks


def check_qkv(q, k, v) -> tuple[int, int, int, int, int]:
  """Checks `q, k: [B, T, H, Dk]`, `v: [B, T, H, Dv]`; returns the sizes."""
  _checks.check_rank("q", q, 4, "[batch, seq, heads, key_dim]")
  _checks.check_rank("k", k, 4, "[batch, seq, heads, key_dim]")
  _checks.check_rank("v", v, 4, "[batch, seq, heads, value_dim]")
  b, t, h, dk = q.shape
  _checks.check_shape("k", k, q.shape, "[batch, seq, heads, key_dim]")
  _checks.check_shape("v", v, (b, t, h, v.shape[-1]),
                      "[batch, seq, heads, value_dim]")
  return b, t, h, dk, v.shape[-1]


def check_state(initial_state, b, h, dk, dv):
  """Checks `initial_state: [B, H, Dk, Dv]` (or None); returns it in fp32."""
  if initial_state is None:
    return jnp.zeros((b, h, dk, dv), jnp.float32)
  _checks.check_shape("initial_state", initial_state, (b, h, dk, dv),
                      "[batch, heads, key_dim, value_dim]")
  return jnp.asarray(initial_state, jnp.float32)


def check_nonpositive(name: str, x) -> None:
  """Raises ValueError if a concrete `x` has a positive or NaN entry.

  Traced values (inside `jit`) cannot be inspected and pass unchecked.
  """
  try:
    values = np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return
  if np.isnan(values).any() or (values > 0).any():
    raise ValueError(f"`{name}` must be <= 0 (a log decay), got max "
                     f"{np.nanmax(values) if not np.isnan(values).all() else 'nan'}"
                     f" and {int(np.isnan(values).sum())} NaN entries.")


def default_scale(scale, dk: int) -> float:
  return dk**-0.5 if scale is None else scale


def to_chunks(x, chunk: int):
  """`[B, T, H, ...]` -> `[B, H, N, C, ...]`, zero-padding T up to N * C."""
  b, t, h = x.shape[:3]
  n = -(-t // chunk)
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, n * chunk - t)
  x = jnp.pad(x, pad)
  x = x.reshape(b, n, chunk, h, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def from_chunks(x, t: int):
  """`[B, H, N, C, D]` -> `[B, T, H, D]`, dropping padding."""
  b, h, n, c, d = x.shape
  return jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, d)[:, :t]


def finish(o, state, dtype, output_final_state: bool):
  """Casts `o` to the input dtype; appends the fp32 final state if asked."""
  o = o.astype(dtype)
  return (o, state) if output_final_state else o


def causal_mask(c: int, strict: bool = False):
  """`[C, C]` bool: row i sees column j iff j <= i (j < i if strict)."""
  return jnp.tril(jnp.ones((c, c), bool), -1 if strict else 0)


def scan_chunk_states(decay_BxHxNxDg, increments_BxHxNxDkxDv, state_BxHxDkxDv):
  """State at the start of every chunk of S_n = diag(a_n) S_{n-1} + U_n.

  Args:
    decay_BxHxNxDg: a_n, the chunk's total decay over key dims (Dg is 1 or Dk).
    increments_BxHxNxDkxDv: U_n, the chunk's own decayed k v^T sum.
    state_BxHxDkxDv: the state before the first chunk.

  Returns:
    (final state `[B, H, Dk, Dv]`, states at chunk starts `[B, H, N, Dk, Dv]`).
  """
  def step(s, inputs):
    a, u = inputs
    return a[..., None] * s + u, s

  final, starts = jax.lax.scan(
      step, state_BxHxDkxDv,
      (jnp.moveaxis(decay_BxHxNxDg, 2, 0), jnp.moveaxis(increments_BxHxNxDkxDv, 2, 0)))
  return final, jnp.moveaxis(starts, 0, 2)
