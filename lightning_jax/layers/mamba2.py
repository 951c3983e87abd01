"""Mamba-2 (Dao & Gu, 2024, "Transformers are SSMs", arXiv 2405.21060), the
"mamba2" token mixer, on `ops.linear_attention`.

Per head h (d_inner = H * P channels, G groups of B / C, state size N):

    z, xBC, dt = x in_proj                    [d_inner], [d_inner + 2GN], [H]
    x, B, C = SiLU(causal depthwise conv1d(xBC) + bias)
    dt = softplus(dt + dt_bias),   A = -exp(A_log)
    S_t = exp(dt_t A) S_{t-1} + B_t (x_t dt_t)^T          S in R^{N x P}
    y_t = S_t^T C_t + D x_t
    out = RMSNorm(y * SiLU(z)) out_proj        (gated norm, norm after gate)

i.e. SSD is `linear_attention(q=C, k=B, v=x dt, log_decay=dt A, scale=1)`
with B and C shared by the heads of a group. Parameter names follow
mamba_ssm's `Mamba2` in the JAX `[in, out]` layout: from a mamba_ssm
state_dict, `in_proj = in_proj.weight.T`, `conv1d = {"weight":
conv1d.weight[:, 0].T, "bias": conv1d.bias}`, `out_proj =
out_proj.weight.T`, `norm = {"scale": norm.weight}`; `A_log`, `dt_bias`, `D`
as they are. Init as mamba_ssm: A ~ U[1, 16], dt = exp(U[log 1e-3,
log 1e-1]) >= 1e-4 stored as softplus^-1, D = 1, conv weights normal with
std K^-1/2 (mamba_ssm keeps torch's uniform Conv1d default; same variance
order). The gated norm here normalises all d_inner channels (mamba_ssm's
`ngroups=1` default).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from lightning_jax import _checks
from lightning_jax import ops
from lightning_jax.layers import mixers
from lightning_jax.layers import norms
from lightning_jax.layers.mlp import dense_init
from lightning_jax.layers.recurrent import recur
from lightning_jax.layers.recurrent import RecurrentState
from lightning_jax.layers.recurrent import short_conv


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
  """Mamba-2 mixer hyper-parameters.

  Attributes:
    d_model: model width D.
    num_heads: heads H.
    head_dim: channels P per head (d_inner = H * P).
    state_dim: SSM state size N.
    num_groups: groups G sharing B and C (dividing H).
    conv_size: depthwise conv kernel K (>= 2).
    chunk_size: chunk of the chunked kernel.
    impl: "chunked", "recurrent" or "auto" (`mixers.recurrent_impl`).
    norm_eps: epsilon of the gated RMSNorm.
  """

  d_model: int
  num_heads: int
  head_dim: int
  state_dim: int = 64
  num_groups: int = 1
  conv_size: int = 4
  chunk_size: int = 64
  impl: str = "chunked"
  norm_eps: float = 1e-6

  def __post_init__(self):
    for name in (
      "d_model",
      "num_heads",
      "head_dim",
      "state_dim",
      "num_groups",
      "chunk_size",
    ):
      _checks.check_positive_int(name, getattr(self, name))
    if self.num_heads % self.num_groups:
      raise ValueError(
        f"`num_groups` ({self.num_groups}) must divide "
        f"`num_heads` ({self.num_heads})."
      )
    if self.conv_size < 2:
      raise ValueError(f"`conv_size` must be >= 2, got {self.conv_size}.")
    _checks.check_choice("impl", self.impl, mixers.RECURRENT_IMPLS)

  @property
  def d_inner(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def conv_dim(self) -> int:
    return self.d_inner + 2 * self.num_groups * self.state_dim


def init_mamba2(
  key, cfg: Mamba2Config, *, layer: int = 0, num_layers: int = 1
) -> dict:
  """Params `in_proj: [D, 2 d_inner + 2GN + H]`, `conv1d: {"weight": [K,
  conv_dim], "bias": [conv_dim]}`, `A_log, dt_bias, D: [H]`, `norm:
  {"scale": [d_inner]}`, `out_proj: [d_inner, D]`."""
  del layer, num_layers
  keys = jax.random.split(key, 5)
  h = cfg.num_heads
  dt = jnp.exp(
    jax.random.uniform(
      keys[3], (h,), minval=math.log(1e-3), maxval=math.log(1e-1)
    )
  )
  dt = jnp.maximum(dt, 1e-4)
  return {
    "in_proj": dense_init(
      keys[0], (cfg.d_model, cfg.d_inner + cfg.conv_dim + h), jnp.float32
    ),
    "conv1d": {
      "weight": jax.random.normal(keys[1], (cfg.conv_size, cfg.conv_dim))
      * cfg.conv_size**-0.5,
      "bias": jnp.zeros((cfg.conv_dim,)),
    },
    "A_log": jnp.log(jax.random.uniform(keys[2], (h,), minval=1, maxval=16)),
    "dt_bias": dt + jnp.log(-jnp.expm1(-dt)),
    "D": jnp.ones((h,)),
    "norm": norms.init_rms_norm(cfg.d_inner),
    "out_proj": dense_init(keys[4], (cfg.d_inner, cfg.d_model), jnp.float32),
  }


def init_mamba2_state(
  cfg: Mamba2Config, batch: int, max_len: int = 0, dtype=jnp.float32
) -> RecurrentState:
  """Zero SSM state `[B, H, N, P]` and conv tail `[B, K - 1, 1, conv_dim]`."""
  del max_len  # O(1) in the context length
  return RecurrentState(
    jnp.zeros((batch, cfg.num_heads, cfg.state_dim, cfg.head_dim), jnp.float32),
    {"xBC": jnp.zeros((batch, cfg.conv_size - 1, 1, cfg.conv_dim), dtype)},
  )


def mamba2_layer(
  params,
  x_BxTxD,
  cfg: Mamba2Config,
  state: RecurrentState | None = None,
  decoding: mixers.Decoding | None = None,
):
  """The Mamba-2 mixer `[batch, seq, d_model] -> [batch, seq, d_model]`,
  with the contract of `layers.mixers`.

  Returns:
    `(y in x's dtype, RecurrentState after the last real token)`.

  Example:
    >>> cfg = Mamba2Config(32, 4, 8, state_dim=16)
    >>> p = init_mamba2(jax.random.key(0), cfg)
    >>> mamba2_layer(p, jnp.ones((2, 5, 32)), cfg)[0].shape
    (2, 5, 32)
  """
  _checks.check_rank("x_BxTxD", x_BxTxD, 3, "[batch, seq, d_model]")
  batch, seq = x_BxTxD.shape[:2]
  _checks.check_shape(
    "x_BxTxD", x_BxTxD, (batch, seq, cfg.d_model), "[batch, seq, d_model]"
  )
  if state is None and decoding is None:
    axis = ops.sequence_axis(seq)
    if axis is not None:
      mix = functools.partial(_sequence_parallel_mix, cfg=cfg, axis_name=axis)
      return ops.map_sequence(mix, params, x_BxTxD, axis), None
  if state is None:
    state = init_mamba2_state(cfg, batch, dtype=x_BxTxD.dtype)
  valid, unshift = None, lambda y: y
  if decoding is not None and seq > 1:
    x_BxTxD, valid, unshift = mixers.left_align(x_BxTxD, decoding.lengths_B)
  kw = dict(
    initial_state=state.ssm,
    output_final_state=True,
    chunk_size=cfg.chunk_size,
    impl=mixers.recurrent_impl(cfg.impl, seq, decoding),
  )
  tail = lambda u: state.conv["xBC"]
  out, ssm, tail = _mix(params, x_BxTxD, cfg, tail, valid, kw)
  return unshift(out), RecurrentState(ssm, {"xBC": tail})


def _sequence_parallel_mix(params, x_BxLxD, cfg: Mamba2Config, axis_name):
  """One device's chunk of a training forward split over `axis_name`: the
  conv's K - 1 inputs before the chunk from the previous devices."""
  halo = lambda u: ops.previous_tokens(u, cfg.conv_size - 1, axis_name)
  kw = dict(
    output_final_state=True, chunk_size=cfg.chunk_size, axis_name=axis_name
  )
  return _mix(params, x_BxLxD, cfg, halo, None, kw)[0]


