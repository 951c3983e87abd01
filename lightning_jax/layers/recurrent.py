"""Linear-recurrence token mixers: Lightning (TNL), DeltaNet, Gated DeltaNet
and HGRN2, registered in `layers.mixers` (one `Mixer` record per kind).

Every mixer projects `x [batch, seq, d_model]` to per-head q / k / v,
runs a recurrence of `lightning_jax.ops` on an fp32 state
`[batch, heads, key_dim, value_dim]`, normalises each head's output and
projects back. The recurrence state and the short-convolution tail are
returned, so the same function serves training (chunked, state discarded),
prefill and token-by-token decoding. `register_recurrence` registers a kind
from its `Recurrence` (its streams, extra params and state update); the
shared projections, short conv, padding and output projection live here.

A training forward traced under a mesh with a `seq` axis
(`ops.sequence_axis`) runs sequence parallel: each device its chunk, the
recurrence through its `ops.SEQUENCE_PARALLEL` twin, the short conv's K - 1
inputs before the chunk from the previous devices.

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
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax import ops
from lightning_jax.layers import mixers
from lightning_jax.layers import norms
from lightning_jax.layers.mlp import dense_init


class Recurrence(NamedTuple):
  """What distinguishes one linear-recurrence kind.

  Attributes:
    streams: names of the projections `w<s>: [D, H, width]` that feed the
      recurrence (the short conv shifts them); "v" has width `value_dim`,
      the others `head_dim`.
    init_extra: `(keys, cfg, proj, layer, num_layers) -> dict` the kind's
      other params; `keys` is an iterator of PRNG keys, `proj(width)` a
      fresh `[D, H, width]` projection.
    mix: `(params, x_BxTxD, streams, valid_BxT, cfg, kw) -> (o
      [B, T, H, Dv], new ssm)`: the recurrence and the per-head output
      norm and gate. `valid_BxT` (None: all valid) marks the tokens
      whose value increments count; `kw` holds the op arguments
      `initial_state`, `output_final_state`, `chunk_size`, `impl`, or,
      on a sequence split over a mesh axis, `axis_name` instead of
      `impl` and `initial_state`: call the op through `recur`.
    state_flops: forward FLOPs per state entry per token of the recurrent
      form (the mixer's `flops` is `state_flops * H * Dk * Dv`): 5 for a
      decayed linear attention (decay 1, `k v^T` 2, `S^T q` 2), 6 for the
      delta rule (`S^T k` 2, the rank-1 update 2, `S^T q` 2), 7 gated.
    uses_conv: the kind takes `ModelConfig.conv_size`.
  """

  streams: tuple[str, ...]
  init_extra: Callable[..., dict]
  mix: Callable[..., tuple[jax.Array, jax.Array]]
  state_flops: int
  uses_conv: bool = False


_RECURRENCES: dict[str, Recurrence] = {}


def kinds() -> tuple[str, ...]:
  """The registered linear-recurrence kinds."""
  return tuple(_RECURRENCES)


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
  """Linear-recurrence mixer hyper-parameters.

  Attributes:
    kind: a kind registered with `register_recurrence`.
    d_model: model width D.
    num_heads: heads H.
    head_dim: key width Dk per head.
    value_dim: value width Dv per head (default `head_dim`).
    conv_size: kernel (>= 2) of the causal depthwise short convolution on
      the streams; 0 disables it.
    chunk_size: chunk length of the chunked kernels.
    impl: "chunked", "recurrent" (the ops' reference scan) or "auto"
      (`mixers.recurrent_impl`).
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
    _checks.check_choice("kind", self.kind, kinds())
    for name in ("d_model", "num_heads", "head_dim", "chunk_size"):
      _checks.check_positive_int(name, getattr(self, name))
    if self.value_dim is not None:
      _checks.check_positive_int("value_dim", self.value_dim)
    if self.conv_size < 0 or self.conv_size == 1:
      raise ValueError(
        f"`conv_size` must be 0 (no conv) or >= 2, got {self.conv_size}."
      )
    _checks.check_choice("impl", self.impl, mixers.RECURRENT_IMPLS)

  @property
  def dv(self) -> int:
    return self.value_dim or self.head_dim

  @property
  def recurrence(self) -> Recurrence:
    return _RECURRENCES[self.kind]

  def stream_dims(self) -> dict:
    """Width per head of each conv stream."""
    return {
      s: self.dv if s == "v" else self.head_dim for s in self.recurrence.streams
    }


class RecurrentState(NamedTuple):
  """Decoding state of a recurrent mixer.

  Attributes:
    ssm: `[batch, heads, key_dim, value_dim]` float32 recurrence state.
    conv: `{stream: [batch, conv_size - 1, heads, width]}` the last inputs of
      each short conv (empty without a conv).
  """

  ssm: jax.Array
  conv: dict


def init_recurrent_state(
  cfg: RecurrentConfig, batch: int, dtype=jnp.float32
) -> RecurrentState:
  """The zero state (a fresh sequence), conv tails in `dtype`."""
  tails = (
    {}
    if not cfg.conv_size
    else {
      s: jnp.zeros((batch, cfg.conv_size - 1, cfg.num_heads, c), dtype)
      for s, c in cfg.stream_dims().items()
    }
  )
  return RecurrentState(
    jnp.zeros((batch, cfg.num_heads, cfg.head_dim, cfg.dv), jnp.float32), tails
  )


def init_recurrent(
  key, cfg: RecurrentConfig, *, layer: int, num_layers: int
) -> dict:
  """Mixer params: `w<s>: [D, H, width]` per stream, `wo: [H, Dv, D]`,
  `conv_<s>: [conv_size, H, width]`, and the kind's own (`init_extra`).

  Args:
    key: PRNG key.
    cfg: the `RecurrentConfig`.
    layer: 0-based index of the layer (TNL decays, HGRN2 lower bound).
    num_layers: number of layers of the model.

  Example:
    >>> cfg = RecurrentConfig("deltanet", 32, 4, 8, conv_size=4)
    >>> init_recurrent(jax.random.key(0), cfg, layer=0, num_layers=2
    ...                )["conv_q"].shape
    (4, 4, 8)
  """
  d, h, dv = cfg.d_model, cfg.num_heads, cfg.dv
  keys = iter(jax.random.split(key, 16))
  proj = lambda width: dense_init(
    next(keys), (d, h * width), jnp.float32
  ).reshape(d, h, width)
  params = {f"w{s}": proj(c) for s, c in cfg.stream_dims().items()}
  params["wo"] = dense_init(next(keys), (h * dv, d), jnp.float32).reshape(
    h, dv, d
  )
  if cfg.conv_size:
    for s, c in cfg.stream_dims().items():
      params[f"conv_{s}"] = (
        jax.random.normal(next(keys), (cfg.conv_size, h, c))
        * cfg.conv_size**-0.5
      )
  params.update(cfg.recurrence.init_extra(keys, cfg, proj, layer, num_layers))
  return params


@jax.custom_vjp
def short_conv(w_KxHxC, x_BxTxHxC, tail_BxKm1xHxC):
  """Causal depthwise convolution along time with a carried input tail.

  `y_t = sum_j w_j x_{t - K + 1 + j}`, the inputs before the sequence taken
  from `tail` (the previous K - 1 inputs; zeros for a fresh sequence).

  The backward pass is written by hand (`_short_conv_bwd`): XLA:CPU runs
  the weight gradient autodiff gives (K reductions over batch and time) up
  to 3x slower for one long sequence than for a batch of short ones.

  Returns:
    `(y [B, T, H, C] in x's dtype, new tail [B, K - 1, H, C])`.
  """
  size, seq = w_KxHxC.shape[0], x_BxTxHxC.shape[1]
  padded = _conv_input(x_BxTxHxC, tail_BxKm1xHxC)
  w = w_KxHxC.astype(jnp.float32)
  y = sum(
    w[None, None, j] * padded[:, j : j + seq].astype(jnp.float32)
    for j in range(size)
  )
  return y.astype(x_BxTxHxC.dtype), padded[:, seq:]


def _conv_input(x_BxTxHxC, tail_BxKm1xHxC):
  """`[B, K - 1 + T, H, C]`: the tail, then x, in x's dtype."""
  tail = tail_BxKm1xHxC.astype(x_BxTxHxC.dtype)
  return jnp.concatenate([tail, x_BxTxHxC], axis=1)


def _short_conv_fwd(w_KxHxC, x_BxTxHxC, tail_BxKm1xHxC):
  out = short_conv(w_KxHxC, x_BxTxHxC, tail_BxKm1xHxC)
  return out, (w_KxHxC, x_BxTxHxC, tail_BxKm1xHxC)


def _short_conv_bwd(residuals, cotangents):
  """`dw_j = sum_{b,t} dy_t x_{t+j}` as one contraction per tap (a matmul),
  `d padded_s = sum_j w_j dy_{s-j}`, plus the new tail's cotangent."""
  w, x, tail = residuals
  dy, d_new_tail = cotangents
  size, seq = w.shape[0], x.shape[1]
  padded = _conv_input(x, tail).astype(jnp.float32)
  dy = dy.astype(jnp.float32)
  dw = jnp.stack(
    [
      jnp.einsum("bthc,bthc->hc", dy, padded[:, j : j + seq])
      for j in range(size)
    ]
  )
  dy_padded = jnp.pad(dy, [(0, 0), (size - 1, size - 1), (0, 0), (0, 0)])
  wf = w.astype(jnp.float32)
  d_padded = sum(
    wf[None, None, j] * dy_padded[:, size - 1 - j : 2 * size - 2 - j + seq]
    for j in range(size)
  )
  d_padded = d_padded.at[:, seq:].add(d_new_tail.astype(jnp.float32))
  grads = (
    dw.astype(w.dtype),
    d_padded[:, size - 1 :].astype(x.dtype),
    d_padded[:, : size - 1].astype(tail.dtype),
  )
  return tuple(map(ops.cotangent_like, grads, residuals))


short_conv.defvjp(_short_conv_fwd, _short_conv_bwd)


def l2_normalize(x, eps=1e-6):
  """`x / ||x||` over the last dim, in fp32, returned in x's dtype."""
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, -1, keepdims=True) + eps)).astype(
    x.dtype
  )


