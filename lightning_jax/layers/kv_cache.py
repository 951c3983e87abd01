"""Fixed-shape decoding caches for softmax attention: dense and MoA ring.

Both are pytrees of preallocated arrays, so a jitted decode step sees the
same shapes at every token. Keys are stored with RoPE applied. Sequences are
right padded: sequence b owns slots `[0, length[b])` and writes its next
token at slot `length[b]` (a per-row scatter, in place under donation).

* `KVCache`: `[batch, kv_heads, slots, dim]` keys and values, with slots =
  the longest context (or the SnapKV capacity plus the new tokens). Heads
  before slots: a decode step's two attention contractions then run over
  contiguous `[slots, dim]` blocks per head, with no transpose of the cache
  (8x faster than `[batch, slots, heads, dim]` at 16k slots on CPU). The slot
  of an entry need not be its position (after SnapKV it is not); RoPE uses
  the decoder's per-sequence positions.
* `RingKVCache`: MoA / sliding-window heads (Fu et al., 2024, arXiv
  2406.14909). A head with window w and sink s only ever sees the first s
  positions and the last w, so it keeps `s + w` slots: the sink, then a ring
  where position p >= s lives in slot `s + (p - s) mod w`. KV heads are
  grouped by their buffer size (the widest window among the query heads that
  share the KV head), one `[batch, kv_heads_in_group, s + w_g, dim]` buffer
  per group, so memory is `sum_h (s + w_h)` slots: it follows the plan's
  density instead of padding every head to the widest window.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks


class KVCache(NamedTuple):
  """Dense attention cache.

  Attributes:
    k: `[batch, kv_heads, slots, head_dim]`, RoPE applied.
    v: `[batch, kv_heads, slots, value_dim]`.
    length: int32 `[batch]`, filled slots (entries `[0, length)` valid).
  """

  k: jax.Array
  v: jax.Array
  length: jax.Array


def kv_cache_from_prompt(
  k_BxTxHxD, v_BxTxHxDv, lengths_B, slots: int
) -> KVCache:
  """A `slots`-long cache holding a right-padded prompt's keys and values.

  Args:
    k_BxTxHxD: prompt keys `[batch, seq, kv_heads, head_dim]`, RoPE applied.
    v_BxTxHxDv: prompt values `[batch, seq, kv_heads, value_dim]`.
    lengths_B: int prompt lengths (entries past them are zeroed).
    slots: cache length, >= seq.

  Example:
    >>> kv = jnp.ones((2, 5, 1, 4))
    >>> kv_cache_from_prompt(kv, kv, jnp.array([5, 3]), 16).k.shape
    (2, 1, 16, 4)
  """
  _checks.check_rank(
    "k_BxTxHxD", k_BxTxHxD, 4, "[batch, seq, kv_heads, head_dim]"
  )
  prompt = k_BxTxHxD.shape[1]
  if slots < prompt:
    raise ValueError(
      f"`slots` ({slots}) must be >= the prompt length ({prompt})."
    )
  pad = ((0, 0), (0, slots - prompt), (0, 0), (0, 0))
  valid = (jnp.arange(prompt)[None, :] < lengths_B[:, None])[..., None, None]
  k, v = (
    jnp.swapaxes(jnp.pad(jnp.where(valid, x, 0), pad), 1, 2)
    for x in (k_BxTxHxD, v_BxTxHxDv)
  )
  return KVCache(k, v, jnp.array(lengths_B, jnp.int32))  # a copy: donatable


def _write(buf_BxHxSxD, slot_B, new_BxHxD):
  """Row b's entry at slot `slot[b]` (in place under donation)."""
  return buf_BxHxSxD.at[jnp.arange(buf_BxHxSxD.shape[0]), :, slot_B].set(
    new_BxHxD.astype(buf_BxHxSxD.dtype), mode="promise_in_bounds"
  )


def kv_cache_append(cache: KVCache, k_BxHxD, v_BxHxDv) -> KVCache:
  """Writes one token per sequence at slot `length` (must be < slots)."""
  return KVCache(
    _write(cache.k, cache.length, k_BxHxD),
    _write(cache.v, cache.length, v_BxHxDv),
    cache.length + 1,
  )


