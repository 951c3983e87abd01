"""Causal self-attention layer: q/k/v/o projections, GQA, RoPE, optional
sliding window or per-head MoA rule, as `init_attention` / `attention_layer`,
registered as the "attention" and "moa" mixers.

Its decoding state is an `AttentionState`: a dense `KVCache` of `max_len`
slots (SnapKV may compress the prompt's), or, with windows, MoA's sink +
per-head ring `RingKVCache` (windows evaluated at `max_len`, the elastic
rule's N), keys stored with RoPE applied.

RoPE: Su et al., 2021 (RoFormer), rotate-half form. MoA windows: Fu et al.,
2024 (arXiv 2406.14909), see `lightning_jax.ops.moa`.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax import ops
from lightning_jax.layers import kv_cache
from lightning_jax.layers import mixers
from lightning_jax.layers import snapkv as snapkv_lib

IMPLS = ("blocked", "reference")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Attention layer hyper-parameters.

  Attributes:
    d_model: model width D.
    num_heads: query heads H.
    num_kv_heads: key/value heads, dividing `num_heads` (GQA).
    head_dim: per-head width.
    rope_theta: RoPE base.
    window: optional sliding window shared by every head.
    moa_alphas: optional per-head MoA alphas (with `moa_betas`): head h sees
      window `moa_windows(alpha_h, beta_h, seq_len)`; excludes `window`.
    moa_betas: per-head MoA betas.
    sink: attention-sink length (with `window` or the MoA rule).
    block_size: block length of the blocked kernels.
    impl: "blocked" (flash / block-sparse kernels) or "reference" (dense).
  """

  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  window: int | None = None
  moa_alphas: tuple[float, ...] | None = None
  moa_betas: tuple[float, ...] | None = None
  sink: int = 0
  block_size: int = 64
  impl: str = "blocked"

  def __post_init__(self):
    for name in (
      "d_model",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "block_size",
    ):
      _checks.check_positive_int(name, getattr(self, name))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"`num_kv_heads` ({self.num_kv_heads}) must divide "
        f"`num_heads` ({self.num_heads})."
      )
    if self.head_dim % 2:
      raise ValueError(
        f"`head_dim` must be even for RoPE, got {self.head_dim}."
      )
    _checks.check_choice("impl", self.impl, IMPLS)
    if self.window is not None:
      _checks.check_positive_int("window", self.window)
    if (self.moa_alphas is None) != (self.moa_betas is None):
      raise ValueError("`moa_alphas` and `moa_betas` go together.")
    if self.moa_alphas is not None:
      if self.window is not None:
        raise ValueError("Give `window` or `moa_alphas`/`moa_betas`, not both.")
      for name in ("moa_alphas", "moa_betas"):
        if len(getattr(self, name)) != self.num_heads:
          raise ValueError(
            f"`{name}` must have one entry per head "
            f"({self.num_heads}), got {getattr(self, name)}."
          )
    if self.sink < 0:
      raise ValueError(f"`sink` must be >= 0, got {self.sink}.")

  def windows(self, seq_len: int) -> np.ndarray | None:
    """Per-head windows `[num_heads]` at `seq_len`, or None when dense."""
    if self.moa_alphas is not None:
      return ops.moa_windows(self.moa_alphas, self.moa_betas, seq_len)
    if self.window is not None:
      return np.full(self.num_heads, min(self.window, seq_len))
    return None


def with_moa_plan(
  cfg: AttentionConfig, plan: ops.MoAPlan, layer: int
) -> AttentionConfig:
  """`cfg` with layer `layer`'s rules from `plan`."""
  return dataclasses.replace(
    cfg, window=None, moa_alphas=plan.alphas[layer], moa_betas=plan.betas[layer]
  )