def mask_values(v_BxTxHxD, valid_BxT):
  """Zeros the values of invalid tokens (None: all valid)."""
  if valid_BxT is None:
    return v_BxTxHxD
  return jnp.where(valid_BxT[:, :, None, None], v_BxTxHxD, 0)


def _streams(params, x_BxTxD, cfg, tail):
  """Projected (and short-convolved) streams, and the new conv tails.

  `tail(name, u_BxTxHxC)` gives the K - 1 conv inputs before stream `name`.
  """
  streams, tails = {}, {}
  for s in cfg.recurrence.streams:
    u = jnp.einsum("btd,dhc->bthc", x_BxTxD, params[f"w{s}"])
    if cfg.conv_size:
      u, tails[s] = short_conv(params[f"conv_{s}"], u, tail(s, u))
    streams[s] = u
  return streams, tails


def _mix(params, x_BxTxD, cfg, tail, valid_BxT, kw):
  """Streams, recurrence and output projection: `(y, ssm, conv tails)`."""
  s, tails = _streams(params, x_BxTxD, cfg, tail)
  o, ssm = cfg.recurrence.mix(params, x_BxTxD, s, valid_BxT, cfg, kw)
  y = jnp.einsum("bthc,hcd->btd", o.astype(x_BxTxD.dtype), params["wo"])
  return y.astype(x_BxTxD.dtype), ssm, tails


