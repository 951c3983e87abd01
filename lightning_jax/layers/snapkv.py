"""SnapKV: prompt KV-cache compression by observation-window voting.

SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before
Generation", arXiv 2404.14469). After prefill, for each KV head:

    A = softmax(q_obs k^T * scale)        the last `window` prompt queries,
                                          causal, fp32 [window, len]
    s_j = sum_{queries, group heads} A_ij  for prefix keys j < len - window
    s' = pool_kernel(s)                    1-D avg or max pooling, stride 1,
                                          'same' padding (kernel // 2 a side)
    keep = sorted(top_{capacity - window}(s')) ++ [len - window, len)

Prompts with `len <= capacity` are kept unchanged. With grouped-query
attention the query heads of a group vote together (scores summed over the
group) so the compressed cache keeps one selection per KV head: it stays at
the KV-head count instead of being expanded per query head.

Layout: right padding. Sequence b holds its `lengths[b]` prompt tokens in
slots `[0, lengths[b])` of `[batch, slots, kv_heads, dim]`; the compressed
cache holds its `min(lengths[b], capacity)` kept entries in slots
`[0, kept[b])` of `[batch, capacity, kv_heads, dim]`, in position order.
"""

import dataclasses

import jax
import jax.numpy as jnp

from lightning_jax import _checks
from lightning_jax import ops

POOLINGS = ("avg", "max")


@dataclasses.dataclass(frozen=True)
class SnapKVConfig:
  """SnapKV hyper-parameters.

  Attributes:
    capacity: KV entries kept per head (window included); > window.
    window: observation window (last prompt queries), also always kept.
    kernel: odd pooling size that smooths the votes (1: no pooling).
    pooling: "avg" or "max".
  """

  capacity: int
  window: int = 32
  kernel: int = 7
  pooling: str = "avg"

  def __post_init__(self):
    for name in ("capacity", "window", "kernel"):
      _checks.check_positive_int(name, getattr(self, name))
    if self.capacity <= self.window:
      raise ValueError(
        f"`capacity` ({self.capacity}) must exceed `window` ({self.window})."
      )
    if self.kernel % 2 == 0:
      raise ValueError(f"`kernel` must be odd, got {self.kernel}.")
    _checks.check_choice("pooling", self.pooling, POOLINGS)


def pool1d(x, kernel: int, pooling: str) -> jax.Array:
  """Stride-1 pooling over the last axis with `kernel // 2` padding a side.

  "avg" divides by `kernel` at the edges too (zero padding counted, as
  PyTorch's `avg_pool1d` default); "max" pads with -inf.

  Example:
    >>> pool1d(jnp.array([0., 3., 0., 0.]), 3, "avg")
    Array([1., 1., 1., 0.], dtype=float32)
  """
  _checks.check_choice("pooling", pooling, POOLINGS)
  dims = (1,) * (x.ndim - 1) + (kernel,)
  if pooling == "max":
    return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, dims, (1,) * x.ndim, "SAME"
    )
  summed = jax.lax.reduce_window(
    x, 0.0, jax.lax.add, dims, (1,) * x.ndim, "SAME"
  )
  return summed / kernel


def window_slots(lengths_B, window: int) -> jax.Array:
  """int32 `[batch, window]`: slots of the last `window` prompt tokens (may
  be negative for prompts shorter than the window)."""
  return (
    lengths_B[:, None] - window + jnp.arange(window, dtype=jnp.int32)[None, :]
  ).astype(jnp.int32)