def init_attention(key, cfg: AttentionConfig) -> dict:
  """Parameters `{"wq": [D, H, Dh], "wk", "wv": [D, Hkv, Dh],
  "wo": [H, Dh, D]}`, fan-in scaled normal.

  Example:
    >>> params = init_attention(jax.random.key(0), AttentionConfig(32, 4, 2, 8))
  """
  kq, kk, kv, ko = jax.random.split(key, 4)
  d, h, hk, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  normal = lambda k, shape, fan_in: jax.random.normal(k, shape) * fan_in**-0.5
  return {
    "wq": normal(kq, (d, h, dh), d),
    "wk": normal(kk, (d, hk, dh), d),
    "wv": normal(kv, (d, hk, dh), d),
    "wo": normal(ko, (h, dh, d), h * dh),
  }


def apply_rope(x_BxTxHxD, positions, theta: float = 10_000.0):
  """Rotary position embedding (rotate-half pairs (i, i + D/2)).

  Args:
    x_BxTxHxD: queries or keys.
    positions: int positions `[seq]` (shared by the rows) or `[batch, seq]`.
    theta: RoPE base.

  Example:
    >>> y = apply_rope(jnp.ones((1, 4, 2, 8)), jnp.arange(4))
  """
  half = x_BxTxHxD.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  pos = positions.astype(jnp.float32)[..., None]
  angle = pos * freq.reshape((1,) * (pos.ndim - 1) + (half,))  # [(B,) T, D/2]
  angle = jnp.broadcast_to(angle, x_BxTxHxD.shape[:2] + (half,))[:, :, None]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x = x_BxTxHxD.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


def _qkv(params, x_BxTxD, cfg, positions):
  """q `[B, T, H, Dh]`, k, v `[B, T, Hkv, Dh]`, RoPE at `positions`."""
  _checks.check_rank("x_BxTxD", x_BxTxD, 3, "[batch, seq, d_model]")
  if x_BxTxD.shape[-1] != cfg.d_model:
    raise ValueError(
      f"`x_BxTxD` must have last dim d_model={cfg.d_model}, "
      f"got shape {x_BxTxD.shape}."
    )
  q, k, v = (
    jnp.einsum("btd,dhk->bthk", x_BxTxD, params[w]) for w in ("wq", "wk", "wv")
  )
  return (
    apply_rope(q, positions, cfg.rope_theta),
    apply_rope(k, positions, cfg.rope_theta),
    v,
  )


def _attend(q, k, v, windows, cfg):
  """Causal attention of a fresh sequence: dense, or per-head windows."""
  if windows is None:
    return ops.attention(q, k, v, block_size=cfg.block_size, impl=cfg.impl)
  return ops.moa_attention(
    q,
    k,
    v,
    windows,
    sink=cfg.sink,
    block_size=cfg.block_size,
    impl="blocked" if cfg.impl == "blocked" else "dense",
  )


def _out(params, o_BxTxHxD, dtype):
  return jnp.einsum("bthk,hkd->btd", o_BxTxHxD.astype(dtype), params["wo"])


def attention_layer(params, x_BxTxD, cfg: AttentionConfig):
  """Causal self-attention `[batch, seq, d_model] -> [batch, seq, d_model]`.

  With neither `window` nor a MoA rule it is dense causal attention; with
  them, each head sees its window (plus the sink). Windows derive from the
  static sequence length, so they are concrete under `jit`. Traced under a
  mesh with a `seq` axis (`ops.sequence_axis`) it runs context parallel:
  each device its queries, against the keys its heads reach
  (`_context_parallel`).

  Example:
    >>> cfg = AttentionConfig(32, 4, 2, 8, window=16)
    >>> params = init_attention(jax.random.key(0), cfg)
    >>> attention_layer(params, jnp.ones((1, 40, 32)), cfg).shape
    (1, 40, 32)
  """
  seq = x_BxTxD.shape[1]
  windows = cfg.windows(seq)
  axis = ops.sequence_axis(seq)
  if axis is not None:
    local = functools.partial(
      _context_parallel, cfg=cfg, windows=windows, axis_name=axis
    )
    return ops.map_sequence(local, params, x_BxTxD, axis)
  q, k, v = _qkv(params, x_BxTxD, cfg, jnp.arange(seq))
  return _out(params, _attend(q, k, v, windows, cfg), x_BxTxD.dtype)