def _sequence_parallel_mix(params, x_BxLxD, cfg, axis_name):
  """One device's chunk of a training forward split over `axis_name`.

  The short convs take their K - 1 inputs before the chunk from the
  previous devices (`ops.previous_tokens`), the recurrence runs as its
  `ops.SEQUENCE_PARALLEL` twin (one all-gather of state maps).
  """
  halo = lambda name, u: ops.previous_tokens(u, cfg.conv_size - 1, axis_name)
  kw = dict(
    output_final_state=True, chunk_size=cfg.chunk_size, axis_name=axis_name
  )
  return _mix(params, x_BxLxD, cfg, halo, None, kw)[0]


def recur(op, *args, axis_name=None, **kw):
  """`op(*args, **kw)`, or on a sequence split over `axis_name` (inside
  `shard_map`) its twin `ops.SEQUENCE_PARALLEL[op]` (always chunked)."""
  if axis_name is None:
    return op(*args, **kw)
  return ops.SEQUENCE_PARALLEL[op](*args, axis_name=axis_name, **kw)


def gate(params, x_BxTxD, name):
  """fp32 per-head gate pre-activation `x W_name`: `[batch, seq, heads]`."""
  return jnp.einsum("btd,dh->bth", x_BxTxD, params[name]).astype(jnp.float32)