def observation_scores(
  q_obs_BxWxHxD, k_BxSxHkvxD, lengths_B, *, scale=None
) -> jax.Array:
  """Attention mass each key gets from the observation window, per KV head.

  Args:
    q_obs_BxWxHxD: queries of the last W prompt tokens (slots
      `lengths - W + i`), RoPE applied.
    k_BxSxHkvxD: prompt keys, right padded (valid slots `< lengths`).
    lengths_B: int prompt lengths.
    scale: score scale, default `dim ** -0.5`.

  Returns:
    fp32 `[batch, kv_heads, slots]`: causal softmax weights summed over the
    window's queries and over the query heads of each KV head's group.
  """
  _checks.check_rank(
    "q_obs_BxWxHxD", q_obs_BxWxHxD, 4, "[batch, window, heads, dim]"
  )
  group = ops.attention_lib.check_qkv(q_obs_BxWxHxD, k_BxSxHkvxD, k_BxSxHkvxD)
  batch, window, heads, _ = q_obs_BxWxHxD.shape
  slots = k_BxSxHkvxD.shape[1]
  _checks.check_shape("lengths_B", lengths_B, (batch,), "[batch]")
  q_slot = window_slots(lengths_B, window)  # [B, W]
  visible = (jnp.arange(slots)[None, None, :] <= q_slot[:, :, None]) & (
    q_slot[:, :, None] >= 0
  )  # [B, W, S]

  def one(q, k, mask):
    return ops.attention_weights(q[None], k[None], mask[None], scale=scale)[0]

  a = jax.vmap(one)(q_obs_BxWxHxD, k_BxSxHkvxD, visible)  # [B, H, W, S]
  a = a.sum(axis=2).reshape(batch, heads // group, group, slots)
  return a.sum(axis=2)


def select(scores_BxHkvxS, lengths_B, cfg: SnapKVConfig) -> jax.Array:
  """Slots to keep, int32 `[batch, kv_heads, capacity]`, in position order.

  A sequence with `lengths <= capacity` keeps slots `0..capacity-1` (its
  whole prompt, then padding); a longer one keeps the `capacity - window`
  prefix slots with the largest pooled votes, then its window.

  Args:
    scores_BxHkvxS: votes from `observation_scores`; slots >= capacity.
    lengths_B: int prompt lengths.
    cfg: SnapKV settings.
  """
  slots = scores_BxHkvxS.shape[-1]
  if slots < cfg.capacity:
    raise ValueError(
      f"`scores_BxHkvxS` must have >= capacity "
      f"({cfg.capacity}) slots, got shape "
      f"{scores_BxHkvxS.shape}."
    )
  lengths = lengths_B[:, None, None]
  slot = jnp.arange(slots)[None, None, :]
  prefix = slot < lengths - cfg.window
  pooled = pool1d(
    jnp.where(prefix, scores_BxHkvxS, 0.0), cfg.kernel, cfg.pooling
  )
  top = jax.lax.top_k(
    jnp.where(prefix, pooled, -jnp.inf), cfg.capacity - cfg.window
  )[1]
  window = window_slots(lengths_B, cfg.window)[:, None, :]
  long = jnp.concatenate(
    [
      jnp.sort(top, axis=-1),
      jnp.broadcast_to(window, top.shape[:2] + (cfg.window,)),
    ],
    axis=-1,
  )
  short = jnp.arange(cfg.capacity, dtype=jnp.int32)[None, None, :]
  return jnp.where(lengths > cfg.capacity, long, short).astype(jnp.int32)


def compress(
  q_obs_BxWxHxD,
  k_BxSxHkvxD,
  v_BxSxHkvxDv,
  lengths_B,
  cfg: SnapKVConfig,
  *,
  scale=None,
):
  """Compresses a prompt KV cache to `cfg.capacity` entries per KV head.

  Args:
    q_obs_BxWxHxD: the last `cfg.window` prompt queries (RoPE applied).
    k_BxSxHkvxD: prompt keys (RoPE applied), right padded.
    v_BxSxHkvxDv: prompt values.
    lengths_B: int prompt lengths.
    cfg: SnapKV settings.
    scale: score scale, default `dim ** -0.5`.

  Returns:
    `(k [B, capacity, Hkv, D], v [B, capacity, Hkv, Dv], kept [B] int32)`;
    entries `[0, kept)` are valid, in position order.

  Example:
    >>> q = jnp.ones((1, 4, 2, 8)); kv = jnp.ones((1, 64, 1, 8))
    >>> k, v, kept = compress(q, kv, kv, jnp.array([64]),
    ...                       SnapKVConfig(capacity=16, window=4))
    >>> k.shape, kept
    ((1, 16, 1, 8), Array([16], dtype=int32))
  """
  if q_obs_BxWxHxD.shape[1:2] != (cfg.window,):
    raise ValueError(
      f"`q_obs_BxWxHxD` must hold window={cfg.window} "
      f"queries, got shape {q_obs_BxWxHxD.shape}."
    )
  ops.attention_lib.check_qkv(q_obs_BxWxHxD, k_BxSxHkvxD, v_BxSxHkvxDv)
  lengths = jnp.asarray(lengths_B, jnp.int32)
  pad = max(cfg.capacity - k_BxSxHkvxD.shape[1], 0)
  k, v = (
    jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    for x in (k_BxSxHkvxD, v_BxSxHkvxDv)
  )
  scores = observation_scores(q_obs_BxWxHxD, k, lengths, scale=scale)
  keep = select(scores, lengths, cfg)  # [B, Hkv, C]
  gather = lambda x: jnp.take_along_axis(
    x, jnp.swapaxes(keep, 1, 2)[..., None], axis=1
  )
  return gather(k), gather(v), jnp.minimum(lengths, cfg.capacity)