def _context_parallel(params, x_BxLxD, cfg, windows, axis_name: str):
  """Causal attention of one device's chunk of a sequence split over
  `axis_name`, RoPE at the global positions; `windows` are the heads' at
  the global length (None: dense).

  Device i holds queries `[i L, (i + 1) L)`. With reach `R = W - 1` for
  the widest window W (every earlier key when dense, or when W - 1 reaches
  device 0 from the last device):

  - `R >= (P - 1) L`: keys and values all-gathered (the gradient: one
    reduce-scatter); device i attends the prefix `[0, (i + 1) L)`.
  - otherwise: the R keys before the chunk (`ops.previous_tokens`, one
    `ppermute` per device the window reaches) and the S sink keys (an
    all-gather of each device's first `min(S, L)`); device i attends
    `[0, S) + [i L - R, (i + 1) L)`, the two ranges merged when they meet.

  The queries sit bottom-right of their keys (`ops.attention`,
  `ops.moa_attention`); past the sink, keys are contiguous, so the kernels'
  relative-position masks hold. One `lax.switch` branch per device, each
  with static key ranges, so a device does only its share of the work.
  """
  local, size = x_BxLxD.shape[1], jax.lax.axis_size(axis_name)
  index = jax.lax.axis_index(axis_name)
  q, k, v = _qkv(params, x_BxLxD, cfg, index * local + jnp.arange(local))
  reach = (size - 1) * local
  if windows is not None:
    reach = min(reach, int(np.max(windows)) - 1)
  if reach == (size - 1) * local:
    k, v = (
      jax.lax.all_gather(a, axis_name, axis=1, tiled=True) for a in (k, v)
    )
    sinks = (k[:, :0], v[:, :0])  # unused: the prefix holds the sink
    start = lambda i: 0  # global position of the first key
  else:
    first = min(cfg.sink, local)
    sinks = tuple(
      jax.lax.all_gather(a[:, :first], axis_name, axis=1, tiled=True)[
        :, : cfg.sink
      ]
      for a in (k, v)
    )
    k, v = (
      jnp.concatenate([ops.previous_tokens(a, reach, axis_name), a], 1)
      for a in (k, v)
    )
    start = lambda i: i * local - reach

  def branch(i):
    end, lo = (i + 1) * local, start(i)

    def keys(a, sink):
      if lo <= cfg.sink:  # [0, end): the sink and the halo meet
        head, tail = sink[:, : max(lo, 0)], a[:, max(-lo, 0) : end - lo]
        return jnp.concatenate([head, tail], 1)
      return jnp.concatenate([sink, a], 1)

    return lambda q, k, v, sk, sv: _attend(
      q, keys(k, sk), keys(v, sv), windows, cfg
    )

  o = jax.lax.switch(index, [branch(i) for i in range(size)], q, k, v, *sinks)
  return _out(params, o, x_BxLxD.dtype)


def attention_layer_probed(
  params, x_BxTxD, cfg: AttentionConfig, probe_BxHxTxT
):
  """The layer with its attention weights exposed, for MoA profiling.

  Computes A (the masked softmax, reference impl) and uses `A + probe` as the
  weights, so the gradient with respect to `probe` is dL/dA.

  Returns:
    `(y [batch, seq, d_model], A [batch, heads, seq, seq] fp32)`.
  """
  seq = x_BxTxD.shape[1]
  q, k, v = _qkv(params, x_BxTxD, cfg, jnp.arange(seq))
  windows = cfg.windows(seq)
  mask = (
    ops.causal_mask(seq, seq)
    if windows is None
    else ops.moa_mask(windows, seq, cfg.sink)
  )
  a = ops.attention_weights(q, k, mask)
  o = ops.attention_lib.weighted_values(a + probe_BxHxTxT, v).astype(q.dtype)
  return _out(params, o, x_BxTxD.dtype), a


