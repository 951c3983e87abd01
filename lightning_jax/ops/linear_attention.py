"""Linear attention with scalar or per-key-dim decay (Lightning Attention, GLA).

Recurrence, for state `S_t: [key_dim, value_dim]` per batch and head:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t

with `g_t <= 0` a log decay that is a scalar per head (`linear_attention`:
TransNormerLLM / Lightning Attention, RetNet, or a data-dependent scalar gate)
or a vector over key dims (`gated_linear_attention`: GLA, HGRN2).

The chunked impl is Lightning Attention-2 (Qin et al., 2024, arXiv 2401.04658)
generalised to gates as in GLA (Yang et al., 2024, arXiv 2312.06635): within a
chunk of C tokens the decays are cumulated *relative to the chunk start* only
(never over the whole sequence) and the causal intra-chunk part is a masked
C x C attention; chunks talk to each other through the states at chunk starts,
which are the only states kept (`[T / C, Dk, Dv]` per head, also in backward)
and are computed by one small matmul over the chunks of a group of 8 chunks;
a scan over groups carries the state (flat time per token at any length).
For vector gates the intra-chunk decay `exp(b_i - b_j)` is factored through a
reference point between sub-blocks of 8 tokens so that every exponent is
<= 0, and the diagonal sub-blocks are exact in log space: the kernel stays
finite for any decay strength (e.g. log_forget = -20 on a whole chunk).
See docs/linear_attention.md for the derivation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax.ops import _recurrence as rec

IMPLS = ("chunked", "recurrent", "quadratic")
_SUB_BLOCK = 8


def tnl_log_decay(layer_idx: int, num_layers: int, num_heads: int) -> jax.Array:
  """Per-head log decays of TransNormerLLM / Lightning Attention for a layer.

  Head h decays by `exp(-s_h * (1 - l / (L - 1) + 1e-5))` per step, with `s_h`
  the ALiBi slopes (Press et al., 2022): `2^(-8 (h+1) / H)` for a power-of-two
  H, interleaved from 2H for other H. Early layers forget fast, the last layer
  barely decays (TransNormerLLM, Qin et al., 2023, arXiv 2307.14995).

  Args:
    layer_idx: 0-based layer index l.
    num_layers: number of layers L.
    num_heads: number of heads H.

  Returns:
    `[num_heads]` float32 log decays (all < 0), to pass as `log_decay`.

  Example:
    >>> tnl_log_decay(0, 4, 8).shape
    (8,)
  """
  num_layers = _checks.check_positive_int("num_layers", num_layers)
  num_heads = _checks.check_positive_int("num_heads", num_heads)
  if not 0 <= layer_idx < num_layers:
    raise ValueError(
      f"`layer_idx` must be in [0, {num_layers}), got {layer_idx}."
    )
  depth = 1.0 if num_layers == 1 else 1 - layer_idx / (num_layers - 1)
  return jnp.asarray(-_alibi_slopes(num_heads) * (depth + 1e-5), jnp.float32)


def _alibi_slopes(n: int) -> np.ndarray:
  def power_of_two(m):
    return 2.0 ** (-8.0 * np.arange(1, m + 1) / m)

  closest = 2 ** math.floor(math.log2(n))
  extra = power_of_two(2 * closest)[0::2][: n - closest]
  return np.concatenate([power_of_two(closest), extra])


def linear_attention(
  q,
  k,
  v,
  log_decay=None,
  *,
  scale=None,
  initial_state=None,
  output_final_state=False,
  chunk_size=64,
  impl="chunked",
):
  """Causal linear attention with an optional scalar decay per head.

  `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`.

  Args:
    q: `[batch, seq, heads, key_dim]`.
    k: `[batch, seq, heads, key_dim]`.
    v: `[batch, seq, heads, value_dim]`.
    log_decay: g, all <= 0: None (no decay), `[heads]` (a constant per head,
      e.g. `tnl_log_decay(...)`), or `[batch, seq, heads]` (a data-dependent
      scalar gate). -inf (decay 0) resets the state, in every impl.
    scale: multiplies q; default `key_dim ** -0.5`.
    initial_state: `[batch, heads, key_dim, value_dim]` or None (zeros).
    output_final_state: also return the fp32 final state.
    chunk_size: tokens per chunk of the chunked impl (any seq length works).
    impl: "chunked" (Lightning Attention-2), "recurrent" (a scan over time) or
      "quadratic" (masked seq x seq reference).

  Returns:
    `o: [batch, seq, heads, value_dim]` in q's dtype, and with
    `output_final_state` the tuple `(o, final_state)`. A NaN / inf in k, v
    or g at position t makes outputs NaN from t on (as the recurrence does),
    never before t (docs/linear_attention.md).

  Raises:
    ValueError: naming the argument, on shape / rank mismatch, a positive
      (concrete) log decay, a bad chunk size or an unknown impl.

  Example:
    >>> q = k = v = jnp.ones((1, 10, 2, 4))
    >>> linear_attention(q, k, v, tnl_log_decay(0, 2, 2)).shape
    (1, 10, 2, 4)
  """
  b, t, h, dk, _ = rec.check_qkv(q, k, v)
  g = rec.scalar_log_decay(log_decay, b, t, h)
  return _gated(
    q,
    k,
    v,
    g[..., None],
    scale,
    initial_state,
    output_final_state,
    chunk_size,
    impl,
  )


def gated_linear_attention(
  q,
  k,
  v,
  log_forget,
  *,
  scale=None,
  initial_state=None,
  output_final_state=False,
  chunk_size=64,
  impl="chunked",
):
  """Gated linear attention (GLA / HGRN2): a decay per key dim.

  `S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`.
  HGRN2 (Qin et al., 2024, arXiv 2404.07904) is this op with
  `k = 1 - exp(log_forget)`.

  Args:
    q: `[batch, seq, heads, key_dim]`.
    k: `[batch, seq, heads, key_dim]`.
    v: `[batch, seq, heads, value_dim]`.
    log_forget: g, `[batch, seq, heads, key_dim]`, all <= 0 (e.g.
      `jax.nn.log_sigmoid(x)`); any magnitude is handled stably, -inf
      included (decay 0).
    scale: multiplies q; default `key_dim ** -0.5`.
    initial_state: `[batch, heads, key_dim, value_dim]` or None (zeros).
    output_final_state: also return the fp32 final state.
    chunk_size: tokens per chunk of the chunked impl.
    impl: "chunked", "recurrent" or "quadratic".

  Returns:
    `o: [batch, seq, heads, value_dim]` in q's dtype (and the final state).

  Raises:
    ValueError: naming the argument, as for `linear_attention`.
  """
  rec.check_qkv(q, k, v)
  _checks.check_shape(
    "log_forget", log_forget, q.shape, "[batch, seq, heads, key_dim]"
  )
  rec.check_nonpositive("log_forget", log_forget)
  return _gated(
    q,
    k,
    v,
    rec.floor_log_decay(log_forget),
    scale,
    initial_state,
    output_final_state,
    chunk_size,
    impl,
  )


def _gated(
  q, k, v, g, scale, initial_state, output_final_state, chunk_size, impl
):
  """Shared entry: g is `[B, T, H, Dg]` with Dg = 1 (scalar) or Dk."""
  b, t, h, dk, dv = rec.check_qkv(q, k, v)
  chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
  _checks.check_choice("impl", impl, IMPLS)
  s0 = rec.check_state(initial_state, b, h, dk, dv)
  qf = q.astype(jnp.float32) * rec.default_scale(scale, dk)
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  if impl == "recurrent":
    o, state = _recurrent(qf, kf, vf, g, s0)
    return rec.finish(o, state, q.dtype, output_final_state)
  kf, vf, g, first_bad = rec.drop_nonfinite(kf, vf, g)
  if impl == "chunked":
    o, state = rec.scan_groups(
      lambda *xs: _chunked(*xs, chunk_size),
      (qf, kf, vf, g),
      s0,
      rec.GROUP_CHUNKS * chunk_size,
    )
  else:
    o, state = _quadratic(qf, kf, vf, g, s0)
  o, state = rec.poison(o, state, first_bad)
  return rec.finish(o, state, q.dtype, output_final_state)


def _chunked(q, k, v, g, s0, chunk):
  t = q.shape[1]
  qc, kc, vc, gc = (rec.to_chunks(x, chunk) for x in (q, k, v, g))
  cum = jnp.cumsum(gc, axis=3)  # [B, H, N, C, Dg], relative to chunk start
  last = cum[:, :, :, -1]  # [B, H, N, Dg]
  if gc.shape[-1] == 1:
    scores = _scalar_intra_scores(qc, kc, cum[..., 0])
  else:
    scores = _vector_intra_scores(qc, kc, cum, math.gcd(chunk, _SUB_BLOCK))
  o = jnp.einsum("bhncs,bhnsv->bhncv", scores, vc)
  k_tail = kc * jnp.exp(last[:, :, :, None] - cum)
  increments = jnp.einsum("bhncd,bhncv->bhndv", k_tail, vc)
  final, starts = rec.chunk_states(last, increments, s0)
  o = o + jnp.einsum("bhncd,bhndv->bhncv", qc * jnp.exp(cum), starts)
  return rec.from_chunks(o, t), final


def _scalar_intra_scores(q, k, cum):
  """Masked `(q_i . k_j) exp(b_i - b_j)`, j <= i: `[..., C, C]`."""
  c = q.shape[-2]
  diff = cum[..., :, None] - cum[..., None, :]
  decay = jnp.exp(jnp.where(rec.causal_mask(c), diff, -jnp.inf))
  return jnp.einsum("...cd,...sd->...cs", q, k) * decay


def _vector_intra_scores(q, k, cum, sub):
  """Masked `sum_d q_id k_jd exp(b_id - b_jd)`, j <= i: `[..., C, C]`.

  Off-diagonal sub-blocks factor the decay through r_I, the cumulated decay
  just before sub-block I, and e_J, the one at the end of sub-block J < I:
  `exp(b_i - r_I) * exp(r_I - e_J) * exp(e_J - b_j)`, each factor <= 1, so
  a whole sub-block row is one matmul, no exponent is positive and only
  `O(C Dk)` exponentials per chunk are taken (the middle factor is per pair
  of sub-blocks). Diagonal sub-blocks use the exact `[sub, sub, Dk]`
  log-space decay.
  """
  *lead, c, dk = q.shape
  s = c // sub
  # Diagonal blocks, with the sub-block axis folded into the chunk axis (a
  # size-1 axis here makes XLA:CPU 0.10 segfault in the backward pass).
  fold = lambda x: x.reshape(*lead[:-1], lead[-1] * s, sub, dk)
  qd, kd, bd = fold(q), fold(k), fold(cum)
  diff = bd[..., :, None, :] - bd[..., None, :, :]  # [..., N s, sub, sub, Dk]
  decay = jnp.exp(jnp.where(rec.causal_mask(sub)[..., None], diff, -jnp.inf))
  diag = jnp.sum(qd[..., :, None, :] * kd[..., None, :, :] * decay, -1)
  if s == 1:  # no off-diagonal blocks
    return diag.reshape(*lead, c, c)
  diag = diag.reshape(*lead, s, sub, sub)

  blocks = lambda x: x.reshape(*lead, s, sub, dk)
  qs, ks, bs = blocks(q), blocks(k), blocks(cum)
  end = cum[..., sub - 1 :: sub, :]  # e_J: [..., s, Dk]
  start = jnp.concatenate([cum[..., :1, :], end[..., :-1, :]], -2)  # r_I
  q_off = qs * jnp.exp(bs - start[..., :, None, :])  # [..., s, sub, Dk]
  k_end = ks * jnp.exp(end[..., :, None, :] - bs)  # [..., s, sub, Dk]
  bridge = jnp.exp(
    jnp.where(
      rec.causal_mask(s, strict=True)[..., None],
      start[..., :, None, :] - end[..., None, :, :],
      -jnp.inf,
    )
  )  # [..., s_I, s_J, Dk]: exp(r_I - e_J) for J < I, else 0
  # The bridge repeated over J's tokens (a broadcast over a new sub axis
  # instead makes XLA:CPU 0.10 segfault in the backward pass).
  k_off = k_end.reshape(*lead, 1, c, dk) * jnp.repeat(bridge, sub, axis=-2)
  off = (q_off @ k_off.swapaxes(-1, -2)).reshape(*lead, s, sub, s, sub)
  on_diag = jnp.eye(s, dtype=bool)[:, None, :, None]
  return jnp.where(on_diag, diag[..., :, :, None, :], off).reshape(*lead, c, c)


def _recurrent(q, k, v, g, s0):
  def step(s, inputs):
    q_t, k_t, v_t, g_t = inputs  # [B, H, D]
    s = jnp.exp(g_t)[..., None] * s + k_t[..., None] * v_t[..., None, :]
    return s, jnp.einsum("bhd,bhdv->bhv", q_t, s)

  final, o = rec.scan(
    step, s0, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g))
  )
  return jnp.moveaxis(o, 0, 1), final


def _quadratic(q, k, v, g, s0):
  """Masked `[T, T]` reference; decays from a global cumsum (short T only)."""
  t = q.shape[1]
  cum = jnp.cumsum(g, axis=1)  # [B, T, H, Dg]
  diff = cum[:, :, None] - cum[:, None, :]  # [B, T_i, T_j, H, Dg]
  mask = rec.causal_mask(t)[None, :, :, None, None]
  decay = jnp.broadcast_to(
    jnp.exp(jnp.where(mask, diff, -jnp.inf)), (*diff.shape[:-1], q.shape[-1])
  )
  scores = jnp.einsum("bihd,bjhd,bijhd->bhij", q, k, decay)
  o = jnp.einsum("bhij,bjhv->bihv", scores, v)
  o = o + jnp.einsum("bihd,bhdv->bihv", q * jnp.exp(cum), s0)
  last = cum[:, -1]  # [B, H, Dg]
  final = jnp.exp(last)[..., None] * s0 + jnp.einsum(
    "bjhd,bjhv->bhdv", k * jnp.exp(last[:, None] - cum), v
  )
  return o, final