def grouped_attention(
  q_BxHxD,
  k_BxHkvxSxD,
  v_BxHkvxSxDv,
  visible_BxHxS,
  k_new_BxHkvxD,
  v_new_BxHkvxDv,
  *,
  scale=None,
):
  """One query per sequence against cached keys plus its own new key.

  The new token's key and value enter the softmax next to the cache instead
  of being written into it first: the step then reads the cache as it was,
  so the in-place write of the new entry does not force XLA to copy the
  cache for the attention. GQA without repeating KV: query head h uses KV
  head `h // (H / Hkv)`; fp32 scores and softmax.

  Args:
    q_BxHxD: the new queries `[batch, heads, dim]`.
    k_BxHkvxSxD: cached keys `[batch, kv_heads, slots, dim]`.
    v_BxHkvxSxDv: cached values.
    visible_BxHxS: bool, which cached slots each query head sees.
    k_new_BxHkvxD: the new token's keys.
    v_new_BxHkvxDv: the new token's values.
    scale: score scale, default `dim ** -0.5`.

  Returns:
    fp32 `[batch, heads, value_dim]`.
  """
  b, h, d = q_BxHxD.shape
  hkv, s = k_BxHkvxSxD.shape[1:3]
  g = h // hkv
  scale = d**-0.5 if scale is None else scale
  f32 = lambda x: x.astype(jnp.float32)
  q = f32(q_BxHxD).reshape(b, hkv, g, d) * scale
  scores = jnp.einsum("bngd,bnsd->bngs", q, f32(k_BxHkvxSxD))
  scores = jnp.where(visible_BxHxS.reshape(b, hkv, g, s), scores, -jnp.inf)
  own = jnp.einsum("bngd,bnd->bng", q, f32(k_new_BxHkvxD))[..., None]
  p = jax.nn.softmax(jnp.concatenate([scores, own], axis=-1), axis=-1)
  o = (
    jnp.einsum("bngs,bnsd->bngd", p[..., :s], f32(v_BxHkvxSxDv))
    + p[..., s:] * f32(v_new_BxHkvxDv)[:, :, None, :]
  )
  return o.reshape(b, h, -1)


def kv_cache_step(
  cache: KVCache, q_BxHxD, k_BxHkvxD, v_BxHkvxDv, *, scale=None
):
  """Attention of each row's new token over its filled slots and itself;
  then the token is written at slot `length` (must be < slots).

  Returns:
    `(fp32 [batch, heads, value_dim], the updated KVCache)`.
  """
  heads, slots = q_BxHxD.shape[1], cache.k.shape[2]
  visible = jnp.arange(slots)[None, None, :] < cache.length[:, None, None]
  visible = jnp.broadcast_to(visible, (visible.shape[0], heads, slots))
  o = grouped_attention(
    q_BxHxD, cache.k, cache.v, visible, k_BxHkvxD, v_BxHkvxDv, scale=scale
  )
  return o, kv_cache_append(cache, k_BxHkvxD, v_BxHkvxDv)