class AttentionState(NamedTuple):
  """Decoding state of an attention mixer.

  Attributes:
    cache: `layers.KVCache` (dense) or `layers.RingKVCache` (windows).
    offset: int32 `[batch]`, tokens seen minus `cache.length` (the prompt
      tokens SnapKV dropped; 0 otherwise): the next RoPE position is
      `cache.length + offset`.
  """

  cache: kv_cache.KVCache | kv_cache.RingKVCache
  offset: jax.Array


def init_attention_state(
  cfg: AttentionConfig, batch: int, max_len: int, dtype=jnp.float32
) -> AttentionState:
  """The empty cache of a sequence growing to `max_len` tokens."""
  windows = cfg.windows(max_len)
  zeros = lambda *shape, dtype=jnp.int32: jnp.zeros(shape, dtype)
  if windows is None:
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return AttentionState(
      kv_cache.KVCache(
        zeros(*shape, dtype=dtype), zeros(*shape, dtype=dtype), zeros(batch)
      ),
      zeros(batch),
    )
  layout = kv_cache.RingLayout.build(
    windows, cfg.num_kv_heads, cfg.sink, max_len
  )
  buffers = lambda: tuple(
    zeros(batch, len(heads), cfg.sink + ring, cfg.head_dim, dtype=dtype)
    for ring, heads in zip(layout.rings, layout.kv_heads, strict=True)
  )
  return AttentionState(
    kv_cache.RingKVCache(buffers(), buffers(), zeros(batch), layout),
    zeros(batch),
  )


def _prefill(q, k, v, lengths_B, cache, cfg, snapkv):
  """Causal attention over a right-padded prompt and its filled cache."""
  if isinstance(cache, kv_cache.RingKVCache):
    o = _attend(q, k, v, np.asarray(cache.layout.windows), cfg)
    return o, kv_cache.ring_cache_from_prompt(k, v, lengths_B, cache.layout)
  o = _attend(q, k, v, None, cfg)
  slots, seq = cache.k.shape[2], q.shape[1]
  if snapkv is None or seq <= snapkv.capacity:
    return o, kv_cache.kv_cache_from_prompt(k, v, lengths_B, slots)
  obs = jnp.maximum(snapkv_lib.window_slots(lengths_B, snapkv.window), 0)
  q_obs = jnp.take_along_axis(q, obs[..., None, None], axis=1)
  kc, vc, kept = snapkv_lib.compress(q_obs, k, v, lengths_B, snapkv)
  return o, kv_cache.kv_cache_from_prompt(
    kc, vc, kept, snapkv.capacity + slots - seq
  )


def _step(q, k, v, cache):
  """One token per row over its cache: `(o [B, 1, H, Dh], new cache)`."""
  step = (
    kv_cache.kv_cache_step
    if isinstance(cache, kv_cache.KVCache)
    else kv_cache.ring_cache_step
  )
  o, cache = step(cache, q[:, 0], k[:, 0], v[:, 0])
  return o[:, None], cache


def attention_mixer(
  params,
  x_BxTxD,
  cfg: AttentionConfig,
  state: AttentionState | None = None,
  decoding: mixers.Decoding | None = None,
):
  """`attention_layer` with the mixer contract of `layers.mixers`.

  Args:
    params: from `init_attention`.
    x_BxTxD: `[batch, seq, d_model]`.
    cfg: the `AttentionConfig`.
    state: None (training: no cache), a fresh `init_attention_state` with
      `seq > 1` (prefill of right-padded rows), or any state with `seq == 1`
      (one decode step).
    decoding: the rows' lengths and the SnapKV option of a prefill.

  Returns:
    `(y [batch, seq, d_model], AttentionState or None)`.
  """
  if state is None:
    return attention_layer(params, x_BxTxD, cfg), None
  batch, seq = x_BxTxD.shape[:2]
  if seq == 1:
    positions = (state.cache.length + state.offset)[:, None]
    q, k, v = _qkv(params, x_BxTxD, cfg, positions)
    o, cache = _step(q, k, v, state.cache)
    return _out(params, o, x_BxTxD.dtype), AttentionState(cache, state.offset)
  positions = jnp.broadcast_to(jnp.arange(seq)[None], (batch, seq))
  q, k, v = _qkv(params, x_BxTxD, cfg, positions)
  lengths = jnp.asarray(decoding.lengths_B, jnp.int32)
  o, cache = _prefill(q, k, v, lengths, state.cache, cfg, decoding.snapkv)
  return _out(params, o, x_BxTxD.dtype), AttentionState(
    cache, lengths - cache.length
  )


