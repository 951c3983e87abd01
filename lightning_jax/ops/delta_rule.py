"""DeltaNet and gated DeltaNet: the (gated) delta rule, chunked in WY/UT form.

Per batch and head, state `S_t: [key_dim, value_dim]`, a_t = exp(g_t):

    S_t = a_t S_{t-1} + k_t (beta_t (v_t - a_t S_{t-1}^T k_t))^T,
    o_t = scale * S_t^T q_t.

Without `log_decay` (a_t = 1) this is DeltaNet (Schlag et al., 2021; chunked
by Yang et al., 2024, arXiv 2406.06484); with it, Gated DeltaNet (Yang et al.,
2024, arXiv 2412.06464). The op does not normalise q or k (the layer does).

Chunked form: in a chunk with cumulated log decay b_i (relative to the chunk
start), Gamma_ij = exp(b_i - b_j) and gamma_i = exp(b_i), the pseudo-values
`U' = T V - T (gamma * K) S` with the UT transform
`T = (I + tril(diag(beta) (Gamma * K K^T), -1))^{-1} diag(beta)` give

    O = (gamma * Q) S + (Q K^T * Gamma * M) U',
    S_next = gamma_C S + (K * exp(b_C - b))^T U'.

`T` is computed with matmuls only (`unit_lower_inverse`). See
docs/linear_attention.md for the derivation.
"""

import math

import jax.numpy as jnp

from lightning_jax import _checks
from lightning_jax.ops import _recurrence as rec

IMPLS = ("chunked", "recurrent")
_BASE_BLOCK = 16


def delta_rule(
  q,
  k,
  v,
  beta,
  log_decay=None,
  *,
  scale=None,
  initial_state=None,
  output_final_state=False,
  chunk_size=64,
  impl="chunked",
):
  """The delta rule (DeltaNet), gated when `log_decay` is given.

  Args:
    q: `[batch, seq, heads, key_dim]`.
    k: `[batch, seq, heads, key_dim]`; usually L2-normalised by the layer
      (the recurrence is contractive when `beta * |k|^2 <= 2`).
    v: `[batch, seq, heads, value_dim]`.
    beta: `[batch, seq, heads]` writing strengths (e.g. a sigmoid).
    log_decay: None, `[heads]` or `[batch, seq, heads]`, all <= 0: log of the
      gate a_t of Gated DeltaNet; -inf (a_t = 0) resets the state.
    scale: multiplies q; default `key_dim ** -0.5`.
    initial_state: `[batch, heads, key_dim, value_dim]` or None (zeros).
    output_final_state: also return the fp32 final state.
    chunk_size: tokens per chunk of the chunked impl (any seq length works).
    impl: "chunked" (WY/UT form) or "recurrent" (a scan over time).

  Returns:
    `o: [batch, seq, heads, value_dim]` in q's dtype (and the final state).
    A NaN / inf in k, v, beta or the gate at position t makes outputs NaN
    from t on, never before t.

  Raises:
    ValueError: naming the argument, on shape / rank mismatch, a positive
      (concrete) log decay, a bad chunk size or an unknown impl.

  Example:
    >>> q = k = v = jnp.ones((1, 10, 2, 4))
    >>> delta_rule(q, k, v, jnp.full((1, 10, 2), 0.5)).shape
    (1, 10, 2, 4)
  """
  b, t, h, dk, dv = rec.check_qkv(q, k, v)
  _checks.check_shape("beta", beta, (b, t, h), "[batch, seq, heads]")
  g = rec.scalar_log_decay(log_decay, b, t, h)
  chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
  _checks.check_choice("impl", impl, IMPLS)
  s0 = rec.check_state(initial_state, b, h, dk, dv)
  qf = q.astype(jnp.float32) * rec.default_scale(scale, dk)
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  beta = jnp.asarray(beta, jnp.float32)
  if impl == "recurrent":
    o, state = _recurrent(qf, kf, vf, beta, g, s0)
    return rec.finish(o, state, q.dtype, output_final_state)
  kf, vf, beta, g, first_bad = rec.drop_nonfinite(kf, vf, beta, g)
  o, state, _ = rec.scan_groups(
    lambda *xs: _chunked(*xs, chunk_size),
    (qf, kf, vf, beta, g),
    s0,
    rec.GROUP_CHUNKS * chunk_size,
  )
  o, state = rec.poison(o, state, first_bad)
  return rec.finish(o, state, q.dtype, output_final_state)


def unit_lower_inverse(lower):
  """Inverse of unit lower-triangular matrices, with matmuls only.

  Diagonal blocks of 16 are inverted by the nilpotent product
  `(I + N)^{-1} = (I - N)(I + N^2)(I + N^4)...`, then neighbouring blocks are
  merged, `[[A, 0], [C, D]]^{-1} = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]`, all
  blocks of a level in one batched matmul.

  Args:
    lower: `[..., n, n]`, ones on the diagonal, zeros above (not checked).

  Returns:
    `[..., n, n]`, the inverse.
  """
  *lead, n, _ = lower.shape
  if n <= _BASE_BLOCK:
    return _nilpotent_inverse(lower)
  size = _BASE_BLOCK * 2 ** math.ceil(math.log2(n / _BASE_BLOCK))
  if size > n:  # blockdiag(L, I)^{-1} = blockdiag(L^{-1}, I)
    pad = [(0, 0)] * len(lead) + [(0, size - n)] * 2
    fill = jnp.arange(n, size)
    lower = jnp.pad(lower, pad).at[..., fill, fill].set(1.0)
  m = _BASE_BLOCK
  inv = _nilpotent_inverse(_blocks(lower, m, 0))  # [..., size / m, m, m]
  while inv.shape[-3] > 1:
    a_inv, d_inv = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
    c = -(d_inv @ _blocks(lower, m, 1) @ a_inv)
    top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], -1)
    inv = jnp.concatenate([top, jnp.concatenate([c, d_inv], -1)], -2)
    m *= 2
  return inv[..., 0, :n, :n]


