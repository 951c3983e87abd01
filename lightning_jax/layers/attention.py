"""Causal self-attention layer: q/k/v/o projections, GQA, RoPE, optional
sliding window or per-head MoA rule, as `init_attention` / `attention_layer`.

RoPE: Su et al., 2021 (RoFormer), rotate-half form. MoA windows: Fu et al.,
2024 (arXiv 2406.14909), see `lightning_jax.ops.moa`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax import ops

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
    for name in ("d_model", "num_heads", "num_kv_heads", "head_dim",
                 "block_size"):
      _checks.check_positive_int(name, getattr(self, name))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"`num_kv_heads` ({self.num_kv_heads}) must divide "
                       f"`num_heads` ({self.num_heads}).")
    if self.head_dim % 2:
      raise ValueError(f"`head_dim` must be even for RoPE, got "
                       f"{self.head_dim}.")
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
          raise ValueError(f"`{name}` must have one entry per head "
                           f"({self.num_heads}), got {getattr(self, name)}.")
    if self.sink < 0:
      raise ValueError(f"`sink` must be >= 0, got {self.sink}.")

  def windows(self, seq_len: int) -> np.ndarray | None:
    """Per-head windows `[num_heads]` at `seq_len`, or None when dense."""
    if self.moa_alphas is not None:
      return ops.moa_windows(self.moa_alphas, self.moa_betas, seq_len)
    if self.window is not None:
      return np.full(self.num_heads, min(self.window, seq_len))
    return None


def with_moa_plan(cfg: AttentionConfig, plan: ops.MoAPlan,
                  layer: int) -> AttentionConfig:
  """`cfg` with layer `layer`'s rules from `plan`."""
  return dataclasses.replace(cfg, window=None, moa_alphas=plan.alphas[layer],
                             moa_betas=plan.betas[layer])


def init_attention(key, cfg: AttentionConfig) -> dict:
  """Parameters `{"wq": [D, H, Dh], "wk", "wv": [D, Hkv, Dh],
  "wo": [H, Dh, D]}`, fan-in scaled normal.

  Example:
    >>> params = init_attention(jax.random.key(0), AttentionConfig(32, 4, 2, 8))
  """
  kq, kk, kv, ko = jax.random.split(key, 4)
  d, h, hk, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  normal = lambda k, shape, fan_in: (jax.random.normal(k, shape)
                                     * fan_in ** -0.5)
  return {"wq": normal(kq, (d, h, dh), d), "wk": normal(kk, (d, hk, dh), d),
          "wv": normal(kv, (d, hk, dh), d), "wo": normal(ko, (h, dh, d), h * dh)}


def apply_rope(x_BxTxHxD, positions_T, theta: float = 10_000.0):
  """Rotary position embedding (rotate-half pairs (i, i + D/2)).

  Example:
    >>> y = apply_rope(jnp.ones((1, 4, 2, 8)), jnp.arange(4))
  """
  half = x_BxTxHxD.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions_T.astype(jnp.float32)[:, None] * freq[None, :]  # [T, D/2]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x = x_BxTxHxD.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


def _qkv(params, x_BxTxD, cfg):
  _checks.check_rank("x_BxTxD", x_BxTxD, 3, "[batch, seq, d_model]")
  if x_BxTxD.shape[-1] != cfg.d_model:
    raise ValueError(f"`x_BxTxD` must have last dim d_model={cfg.d_model}, "
                     f"got shape {x_BxTxD.shape}.")
  positions = jnp.arange(x_BxTxD.shape[1])
  q = jnp.einsum("btd,dhk->bthk", x_BxTxD, params["wq"])
  k = jnp.einsum("btd,dhk->bthk", x_BxTxD, params["wk"])
  v = jnp.einsum("btd,dhk->bthk", x_BxTxD, params["wv"])
  return (apply_rope(q, positions, cfg.rope_theta),
          apply_rope(k, positions, cfg.rope_theta), v)


def attention_layer(params, x_BxTxD, cfg: AttentionConfig):
  """Causal self-attention `[batch, seq, d_model] -> [batch, seq, d_model]`.

  With neither `window` nor a MoA rule it is dense causal attention; with
  them, each head sees its window (plus the sink). Windows derive from the
  static sequence length, so they are concrete under `jit`.

  Example:
    >>> cfg = AttentionConfig(32, 4, 2, 8, window=16)
    >>> params = init_attention(jax.random.key(0), cfg)
    >>> attention_layer(params, jnp.ones((1, 40, 32)), cfg).shape
    (1, 40, 32)
  """
  q, k, v = _qkv(params, x_BxTxD, cfg)
  windows = cfg.windows(x_BxTxD.shape[1])
  if windows is None:
    o = ops.attention(q, k, v, block_size=cfg.block_size, impl=cfg.impl)
  else:
    o = ops.moa_attention(
        q, k, v, windows, sink=cfg.sink, block_size=cfg.block_size,
        impl="blocked" if cfg.impl == "blocked" else "dense")
  return jnp.einsum("bthk,hkd->btd", o, params["wo"])


def attention_layer_probed(params, x_BxTxD, cfg: AttentionConfig,
                           probe_BxHxTxT):
  """The layer with its attention weights exposed, for MoA profiling.

  Computes A (the masked softmax, reference impl) and uses `A + probe` as the
  weights, so the gradient with respect to `probe` is dL/dA.

  Returns:
    `(y [batch, seq, d_model], A [batch, heads, seq, seq] fp32)`.
  """
  q, k, v = _qkv(params, x_BxTxD, cfg)
  seq = x_BxTxD.shape[1]
  windows = cfg.windows(seq)
  mask = (ops.causal_mask(seq, seq) if windows is None
          else ops.moa_mask(windows, seq, cfg.sink))
  a = ops.attention_weights(q, k, mask)
  o = ops.attention_lib.weighted_values(a + probe_BxHxTxT, v).astype(q.dtype)
  return jnp.einsum("bthk,hkd->btd", o, params["wo"]), a