def recurrent_layer(
  params: dict,
  x_BxTxD,
  cfg: RecurrentConfig,
  state: RecurrentState | None = None,
  decoding: mixers.Decoding | None = None,
):
  """A linear-recurrence mixer `[batch, seq, d_model] -> [batch, seq, d_model]`.

  Args:
    params: from `init_recurrent`.
    x_BxTxD: `[batch, seq, d_model]` (any seq length; 1 to decode a token).
    cfg: the `RecurrentConfig`.
    state: `RecurrentState` to continue from, None for a fresh sequence.
    decoding: prefill / step context (`layers.mixers`); with `seq > 1` the
      rows are right padded to `decoding.lengths_B` and `state` is fresh.

  Returns:
    `(y [batch, seq, d_model] in x's dtype, RecurrentState after the last
    (real) token)`. Splitting a sequence and carrying the state gives the
    result of one call; one token runs the reference recurrence. A
    training forward (no state, no decoding) under a mesh with a `seq`
    axis returns `(y, None)`: it runs sequence parallel, chunked.

  Raises:
    ValueError: `x_BxTxD` or `state` of the wrong shape; `seq_len` not
      divisible by the mesh's `seq` axis.

  Example:
    >>> cfg = RecurrentConfig("gated_deltanet", 32, 4, 8, conv_size=4)
    >>> p = init_recurrent(jax.random.key(0), cfg, layer=0, num_layers=1)
    >>> y, s = recurrent_layer(p, jnp.ones((2, 5, 32)), cfg)
    >>> y.shape, s.ssm.shape
    ((2, 5, 32), (2, 4, 8, 8))
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
    state = init_recurrent_state(cfg, batch, x_BxTxD.dtype)
  _checks.check_shape(
    "state.ssm",
    state.ssm,
    (batch, cfg.num_heads, cfg.head_dim, cfg.dv),
    "[batch, heads, key_dim, value_dim]",
  )
  valid, unshift = None, lambda y: y
  if decoding is not None and seq > 1:
    x_BxTxD, valid, unshift = mixers.left_align(x_BxTxD, decoding.lengths_B)
  kw = dict(
    initial_state=state.ssm,
    output_final_state=True,
    chunk_size=cfg.chunk_size,
    impl=mixers.recurrent_impl(cfg.impl, seq, decoding),
  )
  tail = lambda name, u: state.conv[name]
  y, ssm, tails = _mix(params, x_BxTxD, cfg, tail, valid, kw)
  return unshift(y), RecurrentState(ssm, tails)


_QKV = ("embed", "heads", "head_dim")  # [D, H, C]
_RULES = (
  *(((f"w{s}",), _QKV) for s in "qkvfg"),
  (("wo",), ("heads", "head_dim", "embed")),  # [H, Dv, D]
  (("wb",), ("embed", "heads")),  # [D, H]
  (("wa",), ("embed", "heads")),  # [D, H]
  *(((f"conv_{s}",), (None, "heads", None)) for s in "qkvf"),  # [K, H, C]
  (("a_log",), ("heads",)),  # [H]
  (("dt_bias",), ("heads",)),  # [H]
  (("log_decay",), ("heads",)),  # [H]
  (("out_norm", "scale"), (None,)),  # [Dv]
  (("lower_bound",), ()),  # HGRN2's per-layer scalar
)


def _empty_state(cfg, batch, max_len, dtype):
  del max_len  # O(1) in the context length
  return init_recurrent_state(cfg, batch, dtype)


def _flops(cfg: RecurrentConfig, seq_len: int) -> float:
  del seq_len  # O(1) per token
  state_flops = _RECURRENCES[cfg.kind].state_flops
  return float(state_flops * cfg.num_heads * cfg.head_dim * cfg.dv)


def register_recurrence(
  name: str, recurrence: Recurrence, doc: str, preset: dict | None = None
) -> mixers.Mixer:
  """Registers a linear-recurrence kind on the shared machinery here.

  Its layers read `d_model`, `head_dim`, `chunk_size`, `recurrent_impl`,
  `norm_eps` (and `conv_size` if `uses_conv`) of the model config;
  `mixer_options` may set any other `RecurrentConfig` field (e.g.
  `"deltanet.value_dim=64"`). `preset` as `mixers.Mixer.preset`.
  """
  _RECURRENCES[name] = recurrence

  def config(spec: mixers.LayerSpec) -> RecurrentConfig:
    m = spec.model
    return mixers.with_options(
      RecurrentConfig(
        name,
        m.d_model,
        spec.num_heads,
        m.head_dim,
        conv_size=m.conv_size if recurrence.uses_conv else 0,
        chunk_size=m.chunk_size,
        impl=m.recurrent_impl,
        norm_eps=m.norm_eps,
      ),
      spec.options,
    )

  return mixers.register(
    mixers.Mixer(
      name=name,
      config=config,
      init=init_recurrent,
      apply=recurrent_layer,
      empty_state=_empty_state,
      flops=_flops,
      rules=_RULES,
      doc=doc,
      preset=preset,
    )
  )


# ------------------------------------------------------------------ kinds ---


def _lightning_extra(keys, cfg, proj, layer, num_layers):
  del keys
  return {
    "wg": proj(cfg.dv),
    "log_decay": ops.tnl_log_decay(layer, num_layers, cfg.num_heads),
  }


def _lightning_mix(params, x_BxTxD, s, valid, cfg, kw):
  o, ssm = recur(
    ops.linear_attention,
    jax.nn.silu(s["q"]),
    jax.nn.silu(s["k"]),
    mask_values(s["v"], valid),
    jax.lax.stop_gradient(params["log_decay"]),
    **kw,
  )
  o = norms.simple_rms_norm(o, cfg.norm_eps) * jax.nn.sigmoid(
    jnp.einsum("btd,dhc->bthc", x_BxTxD, params["wg"])
  )
  return o, ssm


def _silu_gate(params, x_BxTxD, o, cfg):
  """RMSNorm per head, then the SiLU output gate if the kind has `wg`."""
  o = norms.rms_norm(params["out_norm"], o, cfg.norm_eps)
  if "wg" in params:
    o = o * jax.nn.silu(jnp.einsum("btd,dhc->bthc", x_BxTxD, params["wg"]))
  return o


def _hgrn2_extra(keys, cfg, proj, layer, num_layers):
  del keys
  return {
    "wg": proj(cfg.dv),
    "out_norm": norms.init_rms_norm(cfg.dv),
    "lower_bound": jnp.float32(layer / num_layers),
  }


def _hgrn2_mix(params, x_BxTxD, s, valid, cfg, kw):
  z = s["f"].astype(jnp.float32)
  gamma = jax.lax.stop_gradient(params["lower_bound"])
  log_f = jnp.logaddexp(
    jnp.log(gamma), jnp.log1p(-gamma) + jax.nn.log_sigmoid(z)
  )
  k = ((1 - gamma) * jax.nn.sigmoid(-z)).astype(s["q"].dtype)  # 1 - f
  o, ssm = recur(
    ops.gated_linear_attention,
    jax.nn.silu(s["q"]),
    k,
    mask_values(s["v"], valid),
    log_f,
    **kw,
  )
  return _silu_gate(params, x_BxTxD, o, cfg), ssm


def _delta_extra(gated):
  def extra(keys, cfg, proj, layer, num_layers):
    del layer, num_layers
    h = cfg.num_heads
    params = {"wg": proj(cfg.dv)} if gated else {}
    params["out_norm"] = norms.init_rms_norm(cfg.dv)
    params["wb"] = proj(1)[..., 0]
    if gated:
      params["wa"] = proj(1)[..., 0]
      # Mamba-2 style: A in [1, 16], dt log-uniform in [1e-3, 0.1].
      params["a_log"] = jnp.log(
        jax.random.uniform(next(keys), (h,), minval=1, maxval=16)
      )
      dt = jnp.exp(
        jax.random.uniform(
          next(keys), (h,), minval=np.log(1e-3), maxval=np.log(0.1)
        )
      )
      params["dt_bias"] = dt + jnp.log(-jnp.expm1(-dt))  # softplus^-1(dt)
    return params

  return extra


def _delta_mix(params, x_BxTxD, s, valid, cfg, kw):
  q, k, v = (jax.nn.silu(s[n]) for n in ("q", "k", "v"))
  log_decay = None
  if "a_log" in params:
    log_decay = -jnp.exp(params["a_log"])[None, None] * jax.nn.softplus(
      gate(params, x_BxTxD, "wa") + params["dt_bias"][None, None]
    )
  o, ssm = recur(
    ops.delta_rule,
    l2_normalize(q),
    l2_normalize(k),
    mask_values(v, valid),
    jax.nn.sigmoid(gate(params, x_BxTxD, "wb")),
    log_decay,
    **kw,
  )
  return _silu_gate(params, x_BxTxD, o, cfg), ssm


LIGHTNING = register_recurrence(
  "lightning",
  Recurrence(("q", "k", "v"), _lightning_extra, _lightning_mix, state_flops=5),
  "TransNormerLLM / Lightning Attention (arXiv 2307.14995, 2401.04658): "
  "fixed per-head decays, SRMSNorm, sigmoid gate.",
)
DELTANET = register_recurrence(
  "deltanet",
  Recurrence(
    ("q", "k", "v"),
    _delta_extra(False),
    _delta_mix,
    state_flops=6,
    uses_conv=True,
  ),
  "DeltaNet (arXiv 2406.06484): delta rule on L2-normed q, k, short conv.",
  # Chunk sizes measured at the preset head_dim 32 (docs/benchmarks.md).
  preset={"num_layers": 4, "chunk_size": 32},
)
GATED_DELTANET = register_recurrence(
  "gated_deltanet",
  Recurrence(
    ("q", "k", "v"),
    _delta_extra(True),
    _delta_mix,
    state_flops=7,
    uses_conv=True,
  ),
  "Gated DeltaNet (arXiv 2412.06464): delta rule with a data-dependent "
  "decay, SiLU output gate.",
  preset={"num_layers": 4, "chunk_size": 32},
)
HGRN2 = register_recurrence(
  "hgrn2",
  Recurrence(("q", "f", "v"), _hgrn2_extra, _hgrn2_mix, state_flops=5),
  "HGRN2 (arXiv 2404.07904): gated linear attention with a lower-bounded "
  "forget gate, key 1 - f.",
  preset={"num_layers": 4, "chunk_size": 16},
)