@dataclasses.dataclass(frozen=True)
class RingLayout:
  """Static layout of a `RingKVCache` (hashable; pytree metadata).

  Attributes:
    sink: leading positions every query sees.
    windows: per query head window (>= 1), at the context the plan is
      evaluated for.
    group_size: query heads per KV head.
    rings: ring length of each buffer group.
    kv_heads: KV heads of each buffer group (ascending).
  """

  sink: int
  windows: tuple[int, ...]
  group_size: int
  rings: tuple[int, ...]
  kv_heads: tuple[tuple[int, ...], ...]

  @classmethod
  def build(
    cls, windows, num_kv_heads: int, sink: int, max_len: int
  ) -> "RingLayout":
    """Groups KV heads by ring length `min(max window of their query heads,
    max_len - sink)` (at least 1).

    Example:
      >>> RingLayout.build([8, 2, 8, 8], 4, 1, 64).rings
      (2, 8)
    """
    windows = np.asarray(windows, np.int64)
    heads = windows.shape[0]
    if heads % num_kv_heads:
      raise ValueError(
        f"`num_kv_heads` ({num_kv_heads}) must divide the "
        f"heads of `windows` ({heads})."
      )
    group = heads // num_kv_heads
    per_kv = windows.reshape(num_kv_heads, group).max(axis=1)
    ring = np.maximum(np.minimum(per_kv, max_len - sink), 1)
    sizes = tuple(int(r) for r in np.unique(ring))
    return cls(
      sink=int(sink),
      windows=tuple(int(w) for w in windows),
      group_size=group,
      rings=sizes,
      kv_heads=tuple(
        tuple(int(i) for i in np.flatnonzero(ring == r)) for r in sizes
      ),
    )

  def slot_count(self) -> int:
    """Slots over all KV heads: `sum_h (sink + ring_h)`."""
    return sum(
      (self.sink + r) * len(h)
      for r, h in zip(self.rings, self.kv_heads, strict=True)
    )

  def query_heads(self, group: int) -> np.ndarray:
    """Query heads served by buffer group `group`, grouped by KV head."""
    kv = np.asarray(self.kv_heads[group])
    return (
      kv[:, None] * self.group_size + np.arange(self.group_size)[None, :]
    ).reshape(-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RingKVCache:
  """MoA / sliding-window cache: per KV-head group, sink + ring buffer.

  Attributes:
    k: tuple over groups of `[batch, kv_heads_g, sink + ring_g, head_dim]`.
    v: tuple over groups of `[batch, kv_heads_g, sink + ring_g, value_dim]`.
    length: int32 `[batch]`, tokens written so far (= next position).
    layout: the static `RingLayout`.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  length: jax.Array
  layout: RingLayout = dataclasses.field(metadata=dict(static=True))


def _slot_positions(layout: RingLayout, group: int, last_B) -> jax.Array:
  """int32 `[batch, sink + ring]`: the position each slot holds once
  position `last` has been written (-1 where empty)."""
  sink, ring = layout.sink, layout.rings[group]
  last = last_B[:, None]
  j = jnp.arange(sink)[None, :]
  sink_pos = jnp.where(j <= last, j, -1)
  r = jnp.arange(ring)[None, :]
  ring_pos = last - jnp.mod(last - sink - r, ring)
  ring_pos = jnp.where(ring_pos >= sink, ring_pos, -1)
  return jnp.concatenate(
    [jnp.broadcast_to(sink_pos, (last.shape[0], sink)), ring_pos], axis=1
  ).astype(jnp.int32)


def ring_cache_from_prompt(
  k_BxTxHxD, v_BxTxHxDv, lengths_B, layout: RingLayout
) -> RingKVCache:
  """Fills the sink and rings from a right-padded prompt (prompt tokens
  beyond a head's window are dropped)."""
  _checks.check_rank(
    "k_BxTxHxD", k_BxTxHxD, 4, "[batch, seq, kv_heads, head_dim]"
  )
  lengths = jnp.array(lengths_B, jnp.int32)  # a copy: donatable
  ks, vs = [], []
  for g, heads in enumerate(layout.kv_heads):
    pos = _slot_positions(layout, g, lengths - 1)  # [B, slots]
    idx = jnp.maximum(pos, 0)[..., None, None]
    for out, x in ((ks, k_BxTxHxD), (vs, v_BxTxHxDv)):
      x = jnp.take(x, np.asarray(heads), axis=2)
      out.append(
        jnp.swapaxes(
          jnp.where(
            pos[..., None, None] >= 0, jnp.take_along_axis(x, idx, axis=1), 0
          ),
          1,
          2,
        )
      )
  return RingKVCache(tuple(ks), tuple(vs), lengths, layout)


def ring_cache_append(cache: RingKVCache, k_BxHxD, v_BxHxDv) -> RingKVCache:
  """Writes position `length` of every sequence into its sink or ring slot."""
  layout, t = cache.layout, cache.length
  ks, vs = [], []
  for g, heads in enumerate(layout.kv_heads):
    slot = jnp.where(
      t < layout.sink,
      t,
      layout.sink + jnp.mod(t - layout.sink, layout.rings[g]),
    )
    heads = np.asarray(heads)
    ks.append(_write(cache.k[g], slot, jnp.take(k_BxHxD, heads, axis=1)))
    vs.append(_write(cache.v[g], slot, jnp.take(v_BxHxDv, heads, axis=1)))
  return RingKVCache(tuple(ks), tuple(vs), t + 1, layout)


def ring_cache_step(
  cache: RingKVCache, q_BxHxD, k_BxHkvxD, v_BxHkvxDv, *, scale=None
):
  """Attention of each row's new token (position `length`) over the sink,
  its head's window and itself; then the token is written to the cache.

  The slot the new token overwrites holds position `length - ring`, outside
  every window of that buffer, so reading the cache before the write is
  exact.

  Returns:
    `(fp32 [batch, heads, value_dim], the updated RingKVCache)`.
  """
  layout, t = cache.layout, cache.length
  out = []
  for g, kv_heads in enumerate(layout.kv_heads):
    q_heads = layout.query_heads(g)
    pos = _slot_positions(layout, g, t - 1)[:, None, :]  # [B, 1, S]
    window = jnp.asarray(np.asarray(layout.windows)[q_heads])[None, :, None]
    visible = (pos >= 0) & (
      (pos > t[:, None, None] - window) | (pos < layout.sink)
    )
    kv_heads = np.asarray(kv_heads)
    out.append(
      grouped_attention(
        jnp.take(q_BxHxD, q_heads, axis=1),
        cache.k[g],
        cache.v[g],
        visible,
        jnp.take(k_BxHkvxD, kv_heads, axis=1),
        jnp.take(v_BxHkvxDv, kv_heads, axis=1),
        scale=scale,
      )
    )
  order = np.argsort(
    np.concatenate([layout.query_heads(g) for g in range(len(layout.kv_heads))])
  )
  o = jnp.take(jnp.concatenate(out, axis=1), order, axis=1)
  return o, ring_cache_append(cache, k_BxHkvxD, v_BxHkvxDv)


def cache_bytes(tree) -> int:
  """Bytes held by the arrays (or `jax.ShapeDtypeStruct`s) of a cache."""
  return sum(
    int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
  )