def _blocks(x, m, offset):
  """`m x m` blocks (i + offset, i) of `[..., n, n]`, stacked on axis -3.

  offset 0: all n / m diagonal blocks. offset 1: for even i only, the n / 2m
  lower-left blocks of the pairs being merged. Static slices, not `diagonal`
  + transpose, which XLA:CPU 0.10 mis-simplifies into batched dots.
  """
  n = x.shape[-1]
  starts = range(0, n // m, 2) if offset else range(n // m)
  return jnp.stack(
    [
      x[..., (i + offset) * m : (i + offset + 1) * m, i * m : (i + 1) * m]
      for i in starts
    ],
    axis=-3,
  )


def _nilpotent_inverse(lower):
  n = lower.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(n, dtype=lower.dtype), lower.shape)
  power = lower - eye  # N, strictly lower: N^n = 0
  inv = eye - power
  for _ in range(max(math.ceil(math.log2(n)) - 1, 0)):
    power = power @ power
    inv = inv + inv @ power
  return inv


def _chunked(q, k, v, beta, g, s0, chunk):
  t = q.shape[1]
  qc, kc, vc = (rec.to_chunks(x, chunk) for x in (q, k, v))  # [B, H, N, C, D]
  beta_c, g_c = (rec.to_chunks(x[..., None], chunk)[..., 0] for x in (beta, g))
  cum = jnp.cumsum(g_c, axis=-1)  # [B, H, N, C]
  last = cum[..., -1]  # [B, H, N]
  diff = cum[..., :, None] - cum[..., None, :]
  decay = jnp.exp(jnp.where(rec.causal_mask(chunk), diff, -jnp.inf))  # Gamma*M

  ut = _ut_transform(kc, beta_c, decay)
  w = ut @ (kc * jnp.exp(cum)[..., None])  # [B, H, N, C, Dk]
  u = ut @ vc  # [B, H, N, C, Dv]
  k_tail = kc * jnp.exp(last[..., None] - cum)[..., None]

  def step(s, inputs):
    w_n, u_n, k_n, a_n = inputs
    pseudo = u_n - w_n @ s  # U' = U - W S: [B, H, C, Dv]
    s_next = a_n[..., None, None] * s + jnp.einsum(
      "bhcd,bhcv->bhdv", k_n, pseudo
    )
    return s_next, (s, pseudo)

  to_scan = lambda x: jnp.moveaxis(x, 2, 0)
  final, (starts, pseudo) = rec.scan(
    step, s0, (to_scan(w), to_scan(u), to_scan(k_tail), to_scan(jnp.exp(last)))
  )
  starts, pseudo = jnp.moveaxis(starts, 0, 2), jnp.moveaxis(pseudo, 0, 2)
  qk = jnp.einsum("bhncd,bhnsd->bhncs", qc, kc) * decay
  o = (qc * jnp.exp(cum)[..., None]) @ starts + qk @ pseudo
  return rec.from_chunks(o, t), final


def _ut_transform(k, beta, decay):
  """`T = (I + tril(diag(beta) (Gamma * K K^T), -1))^{-1} diag(beta)`.

  Args:
    k: `[..., C, Dk]` keys of each chunk.
    beta: `[..., C]`.
    decay: `[..., C, C]`, Gamma masked to j <= i.

  Returns:
    `[..., C, C]`.
  """
  c = k.shape[-2]
  kk = (k @ k.swapaxes(-1, -2)) * decay
  lower = jnp.where(rec.causal_mask(c, strict=True), beta[..., None] * kk, 0.0)
  inv = unit_lower_inverse(jnp.where(jnp.eye(c, dtype=bool), 1.0, lower))
  return inv * beta[..., None, :]


def _recurrent(q, k, v, beta, g, s0):

  def step(s, inputs):
    # With a = exp(g_t) and u = beta_t (v_t - a S^T k_t):
    #   S_t = a S + k_t u^T,   o_t = S_t^T q_t = a S^T q_t + (q_t . k_t) u,
    # so one batched matvec of the old state gives both S^T k_t and S^T q_t
    # and the state is read once and written once per token (decoding).
    q_t, k_t, v_t, beta_t, g_t = inputs
    a = jnp.exp(g_t)[..., None]  # [B, H, 1]
    skq = jnp.einsum("bhdv,bhcd->bhcv", s, jnp.stack([k_t, q_t], axis=2))
    sk, sq = skq[:, :, 0], skq[:, :, 1]
    u = beta_t[..., None] * (v_t - a * sk)
    o = a * sq + jnp.sum(q_t * k_t, axis=-1, keepdims=True) * u
    return a[..., None] * s + k_t[..., None] * u[..., None, :], o

  final, o = rec.scan(
    step, s0, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, g))
  )
  return jnp.moveaxis(o, 0, 1), final
