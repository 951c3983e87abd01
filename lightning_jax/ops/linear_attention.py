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

import functools
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
    o, state = _chunked_scan(qf, kf, vf, g, s0, chunk_size)
  else:
    o, state = _quadratic(qf, kf, vf, g, s0)
  o, state = rec.poison(o, state, first_bad)
  return rec.finish(o, state, q.dtype, output_final_state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked_scan(q, k, v, g, s0, chunk):
  """The chunked form over groups of chunks: `(o, final state)`.

  Its backward pass is written by hand (`_chunked_scan_bwd`): a reverse scan
  over the groups that recomputes each group's intra-chunk blocks from the
  inputs and the state at the group start, which are the only residuals.
  """
  return _chunked_scan_fwd(q, k, v, g, s0, chunk)[0]


def _chunked_scan_fwd(q, k, v, g, s0, chunk):
  t = q.shape[1]
  grouped = rec.to_groups((q, k, v, g), rec.GROUP_CHUNKS * chunk)
  o, final, starts = rec.scan_groups(
    lambda *xs: _chunked(*xs, chunk), grouped, s0, None
  )
  return (rec.from_groups(o, t), final), (grouped, starts, final, s0)


def _chunked_scan_bwd(chunk, residuals, cotangents):
  """Gradients of `(o, final)` w.r.t. `(q, k, v, g, s0)`.

  q, k, v and the initial state by the transposed chunk recurrence, one
  group at a time from the last. For the log decays, with
  B_t = sum_{s<=t} g_s, the output and the final state depend on B only
  through `q_t e^{B_t}`, `k_t e^{-B_t}` and `e^{B_T}` (GLA, Yang et al.,
  2024, Sec. 4.2), so

      dL/dB_t = q_t * dq_t - k_t * dk_t + [t = T] rowsum(dS_T * S_T),
      dL/dg_t = sum_{tau >= t} dL/dB_tau     (a reverse cumulative sum),

  summed over the key dim for a scalar decay; the sum over later groups is
  carried with the state's cotangent.
  """
  grouped, starts, final, s0 = residuals
  do, d_final = cotangents
  t = do.shape[1]
  (do_grouped,) = rec.to_groups((do,), grouped[0].shape[2])
  d_later = jnp.sum(d_final * final, -1)  # [B, H, Dk]
  if grouped[3].shape[-1] == 1:
    d_later = jnp.sum(d_later, -1, keepdims=True)

  def step(carry, xs):
    d_end, d_later = carry
    q, k, v, g, do, start = xs
    (dq, dk, dv), d_start = _chunked_grads(q, k, v, g, do, start, d_end, chunk)
    d_cum = q * dq - k * dk  # [B, G, H, Dk]
    if g.shape[-1] == 1:
      d_cum = jnp.sum(d_cum, -1, keepdims=True)
    dg = jnp.flip(jnp.cumsum(jnp.flip(d_cum, 1), 1), 1) + d_later[:, None]
    return (d_start, dg[:, 0]), (dq, dk, dv, dg)

  (d_s0, _), grads = rec.scan(
    step, (d_final, d_later), (*grouped, do_grouped, starts), reverse=True
  )
  grads = (*(rec.from_groups(x, t) for x in grads), d_s0)
  # Only the inputs' manual-axis types matter: grouped inputs carry them.
  return tuple(map(rec.cotangent_like, grads, (*grouped, s0)))


_chunked_scan.defvjp(_chunked_scan_fwd, _chunked_scan_bwd)


def _chunk_decays(gc):
  """Cumulated log decays `b` (relative to each chunk start) and the last."""
  cum = jnp.cumsum(gc, axis=3)  # [B, H, N, C, Dg]
  return cum, cum[:, :, :, -1]


def _chunked(q, k, v, g, s0, chunk):
  t = q.shape[1]
  qc, kc, vc, gc = (rec.to_chunks(x, chunk) for x in (q, k, v, g))
  cum, last = _chunk_decays(gc)
  scores = _intra_scores(qc, kc, cum)
  o = jnp.einsum("bhncs,bhnsv->bhncv", scores, vc)
  k_tail = kc * jnp.exp(last[:, :, :, None] - cum)
  increments = jnp.einsum("bhncd,bhncv->bhndv", k_tail, vc)
  final, starts = rec.chunk_states(last, increments, s0)
  o = o + jnp.einsum("bhncd,bhndv->bhncv", qc * jnp.exp(cum), starts)
  return rec.from_chunks(o, t), final


def _chunked_grads(q, k, v, g, do, s0, d_final, chunk):
  """One group's `(dq, dk, dv)` and the cotangent of its start state.

  The cotangents of the states after each chunk, `H_n = dS_{n+1}`, follow
  the transposed recurrence `H_{n-1} = diag(a_n) H_n + (q e^b)_n^T do_n`,
  run backwards by `rec.chunk_states` on the chunks in reverse order.
  """
  t = q.shape[1]
  qc, kc, vc, gc, doc = (rec.to_chunks(x, chunk) for x in (q, k, v, g, do))
  cum, last = _chunk_decays(gc)
  tail = jnp.exp(last[:, :, :, None] - cum)
  k_tail = kc * tail
  increments = jnp.einsum("bhncd,bhncv->bhndv", k_tail, vc)
  _, starts = rec.chunk_states(last, increments, s0)
  head = jnp.exp(cum)
  local = jnp.einsum("bhncd,bhncv->bhndv", qc * head, doc)
  flip = lambda x: jnp.flip(x, 2)
  d_s0, d_after = rec.chunk_states(flip(last), flip(local), d_final)
  d_after = flip(d_after)  # [B, H, N, Dk, Dv]: cotangent after chunk n

  d_scores = jnp.einsum("bhncv,bhnsv->bhncs", doc, vc)
  scores, dq_intra, dk_intra = _intra_vjp(qc, kc, cum, d_scores)
  dq = dq_intra + jnp.einsum("bhncv,bhndv->bhncd", doc, starts) * head
  dk = dk_intra + jnp.einsum("bhncv,bhndv->bhncd", vc, d_after) * tail
  dv = jnp.einsum("bhncs,bhncv->bhnsv", scores, doc) + jnp.einsum(
    "bhncd,bhndv->bhncv", k_tail, d_after
  )
  grads = tuple(rec.from_chunks(x, t) for x in (dq, dk, dv))
  return grads, d_s0


def _intra_scores(q, k, cum):
  """Masked intra-chunk scores `[..., C, C]`, scalar or per-key decay."""
  if cum.shape[-1] == 1:
    return jnp.einsum("...cd,...sd->...cs", q, k) * _scalar_decay(cum)
  shape, c = q.shape, q.shape[-2]
  q, k, cum = (rec.drop_unit_axes(x, 3) for x in (q, k, cum))
  scores = _vector_intra_scores(q, k, _vector_factors(cum, _sub_block(c)))
  return scores.reshape(*shape[:-1], c)


def _intra_vjp(q, k, cum, d_scores):
  """`_intra_scores(q, k, cum)` and its `(dq, dk)` for the cotangent
  `d_scores`, the decays computed once."""
  if cum.shape[-1] == 1:
    weighted = d_scores * _scalar_decay(cum)
    dq, dk = weighted @ k, weighted.swapaxes(-1, -2) @ q
    return _intra_scores(q, k, cum), dq, dk
  shape, c = q.shape, q.shape[-2]
  q, k, cum, d_scores = (
    rec.drop_unit_axes(x, 3) for x in (q, k, cum, d_scores)
  )
  factors = _vector_factors(cum, _sub_block(c))
  scores = _vector_intra_scores(q, k, factors)
  dq, dk = _vector_intra_grads(d_scores, q, k, factors)
  return scores.reshape(*shape[:-1], c), dq.reshape(shape), dk.reshape(shape)


def _sub_block(chunk: int) -> int:
  return math.gcd(chunk, _SUB_BLOCK)


def _scalar_decay(cum):
  """Masked `exp(b_i - b_j)`, j <= i: `[..., C, C]` from `cum: [..., C, 1]`."""
  c = cum.shape[-2]
  diff = cum[..., :, 0, None] - cum[..., None, :, 0]
  return jnp.exp(jnp.where(rec.causal_mask(c), diff, -jnp.inf))


def _vector_factors(cum, sub):
  """Decay factors of `_vector_intra_scores` for `cum: [..., C, Dk]`.

  Returns:
    `diag: [..., N s, sub, sub, Dk]`, the exact masked decays inside each
    diagonal sub-block (the sub-block axis folded into the chunk axis: a
    size-1 axis here makes XLA:CPU 0.10 segfault in a backward pass);
    `q_scale, k_scale: [..., s, sub, Dk]`, `exp(b_i - r_I)` and
    `exp(e_J - b_j)`; `bridge: [..., s_I, C, Dk]`, `exp(r_I - e_J)` for
    J < I (else 0) repeated over J's tokens (a broadcast over a new sub axis
    instead makes XLA:CPU 0.10 segfault in the backward pass).
  """
  *lead, c, dk = cum.shape
  s = c // sub
  bd = cum.reshape(*lead[:-1], lead[-1] * s, sub, dk)
  diff = bd[..., :, None, :] - bd[..., None, :, :]
  diag = jnp.exp(jnp.where(rec.causal_mask(sub)[..., None], diff, -jnp.inf))
  bs = cum.reshape(*lead, s, sub, dk)
  end = cum[..., sub - 1 :: sub, :]  # e_J: [..., s, Dk]
  start = jnp.concatenate([cum[..., :1, :], end[..., :-1, :]], -2)  # r_I
  bridge = jnp.exp(
    jnp.where(
      rec.causal_mask(s, strict=True)[..., None],
      start[..., :, None, :] - end[..., None, :, :],
      -jnp.inf,
    )
  )
  return (
    diag,
    jnp.exp(bs - start[..., :, None, :]),
    jnp.exp(end[..., :, None, :] - bs),
    jnp.repeat(bridge, sub, axis=-2),
  )


def _vector_intra_scores(q, k, factors):
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
  diag_decay, q_scale, k_scale, bridge = factors
  sub = diag_decay.shape[-2]
  s = c // sub
  fold = lambda x: x.reshape(*lead[:-1], lead[-1] * s, sub, dk)
  qd, kd = fold(q), fold(k)
  diag = jnp.sum(qd[..., :, None, :] * kd[..., None, :, :] * diag_decay, -1)
  if s == 1:  # no off-diagonal blocks
    return diag.reshape(*lead, c, c)
  diag = diag.reshape(*lead, s, sub, sub)
  blocks = lambda x: x.reshape(*lead, s, sub, dk)
  q_off = blocks(q) * q_scale
  k_off = (blocks(k) * k_scale).reshape(*lead, 1, c, dk) * bridge
  off = (q_off @ k_off.swapaxes(-1, -2)).reshape(*lead, s, sub, s, sub)
  on_diag = jnp.eye(s, dtype=bool)[:, None, :, None]
  return jnp.where(on_diag, diag[..., :, :, None, :], off).reshape(*lead, c, c)


def _vector_intra_grads(d_scores, q, k, factors):
  """`(dq, dk)` of `_vector_intra_scores` for the cotangent `d_scores`.

  Off-diagonal blocks are zero in the factors themselves (bridge 0 for
  J >= I, exact decays masked), so the full `d_scores` can be used.
  """
  *lead, c, dk = q.shape
  diag_decay, q_scale, k_scale, bridge = factors
  sub = diag_decay.shape[-2]
  s = c // sub
  fold = lambda x: x.reshape(*lead[:-1], lead[-1] * s, sub, dk)
  d_blocks = d_scores.reshape(*lead, s, sub, s, sub)
  eye = jnp.eye(s).reshape((1,) * len(lead) + (s, 1, s, 1))
  d_diag = jnp.sum(d_blocks * eye, -2)
  d_diag = d_diag.reshape(*lead[:-1], lead[-1] * s, sub, sub)
  weighted = d_diag[..., None] * diag_decay  # [..., N s, sub, sub, Dk]
  dq = jnp.sum(weighted * fold(k)[..., None, :, :], -2)
  dk_ = jnp.sum(weighted * fold(q)[..., :, None, :], -3)
  dq, dk_ = dq.reshape(*lead, c, dk), dk_.reshape(*lead, c, dk)
  if s == 1:
    return dq, dk_
  blocks = lambda x: x.reshape(*lead, s, sub, dk)
  rows = d_scores.reshape(*lead, s, sub, c)  # sub-block I's rows
  k_end = (blocks(k) * k_scale).reshape(*lead, 1, c, dk)
  dq_off = (rows @ (k_end * bridge)) * q_scale  # [..., s, sub, Dk]
  dk_end = jnp.sum((rows.swapaxes(-1, -2) @ (blocks(q) * q_scale)) * bridge, -3)
  dk_off = blocks(dk_end) * k_scale
  return dq + dq_off.reshape(*lead, c, dk), dk_ + dk_off.reshape(*lead, c, dk)


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
