"""Softmax attention with grouped-query heads: blocked (flash) and reference.

softmax(q k^T * scale + mask) v (Vaswani et al., 2017), computed in query
tiles with a recomputing backward pass (Dao et al., 2022, FlashAttention) in
`lightning_jax/ops/_blocked.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax.ops import _blocked

IMPLS = ("blocked", "reference")


def check_qkv(q, k, v) -> int:
  """Validates `[batch, seq, heads, dim]` q/k/v; returns q heads per kv head.

  Raises:
    ValueError: on a wrong rank, mismatched batch/length/dims, or q heads not
      divisible by kv heads.
  """
  layout = "[batch, seq, heads, head_dim]"
  for name, x in (("q", q), ("k", k), ("v", v)):
    _checks.check_rank(name, x, 4, layout)
  batch, _, heads, dim = q.shape
  _checks.check_shape(
    "k",
    k,
    (batch, k.shape[1], k.shape[2], dim),
    "[batch, seq_k, kv_heads, head_dim of q]",
  )
  _checks.check_shape(
    "v",
    v,
    (batch, k.shape[1], k.shape[2], v.shape[3]),
    "[batch, seq_k, kv_heads of k, value_dim]",
  )
  if heads % k.shape[2]:
    raise ValueError(
      f"`k` heads ({k.shape[2]}) must divide the q heads ({heads})."
    )
  return heads // k.shape[2]


def take_heads(x_BxTxHxD, heads) -> jax.Array:
  """`x[:, :, heads]` for a concrete index array; no gather (and no copy)
  when `heads` is the identity."""
  heads = np.asarray(heads)
  if np.array_equal(heads, np.arange(x_BxTxHxD.shape[2])):
    return x_BxTxHxD
  return jnp.take(x_BxTxHxD, heads, axis=2)


def causal_mask(seq_q: int, seq_k: int) -> jax.Array:
  """[seq_q, seq_k] bool: query t (at t + seq_k - seq_q) sees s <= it."""
  t = jnp.arange(seq_q)[:, None] + (seq_k - seq_q)
  return jnp.arange(seq_k)[None, :] <= t


def attention_weights(q, k, mask_HxTxS=None, *, scale=None) -> jax.Array:
  """Softmax attention probabilities, fp32 `[batch, heads, seq_q, seq_k]`.

  Rows whose keys are all masked are all zero.

  Args:
    q: `[batch, seq_q, heads, dim]`.
    k: `[batch, seq_k, kv_heads, dim]`, kv_heads dividing heads.
    mask_HxTxS: optional bool, broadcastable to `[heads, seq_q, seq_k]`.
    scale: score scale, default `dim ** -0.5`.

  Returns:
    The probabilities A, fp32.

  Example:
    >>> a = attention_weights(q, k, causal_mask(8, 8))
  """
  group = q.shape[2] // k.shape[2]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  k = jnp.repeat(k.astype(jnp.float32), group, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32) * scale, k)
  if mask_HxTxS is None:
    return jax.nn.softmax(s, axis=-1)
  s = jnp.where(mask_HxTxS[None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m))
  z = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(z == 0.0, 1.0, z)


def weighted_values(a_BxHxTxS, v):
  """`A @ v`, GQA values `[batch, seq_k, kv_heads, dv]` -> `[B, T, H, dv]`."""
  group = a_BxHxTxS.shape[1] // v.shape[2]
  v = jnp.repeat(v.astype(jnp.float32), group, axis=2)
  return jnp.einsum("bhts,bshd->bthd", a_BxHxTxS, v)


def masked_attention(q, k, v, mask_HxTxS, *, scale=None):
  """Reference attention under an explicit mask: `attention_weights @ v`.

  Returns `[batch, seq_q, heads, value_dim]` in q's dtype.
  """
  a = attention_weights(q, k, mask_HxTxS, scale=scale)
  return weighted_values(a, v).astype(q.dtype)


def attention(
  q,
  k,
  v,
  *,
  causal: bool = True,
  scale=None,
  block_size: int = 64,
  impl: str = "blocked",
):
  """Softmax attention with grouped-query (GQA) heads.

  With `causal`, query t sits at absolute position t + seq_k - seq_q
  (bottom-right alignment, as when the keys hold a cache before the queries)
  and sees keys s <= that position. Queries that see no key return zeros.
  Scores, softmax and accumulation are fp32; the output has q's dtype.

  Args:
    q: `[batch, seq_q, heads, dim]`.
    k: `[batch, seq_k, kv_heads, dim]`; kv_heads must divide heads (query head
      h uses kv head h // (heads // kv_heads)).
    v: `[batch, seq_k, kv_heads, value_dim]`.
    causal: mask future keys.
    scale: score scale, default `dim ** -0.5`.
    block_size: smallest query chunk of the "blocked" impl; chunks grow to
      4 `block_size` (memory O(seq * 4 block_size) per head).
    impl: "blocked" (query tiles, recomputing backward) or
      "reference" (materialises the `[seq_q, seq_k]` scores).

  Returns:
    `[batch, seq_q, heads, value_dim]`.

  Raises:
    ValueError: on bad shapes, `impl` or `block_size`.

  Example:
    >>> q = jnp.ones((1, 16, 4, 8)); kv = jnp.ones((1, 16, 2, 8))
    >>> attention(q, kv, kv).shape
    (1, 16, 4, 8)
  """
  group = check_qkv(q, k, v)
  _checks.check_choice("impl", impl, IMPLS)
  block = _checks.check_positive_int("block_size", block_size)
  seq_q, heads, seq_k = q.shape[1], q.shape[2], k.shape[1]
  if impl == "reference":
    mask = causal_mask(seq_q, seq_k) if causal else None
    return masked_attention(q, k, v, mask, scale=scale)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  kv_head = np.arange(heads) // group
  f32 = lambda x: x.astype(jnp.float32)
  out = _blocked.blocked_attention(
    f32(q) * scale,
    take_heads(f32(k), kv_head),
    take_heads(f32(v), kv_head),
    windows=(seq_q + seq_k + block,) * heads,
    sink=0,
    causal=causal,
    offset=seq_k - seq_q,
    block=block,
  )
  return out.astype(q.dtype)
