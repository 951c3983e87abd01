"""cosFormer2 (Shen et al., 2024, "Scaling Laws for Linear Complexity
Language Models", arXiv 2406.16690), the "cosformer2" token mixer, on
`ops.linear_attention` without decay.

The paper's "linear attention model without decay": cosFormer (Qin et al.,
2022, arXiv 2202.08791) with (Sec. 2.2) 1. a per-channel cos reweighting by
complex LRPE (Qin et al., 2023, arXiv 2307.09270), 2. TPE (Qin et al., 2024,
arXiv 2405.21022) on the embeddings, 3. TNL's low-rank sigmoid output gate,
4. a normalisation of the output instead of cosFormer's denominator. Its
token mixer (App. A.1.4, Eq. 17), per head h with t the 0-based position:

    q_t, k_t, v_t = SiLU(x_t W_q), SiLU(x_t W_k), x_t W_v        [Dk], [Dv]
    q~_t = [q_t cos(theta_h t), q_t sin(theta_h t)]   (elementwise, [2 Dk])
    k~_t = [k_t cos(theta_h t), k_t sin(theta_h t)]
    S_t = S_{t-1} + k~_t v_t^T,     o_t = S_t^T q~_t    (no decay, no scale)
    g_t = sigmoid(x_t W_gd W_gu)                        (rank r, [H Dv])
    y_t = (SRMSNorm(concat_h o_t) * g_t) W_o

so `o_t = sum_{s <= t} sum_j q_tj k_sj cos(theta_hj (t - s)) v_s`: the cos
reweighting of every key channel j by the relative distance, exactly a
decay-free linear recurrence on the doubled key width 2 Dk. Shapes: x
`[B, T, D]`, state `S [B, H, 2 Dk, Dv]` fp32 plus `position [B]` int32 (the
tokens seen, so that decode steps continue the angles).

choice: TPE is not part of the mixer: the paper applies it once to the
  embeddings (App. A.1.4, "X = Tpe(X)"), a model-level block this registry
  has no hook for; the mixer alone is the per-layer Eq. 17.
choice: theta is a learnable param `lrpe_theta [H Dk]` (the paper's "Lrpe
  parameter of head i"), initialised to RoPE-style frequencies
  `base^(-2 (h Dk + j) / (H Dk))` over all H Dk channels (base 10000);
  1-D, so the decay-only-matrices mask leaves it alone.
choice: Norm is SRMSNorm (TNL, arXiv 2307.14995; no scale param) over the
  concatenated H Dv channels, then the gate (Norm(.) * G, as TNL).
choice: the gate reads the mixer input (the block's pre-normed x); its rank
  r (`gate_rank`) defaults to `head_dim` (the paper's t = d / h).
choice: f = SiLU (App. A.1: "f is the swish function"); v has no
  activation; Dv = Dk = `head_dim`.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax import ops
from lightning_jax.layers import mixers
from lightning_jax.layers import norms
from lightning_jax.layers.mlp import dense_init
from lightning_jax.layers.recurrent import mask_values
from lightning_jax.layers.recurrent import recur


@dataclasses.dataclass(frozen=True)
class CosFormer2Config:
  """cosFormer2 mixer hyper-parameters.

  Attributes:
    d_model: model width D.
    num_heads: heads H.
    head_dim: key and value width per head (the state is `[2 Dk, Dv]`).
    gate_rank: bottleneck r of the output gate; None: `head_dim`.
    lrpe_base: base of the initial LRPE frequencies.
    chunk_size: chunk of the chunked kernel.
    impl: "chunked", "recurrent" or "auto" (`mixers.recurrent_impl`).
    norm_eps: epsilon of the output SRMSNorm.
  """

  d_model: int
  num_heads: int
  head_dim: int
  gate_rank: int | None = None
  lrpe_base: float = 10_000.0
  chunk_size: int = 64
  impl: str = "chunked"
  norm_eps: float = 1e-6

  def __post_init__(self):
    for name in ("d_model", "num_heads", "head_dim", "chunk_size"):
      _checks.check_positive_int(name, getattr(self, name))
    if self.gate_rank is not None:
      _checks.check_positive_int("gate_rank", self.gate_rank)
    if not self.lrpe_base > 1:
      raise ValueError(f"`lrpe_base` must be > 1, got {self.lrpe_base}.")
    _checks.check_choice("impl", self.impl, mixers.RECURRENT_IMPLS)

  @property
  def rank(self) -> int:
    return self.gate_rank or self.head_dim


class CosFormer2State(NamedTuple):
  """Decoding state of a cosFormer2 mixer.

  Attributes:
    ssm: `[batch, heads, 2 head_dim, head_dim]` float32 recurrence state.
    position: `[batch]` int32, tokens seen (the next token's position).
  """

  ssm: jax.Array
  position: jax.Array


def init_cosformer2(
  key, cfg: CosFormer2Config, *, layer: int = 0, num_layers: int = 1
) -> dict:
  """Params `wq, wk, wv: [D, H, Dk]`, `wg_down: [D, r]`, `wg_up: [r, H,
  Dk]`, `wo: [H, Dk, D]`, `lrpe_theta: [H Dk]`."""
  del layer, num_layers
  d, h, c, r = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.rank
  keys = jax.random.split(key, 6)
  proj = lambda k, shape: dense_init(k, shape, jnp.float32)
  exponent = -2.0 * np.arange(h * c) / (h * c)
  return {
    "wq": proj(keys[0], (d, h * c)).reshape(d, h, c),
    "wk": proj(keys[1], (d, h * c)).reshape(d, h, c),
    "wv": proj(keys[2], (d, h * c)).reshape(d, h, c),
    "wg_down": proj(keys[3], (d, r)),
    "wg_up": proj(keys[4], (r, h * c)).reshape(r, h, c),
    "wo": proj(keys[5], (h * c, d)).reshape(h, c, d),
    "lrpe_theta": jnp.asarray(cfg.lrpe_base**exponent, jnp.float32),
  }


def init_cosformer2_state(
  cfg: CosFormer2Config, batch: int, max_len: int = 0, dtype=jnp.float32
) -> CosFormer2State:
  """Zero state `[B, H, 2 Dk, Dk]` at position 0 (a fresh sequence)."""
  del max_len, dtype  # O(1) in the context length; the state is fp32
  h, c = cfg.num_heads, cfg.head_dim
  return CosFormer2State(
    jnp.zeros((batch, h, 2 * c, c), jnp.float32),
    jnp.zeros((batch,), jnp.int32),
  )


def _fresh_state(x_BxTxD, cfg: CosFormer2Config) -> CosFormer2State:
  """The zero state built from the input (varies like it under
  `shard_map`)."""
  zero_B = jnp.zeros_like(x_BxTxD[:, 0, 0], jnp.float32)
  h, c = cfg.num_heads, cfg.head_dim
  ssm = jnp.broadcast_to(
    zero_B[:, None, None, None], (len(zero_B), h, 2 * c, c)
  )
  return CosFormer2State(ssm, zero_B.astype(jnp.int32))


def lrpe(u_BxTxHxC, theta_HxC, position_BxT):
  """Complex LRPE as a real feature map: `[u cos(theta t), u sin(theta t)]`
  on the last axis (`[B, T, H, 2C]` in u's dtype), so that `lrpe(q, ., t) .
  lrpe(k, ., s) = sum_j q_j k_j cos(theta_j (t - s))`."""
  angle = (
    position_BxT.astype(jnp.float32)[:, :, None, None] * theta_HxC[None, None]
  )
  u = u_BxTxHxC.astype(jnp.float32)
  out = jnp.concatenate([u * jnp.cos(angle), u * jnp.sin(angle)], -1)
  return out.astype(u_BxTxHxC.dtype)


def cosformer2_layer(
  params,
  x_BxTxD,
  cfg: CosFormer2Config,
  state: CosFormer2State | None = None,
  decoding: mixers.Decoding | None = None,
):
  """The cosFormer2 mixer `[batch, seq, d_model] -> [batch, seq, d_model]`,
  with the contract of `layers.mixers`.

  Args:
    params: from `init_cosformer2`.
    x_BxTxD: `[batch, seq, d_model]` (any seq length; 1 to decode a token).
    cfg: the `CosFormer2Config`.
    state: `CosFormer2State` to continue from; None: a fresh sequence.
    decoding: prefill / step context; with `seq > 1` the rows are right
      padded to `decoding.lengths_B`.

  Returns:
    `(y in x's dtype, CosFormer2State after the last real token)`.
    Splitting a sequence and carrying the state gives the result of one
    call.

  Raises:
    ValueError: `x_BxTxD` or `state` of the wrong shape.

  Example:
    >>> cfg = CosFormer2Config(32, 4, 8)
    >>> p = init_cosformer2(jax.random.key(0), cfg)
    >>> y, s = cosformer2_layer(p, jnp.ones((2, 5, 32)), cfg)
    >>> y.shape, s.ssm.shape, s.position.tolist()
    ((2, 5, 32), (2, 4, 16, 8), [5, 5])
  """
  _checks.check_rank("x_BxTxD", x_BxTxD, 3, "[batch, seq, d_model]")
  batch, seq = x_BxTxD.shape[:2]
  _checks.check_shape(
    "x_BxTxD", x_BxTxD, (batch, seq, cfg.d_model), "[batch, seq, d_model]"
  )
  h, c = cfg.num_heads, cfg.head_dim
  if state is None and decoding is None:
    axis = ops.sequence_axis(seq)
    if axis is not None:
      mix = functools.partial(_sequence_parallel_mix, cfg=cfg, axis_name=axis)
      return ops.map_sequence(mix, params, x_BxTxD, axis), None
  if state is None:
    state = _fresh_state(x_BxTxD, cfg)
  _checks.check_shape(
    "state.ssm",
    state.ssm,
    (batch, h, 2 * c, c),
    "[batch, heads, 2 head_dim, head_dim]",
  )
  _checks.check_shape("state.position", state.position, (batch,), "[batch]")
  start_B = jnp.asarray(state.position, jnp.int32)
  position_BxT = start_B[:, None] + jnp.arange(seq, dtype=jnp.int32)[None]
  end_B = start_B + seq
  valid, unshift = None, lambda y: y
  if decoding is not None and seq > 1:
    lengths_B = jnp.asarray(decoding.lengths_B, jnp.int32)
    x_BxTxD, valid, unshift = mixers.left_align(x_BxTxD, lengths_B)
    position_BxT = position_BxT - (seq - lengths_B)[:, None]  # < 0: padding
    end_B = start_B + lengths_B
  kw = dict(
    initial_state=state.ssm,
    output_final_state=True,
    chunk_size=cfg.chunk_size,
    impl=mixers.recurrent_impl(cfg.impl, seq, decoding),
  )
  y, ssm = _mix(params, x_BxTxD, cfg, position_BxT, valid, kw)
  return unshift(y), CosFormer2State(ssm, end_B)


def _sequence_parallel_mix(params, x_BxLxD, cfg: CosFormer2Config, axis_name):
  """One device's chunk of a training forward split over `axis_name`, LRPE
  at the global positions."""
  local = x_BxLxD.shape[1]
  start = jax.lax.axis_index(axis_name) * local
  position_BxL = jnp.broadcast_to(
    start + jnp.arange(local, dtype=jnp.int32), x_BxLxD.shape[:2]
  )
  kw = dict(
    output_final_state=True, chunk_size=cfg.chunk_size, axis_name=axis_name
  )
  return _mix(params, x_BxLxD, cfg, position_BxL, None, kw)[0]


def _mix(params, x_BxTxD, cfg: CosFormer2Config, position_BxT, valid, kw):
  """Projections, LRPE, the recurrence and the gated output: `(y, ssm)`."""
  batch, seq = x_BxTxD.shape[:2]
  h, c = cfg.num_heads, cfg.head_dim
  proj = lambda w: jnp.einsum("btd,dhc->bthc", x_BxTxD, params[w])
  theta = params["lrpe_theta"].reshape(h, c).astype(jnp.float32)
  q = lrpe(jax.nn.silu(proj("wq")), theta, position_BxT)
  k = lrpe(jax.nn.silu(proj("wk")), theta, position_BxT)
  o, ssm = recur(
    ops.linear_attention,
    q,
    k,
    mask_values(proj("wv"), valid),
    None,
    scale=1.0,
    **kw,
  )
  o = norms.simple_rms_norm(o.reshape(batch, seq, h * c), cfg.norm_eps)
  low = jnp.einsum("btd,dr->btr", x_BxTxD, params["wg_down"])
  gate = jax.nn.sigmoid(jnp.einsum("btr,rhc->bthc", low, params["wg_up"]))
  o = o.reshape(batch, seq, h, c) * gate.astype(o.dtype)
  y = jnp.einsum("bthc,hcd->btd", o.astype(x_BxTxD.dtype), params["wo"])
  return y.astype(x_BxTxD.dtype), ssm


def _config(spec: mixers.LayerSpec) -> CosFormer2Config:
  m = spec.model
  return mixers.with_options(
    CosFormer2Config(
      m.d_model,
      spec.num_heads,
      m.head_dim,
      chunk_size=m.chunk_size,
      impl=m.recurrent_impl,
      norm_eps=m.norm_eps,
    ),
    spec.options,
  )


def _flops(cfg, seq_len: int) -> float:
  """`4 H (2 Dk) Dv`: a decay-free linear attention on the LRPE features of
  width 2 Dk (O(1) in T)."""
  del seq_len
  return float(4 * cfg.num_heads * 2 * cfg.head_dim * cfg.head_dim)


COSFORMER2 = mixers.register(
  mixers.Mixer(
    name="cosformer2",
    config=_config,
    init=init_cosformer2,
    apply=cosformer2_layer,
    empty_state=init_cosformer2_state,
    flops=_flops,
    rules=(
      (("wq",), ("embed", "heads", "head_dim")),
      (("wk",), ("embed", "heads", "head_dim")),
      (("wv",), ("embed", "heads", "head_dim")),
      (("wg_down",), ("embed", None)),
      (("wg_up",), (None, "heads", "head_dim")),
      (("wo",), ("heads", "head_dim", "embed")),
      (("lrpe_theta",), (None,)),  # [H Dk], replicated (tiny)
    ),
    doc="cosFormer2 (arXiv 2406.16690): decay-free linear attention with a "
    "per-channel LRPE cos reweighting, SRMSNorm, low-rank sigmoid gate.",
    preset={"num_layers": 4},
  )
)