def _mix(params, x_BxTxD, cfg: Mamba2Config, tail, valid, kw):
  """The mixer, `tail(u [B, T, 1, conv_dim])` giving the K - 1 conv inputs
  before x: `(y, ssm, new conv tail)`."""
  batch, seq = x_BxTxD.shape[:2]
  h, p, g, n = cfg.num_heads, cfg.head_dim, cfg.num_groups, cfg.state_dim
  proj = jnp.einsum("btd,de->bte", x_BxTxD, params["in_proj"])
  z, xbc, dt = jnp.split(proj, [cfg.d_inner, cfg.d_inner + cfg.conv_dim], -1)
  xbc = xbc[:, :, None]
  xbc, tail = short_conv(
    params["conv1d"]["weight"][:, None],
    xbc,
    tail(xbc),
  )
  xbc = jax.nn.silu(
    xbc[:, :, 0] + params["conv1d"]["bias"].astype(xbc.dtype)[None, None]
  )
  x, b, c = jnp.split(xbc, [cfg.d_inner, cfg.d_inner + g * n], -1)
  x = x.reshape(batch, seq, h, p)
  per_group = lambda u: jnp.repeat(u.reshape(batch, seq, g, n), h // g, 2)
  dt = jax.nn.softplus(
    dt.astype(jnp.float32) + params["dt_bias"][None, None]
  )  # [B, T, H]
  v = x.astype(jnp.float32) * dt[..., None]
  if valid is not None:
    v = jnp.where(valid[:, :, None, None], v, 0)
  y, ssm = recur(
    ops.linear_attention,
    per_group(c),
    per_group(b),
    v.astype(x.dtype),
    dt * -jnp.exp(params["A_log"])[None, None],
    scale=1.0,
    **kw,
  )
  y = y + params["D"].astype(y.dtype)[None, None, :, None] * x
  y = y.reshape(batch, seq, cfg.d_inner) * jax.nn.silu(z)
  y = norms.rms_norm(params["norm"], y, cfg.norm_eps)
  out = jnp.einsum("bte,ed->btd", y.astype(x_BxTxD.dtype), params["out_proj"])
  return out.astype(x_BxTxD.dtype), ssm, tail


def _config(spec: mixers.LayerSpec) -> Mamba2Config:
  m = spec.model
  return mixers.with_options(
    Mamba2Config(
      m.d_model,
      spec.num_heads,
      m.head_dim,
      conv_size=max(m.conv_size, 2),
      chunk_size=m.chunk_size,
      impl=m.recurrent_impl,
      norm_eps=m.norm_eps,
    ),
    spec.options,
  )


def _flops(cfg, seq_len: int) -> float:
  """`5 H N P`: decay the state, add `B x^T`, read `C^T S` (O(1) in T)."""
  del seq_len
  return float(5 * cfg.num_heads * cfg.state_dim * cfg.head_dim)


MAMBA2 = mixers.register(
  mixers.Mixer(
    name="mamba2",
    config=_config,
    init=init_mamba2,
    apply=mamba2_layer,
    empty_state=init_mamba2_state,
    flops=_flops,
    rules=(
      (("in_proj",), ("embed", None)),  # fused z / xBC / dt
      (("conv1d", "weight"), (None, None)),
      (("conv1d", "bias"), (None,)),
      (("A_log",), ("heads",)),
      (("dt_bias",), ("heads",)),
      (("D",), ("heads",)),
      (("norm", "scale"), (None,)),
      (("out_proj",), (None, "embed")),
    ),
    doc="Mamba-2 (arXiv 2405.21060): SSD with a per-head data-dependent "
    "scalar decay, D skip, short conv, gated RMSNorm.",
    preset={"num_layers": 4, "mixer_options": ("mamba2.state_dim=32",)},
  )
)