def _empty_state(cfg, batch, max_len, dtype):
  return init_attention_state(cfg, batch, max_len, dtype)


def _init(key, cfg, *, layer, num_layers):
  del layer, num_layers
  return init_attention(key, cfg)


def _dense_config(spec: mixers.LayerSpec) -> AttentionConfig:
  m = spec.model
  return mixers.with_options(
    AttentionConfig(
      m.d_model,
      spec.num_heads,
      spec.num_kv_heads,
      m.head_dim,
      rope_theta=m.rope_theta,
      window=m.window,
      sink=m.sink,
      impl=m.attention_impl,
    ),
    spec.options,
  )


def _moa_config(spec: mixers.LayerSpec) -> AttentionConfig:
  m = spec.model
  plan, row = m.moa_plan, m.attention_layers.index(spec.layer)
  if plan is None or plan.num_layers != len(m.attention_layers):
    raise ValueError(
      "`moa_plan` must have one row per softmax-attention layer: the model "
      f"has {len(m.attention_layers)} (layers {list(m.attention_layers)}), "
      f"the plan {None if plan is None else plan.num_layers} rows."
    )
  if len(plan.alphas[row]) != spec.num_heads:
    raise ValueError(
      f"`moa_plan` row {row} has {len(plan.alphas[row])} heads, but "
      f"attention layer {row} (layer {spec.layer}) has {spec.num_heads}."
    )
  cfg = dataclasses.replace(_dense_config(spec), window=None)
  return with_moa_plan(cfg, plan, row)


_QKV = ("embed", "heads", "head_dim")  # [D, H, Dh]
_RULES = (
  (("wq",), _QKV),
  (("wk",), _QKV),  # [D, Hkv, Dh]
  (("wv",), _QKV),
  (("wo",), ("heads", "head_dim", "embed")),  # [H, Dh, D]
)


def _flops(cfg: AttentionConfig, seq_len: int) -> float:
  """`4 H Dh ctx`: q k^T and the weighted sum of v over each head's mean
  causal context `ctx = mean_t min(t, window)` (the MoA window per head;
  T without a window)."""
  t = np.arange(1, seq_len + 1)
  if cfg.moa_alphas is not None:
    windows = ops.moa_windows(cfg.moa_alphas, cfg.moa_betas, seq_len)
  else:
    windows = np.full(cfg.num_heads, cfg.window or seq_len)
  ctx = np.minimum(t[None, :], np.asarray(windows)[:, None]).mean(axis=1)
  return float(4 * cfg.head_dim * np.sum(ctx))


ATTENTION = mixers.register(
  mixers.Mixer(
    name="attention",
    config=_dense_config,
    init=_init,
    apply=attention_mixer,
    empty_state=_empty_state,
    flops=_flops,
    rules=_RULES,
    doc="Causal softmax attention with RoPE and GQA (optional sliding "
    "window + sink); KV cache as state.",
    softmax=True,
  )
)
MOA = mixers.register(
  mixers.Mixer(
    name="moa",
    config=_moa_config,
    init=_init,
    apply=attention_mixer,
    empty_state=_empty_state,
    flops=_flops,
    rules=_RULES,
    doc="MoA (arXiv 2406.14909): per-head elastic windows + sink from "
    "`ModelConfig.moa_plan`; sink + ring caches as state.",
    softmax=True,
  )
)
