"""Linear-recurrence token mixers: Lightning (TNL), DeltaNet, Gated DeltaNet
and HGRN2, as `init_recurrent` / `recurrent_layer`.

Every mixer projects `x [batch, seq, d_model]` to per-head q / k / v,
runs a recurrence of `lightning_jax.ops` on an fp32 state
`[batch, heads, key_dim, value_dim]`, normalises each head's output and
projects back. The recurrence state and the short-convolution tail are
returned, so the same function serves training (chunked, state discarded),
prefill and token-by-token decoding.

- `lightning`: TransNormerLLM / Lightning Attention (Qin et al., 2023,
  arXiv 2307.14995; 2024, arXiv 2401.04658): q, k = SiLU(x W), fixed
  per-head decays `ops.tnl_log_decay(layer, num_layers)`, SRMSNorm per head,
  sigmoid output gate (as MiniMax-01, arXiv 2501.08313).
- `deltanet`: DeltaNet (Yang et al., 2024, arXiv 2406.06484): q, k, v =
  SiLU(short conv(x W)), q and k L2-normalised per head, beta = sigmoid(x W_b),
  RMSNorm per head.
- `gated_deltanet`: Gated DeltaNet (Yang et al., 2024, arXiv 2412.06464):
  DeltaNet plus the gate log a_t = -exp(A_log) * softplus(x W_a + dt_bias)
  and a SiLU output gate.
- `hgrn2`: HGRN2 (Qin et al., 2024, arXiv 2404.07904): forget gate
  f = gamma + (1 - gamma) sigmoid(x W_f) with lower bound gamma, key 1 - f,
  gated linear attention, RMSNorm per head and a SiLU output gate. HGRN2
  learns its lower bounds as a cumulative softmax over layers; here
  gamma_l = l / L is fixed, keeping layers independent.

Per-layer constants (TNL decays, the HGRN2 lower bound) are arrays in the
params used under `stop_gradient`: layers of one kind share one static
config and one param structure, so they stack (e.g. into pipeline stages).
They are 1-D or scalars, so the usual "decay only matrices" mask leaves
them alone.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax import ops
from lightning_jax.layers import norms
from lightning_jax.layers.mlp import dense_init

KINDS = ("lightning", "deltanet", "gated_deltanet", "hgrn2")
IMPLS = ("chunked", "recurrent")
# The projections that feed the recurrence, shifted by the short conv.
_STREAMS = {"lightning": ("q", "k", "v"), "deltanet": ("q", "k", "v"),
            "gated_deltanet": ("q", "k", "v"), "hgrn2": ("q", "f", "v")}


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
  """Linear-recurrence mixer hyper-parameters.

  Attributes:
    kind: one of `KINDS`.
    d_model: model width D.
    num_heads: heads H.
    head_dim: key width Dk per head.
    value_dim: value width Dv per head (default `head_dim`).
    conv_size: kernel (>= 2) of the causal depthwise short convolution on
      the q / k / v streams (q / f / v for HGRN2); 0 disables it.
    chunk_size: chunk length of the chunked kernels.
    impl: "chunked" or "recurrent" (the ops' reference scan).
    norm_eps: epsilon of the per-head output norm.
  """
  kind: str
  d_model: int
  num_heads: int
  head_dim: int
  value_dim: int | None = None
  conv_size: int = 0
  chunk_size: int = 64
  impl: str = "chunked"
  norm_eps: float = 1e-6

  def __post_init__(self):
    _checks.check_choice("kind", self.kind, KINDS)
    for name in ("d_model", "num_heads", "head_dim", "chunk_size"):
      _checks.check_positive_int(name, getattr(self, name))
    if self.value_dim is not None:
      _checks.check_positive_int("value_dim", self.value_dim)
    if self.conv_size < 0 or self.conv_size == 1:
      raise ValueError(
          f"`conv_size` must be 0 (no conv) or >= 2, got {self.conv_size}.")
    _checks.check_choice("impl", self.impl, IMPLS)

  @property
  def dv(self) -> int:
    return self.value_dim or self.head_dim

  def stream_dims(self) -> dict:
    """Width per head of each conv stream."""
    return {s: self.dv if s == "v" else self.head_dim
            for s in _STREAMS[self.kind]}


class RecurrentState(NamedTuple):
  """Decoding state of a recurrent mixer.

  Attributes:
    ssm: `[batch, heads, key_dim, value_dim]` float32 recurrence state.
    conv: `{stream: [batch, conv_size - 1, heads, width]}` the last inputs of
      each short conv (empty without a conv).
  """
  ssm: jax.Array
  conv: dict


def init_recurrent_state(cfg: RecurrentConfig, batch: int,
                         dtype=jnp.float32) -> RecurrentState:
  """The zero state (a fresh sequence), conv tails in `dtype`."""
  tails = {} if not cfg.conv_size else {
      s: jnp.zeros((batch, cfg.conv_size - 1, cfg.num_heads, c), dtype)
      for s, c in cfg.stream_dims().items()}
  return RecurrentState(
      jnp.zeros((batch, cfg.num_heads, cfg.head_dim, cfg.dv), jnp.float32),
      tails)


def init_recurrent(key, cfg: RecurrentConfig, *, layer_idx: int,
                   num_layers: int) -> dict:
  """Mixer params: `w<s>: [D, H, width]` per stream, `wo: [H, Dv, D]`,
  `conv_<s>: [conv_size, H, width]`, and per kind `wg: [D, H, Dv]`,
  `wb`, `wa: [D, H]`, `a_log`, `dt_bias`, `log_decay: [H]`,
  `lower_bound: []`, `out_norm: {"scale": [Dv]}`.

  Args:
    key: PRNG key.
    cfg: the `RecurrentConfig`.
    layer_idx: 0-based index of the layer (TNL decays, HGRN2 lower bound).
    num_layers: number of layers of the model.

  Example:
    >>> cfg = RecurrentConfig("deltanet", 32, 4, 8, conv_size=4)
    >>> init_recurrent(jax.random.key(0), cfg, layer_idx=0, num_layers=2
    ...                )["conv_q"].shape
    (4, 4, 8)
  """
  d, h, dv = cfg.d_model, cfg.num_heads, cfg.dv
  keys = iter(jax.random.split(key, 16))
  proj = lambda width: dense_init(next(keys), (d, h * width),
                                  jnp.float32).reshape(d, h, width)
  params = {f"w{s}": proj(c) for s, c in cfg.stream_dims().items()}
  params["wo"] = dense_init(next(keys), (h * dv, d), jnp.float32).reshape(
      h, dv, d)
  if cfg.conv_size:
    for s, c in cfg.stream_dims().items():
      params[f"conv_{s}"] = jax.random.normal(
          next(keys), (cfg.conv_size, h, c)) * cfg.conv_size ** -0.5
  if cfg.kind != "deltanet":
    params["wg"] = proj(dv)
  if cfg.kind == "lightning":
    params["log_decay"] = ops.tnl_log_decay(layer_idx, num_layers, h)
    return params
  params["out_norm"] = norms.init_rms_norm(dv)
  if cfg.kind in ("deltanet", "gated_deltanet"):
    params["wb"] = proj(1)[..., 0]
  if cfg.kind == "gated_deltanet":
    params["wa"] = proj(1)[..., 0]
    # Mamba-2 style: A in [1, 16], dt log-uniform in [1e-3, 0.1].
    params["a_log"] = jnp.log(jax.random.uniform(next(keys), (h,), minval=1,
                                                 maxval=16))
    dt = jnp.exp(jax.random.uniform(next(keys), (h,), minval=np.log(1e-3),
                                    maxval=np.log(0.1)))
    params["dt_bias"] = dt + jnp.log(-jnp.expm1(-dt))  # softplus^-1(dt)
  if cfg.kind == "hgrn2":
    params["lower_bound"] = jnp.float32(layer_idx / num_layers)
  return params


def short_conv(w_KxHxC, x_BxTxHxC, tail_BxKm1xHxC):
  """Causal depthwise convolution along time with a carried input tail.

  `y_t = sum_j w_j x_{t - K + 1 + j}`, the inputs before the sequence taken
  from `tail` (the previous K - 1 inputs; zeros for a fresh sequence).

  Returns:
    `(y [B, T, H, C] in x's dtype, new tail [B, K - 1, H, C])`.
  """
  size, seq = w_KxHxC.shape[0], x_BxTxHxC.shape[1]
  padded = jnp.concatenate([tail_BxKm1xHxC.astype(x_BxTxHxC.dtype), x_BxTxHxC],
                           axis=1)
  w = w_KxHxC.astype(jnp.float32)
  y = sum(w[None, None, j] * padded[:, j:j + seq].astype(jnp.float32)
          for j in range(size))
  return y.astype(x_BxTxHxC.dtype), padded[:, seq:]


def _l2_normalize(x, eps=1e-6):
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, -1, keepdims=True) + eps)
          ).astype(x.dtype)


def _streams(params, x_BxTxD, cfg, state):
  """Projected (and short-convolved) streams, and the new conv tails."""
  streams, tails = {}, {}
  for s in _STREAMS[cfg.kind]:
    u = jnp.einsum("btd,dhc->bthc", x_BxTxD, params[f"w{s}"])
    if cfg.conv_size:
      u, tails[s] = short_conv(params[f"conv_{s}"], u, state.conv[s])
    streams[s] = u
  return streams, tails


def _gate(params, x_BxTxD, name):
  return jnp.einsum("btd,dh->bth", x_BxTxD, params[name]).astype(jnp.float32)


def recurrent_layer(params: dict, x_BxTxD, cfg: RecurrentConfig,
                    state: RecurrentState | None = None):
  """A linear-recurrence mixer `[batch, seq, d_model] -> [batch, seq, d_model]`.

  Args:
    params: from `init_recurrent`.
    x_BxTxD: `[batch, seq, d_model]` (any seq length; 1 to decode a token).
    cfg: the `RecurrentConfig`.
    state: `RecurrentState` to continue from, None for a fresh sequence.

  Returns:
    `(y [batch, seq, d_model] in x's dtype, RecurrentState after the last
    token)`. Splitting a sequence and carrying the state gives the result of
    one call.

  Raises:
    ValueError: `x_BxTxD` or `state` of the wrong shape.

  Example:
    >>> cfg = RecurrentConfig("gated_deltanet", 32, 4, 8, conv_size=4)
    >>> p = init_recurrent(jax.random.key(0), cfg, layer_idx=0, num_layers=1)
    >>> y, s = recurrent_layer(p, jnp.ones((2, 5, 32)), cfg)
    >>> y.shape, s.ssm.shape
    ((2, 5, 32), (2, 4, 8, 8))
  """
  _checks.check_rank("x_BxTxD", x_BxTxD, 3, "[batch, seq, d_model]")
  batch = x_BxTxD.shape[0]
  _checks.check_shape("x_BxTxD", x_BxTxD, x_BxTxD.shape[:2] + (cfg.d_model,),
                      "[batch, seq, d_model]")
  if state is None:
    state = init_recurrent_state(cfg, batch, x_BxTxD.dtype)
  s, tails = _streams(params, x_BxTxD, cfg, state)
  kw = dict(initial_state=state.ssm, output_final_state=True,
            chunk_size=cfg.chunk_size, impl=cfg.impl)
  if cfg.kind == "lightning":
    o, ssm = ops.linear_attention(
        jax.nn.silu(s["q"]), jax.nn.silu(s["k"]), s["v"],
        jax.lax.stop_gradient(params["log_decay"]), **kw)
    o = norms.simple_rms_norm(o, cfg.norm_eps) * jax.nn.sigmoid(
        jnp.einsum("btd,dhc->bthc", x_BxTxD, params["wg"]))
  elif cfg.kind == "hgrn2":
    z = s["f"].astype(jnp.float32)
    gamma = jax.lax.stop_gradient(params["lower_bound"])
    log_f = jnp.logaddexp(jnp.log(gamma),
                          jnp.log1p(-gamma) + jax.nn.log_sigmoid(z))
    k = ((1 - gamma) * jax.nn.sigmoid(-z)).astype(s["q"].dtype)  # 1 - f
    o, ssm = ops.gated_linear_attention(jax.nn.silu(s["q"]), k, s["v"], log_f,
                                        **kw)
  else:
    q, k, v = (jax.nn.silu(s[n]) for n in ("q", "k", "v"))
    log_decay = None
    if cfg.kind == "gated_deltanet":
      log_decay = -jnp.exp(params["a_log"])[None, None] * jax.nn.softplus(
          _gate(params, x_BxTxD, "wa") + params["dt_bias"][None, None])
    o, ssm = ops.delta_rule(_l2_normalize(q), _l2_normalize(k), v,
                            jax.nn.sigmoid(_gate(params, x_BxTxD, "wb")),
                            log_decay, **kw)
  if cfg.kind != "lightning":
    o = norms.rms_norm(params["out_norm"], o, cfg.norm_eps)
    if "wg" in params:
      o = o * jax.nn.silu(jnp.einsum("btd,dhc->bthc", x_BxTxD, params["wg"]))
  y = jnp.einsum("bthc,hcd->btd", o.astype(x_BxTxD.dtype), params["wo"])
  return y.astype(x_BxTxD.dtype), RecurrentState(ssm, tails)
