"""BAM attention experts, registered as the "attention_experts" mixer.

Zhang et al., 2024, "BAM! Just Like That: Simple and Efficient Parameter
Upcycling for Mixture of Experts" (arXiv 2408.08274): E attention experts,
each the "attention" mixer of `layers.attention` (GQA, RoPE, KV cache), and
a router over tokens,

    y_t = sum_e w_te Attn_e(x)_t,   w_t = softmax(x_t W_router)   (soft)

or, with `top_k > 0`, `w_t` the `moe.route` top-k weights renormalised over
the chosen experts (zero elsewhere). Every expert attends over every token:
soft routing (BAM's default, which it finds better than top-k) needs them
all, and top-k only zeroes weights (a dense reference form, E times the
attention FLOPs). With `shared_kv` the experts share one key/value
projection and one cache (BAM's KV-sharing variant); queries and outputs
stay per expert. The decoding state is the attention mixer's, stacked on a
leading expert axis `[E, ...]` (one state with `shared_kv`). SnapKV is not
applied (its kept slots would differ per expert).

Not to be confused with MoA ("moa"), the per-head sparse-window attention.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lightning_jax import _checks
from lightning_jax import moe as moe_lib
from lightning_jax.layers import attention as attention_lib
from lightning_jax.layers import mixers
from lightning_jax.layers.mlp import dense_init

KIND = "attention_experts"
KV = ("wk", "wv")


@dataclasses.dataclass(frozen=True)
class AttentionExpertsConfig:
  """Attention-experts layer hyper-parameters.

  Attributes:
    attention: the `AttentionConfig` of every expert.
    num_experts: experts E.
    top_k: experts per token; 0 = soft routing over all of them.
    shared_kv: one key/value projection and cache shared by the experts.
  """

  attention: attention_lib.AttentionConfig
  num_experts: int = 2
  top_k: int = 0
  shared_kv: bool = False

  def __post_init__(self):
    _checks.check_positive_int("num_experts", self.num_experts)
    if not 0 <= self.top_k <= self.num_experts:
      raise ValueError(
        f"`top_k` must be in [0, num_experts={self.num_experts}] "
        f"(0: soft routing), got {self.top_k}."
      )
    if not isinstance(self.shared_kv, bool):
      raise ValueError(f"`shared_kv` must be a bool, got {self.shared_kv!r}.")

  @property
  def d_model(self) -> int:
    return self.attention.d_model


def init_attention_experts(key, cfg: AttentionExpertsConfig) -> dict:
  """Params `{"router": [D, E] float32, "experts": {"wq": [E, D, H, Dh],
  "wo": [E, H, Dh, D], "wk", "wv": [E, D, Hkv, Dh]}}`; with `shared_kv`
  the keys and values move to `{"kv": {"wk", "wv": [D, Hkv, Dh]}}`.

  Example:
    >>> attn = attention_lib.AttentionConfig(32, 4, 2, 8)
    >>> p = init_attention_experts(jax.random.key(0),
    ...                            AttentionExpertsConfig(attn, 3))
    >>> p["experts"]["wq"].shape
    (3, 32, 4, 8)
  """
  k_router, k_experts, k_kv = jax.random.split(key, 3)
  init = functools.partial(attention_lib.init_attention, cfg=cfg.attention)
  experts = jax.vmap(init)(jax.random.split(k_experts, cfg.num_experts))
  params = {
    "router": dense_init(k_router, (cfg.d_model, cfg.num_experts), jnp.float32),
    "experts": experts,
  }
  if cfg.shared_kv:
    params["experts"] = {k: v for k, v in experts.items() if k not in KV}
    params["kv"] = {k: v for k, v in init(k_kv).items() if k in KV}
  return params


def routing_weights(router_DxE, x_BxTxD, cfg: AttentionExpertsConfig):
  """float32 `[batch, seq, E]` expert weights of each token: the softmax of
  the router logits (soft) or the renormalised top-k ones (zeros
  elsewhere)."""
  logits = jnp.einsum("btd,de->bte", x_BxTxD.astype(jnp.float32), router_DxE)
  if cfg.top_k == 0:
    return jax.nn.softmax(logits, axis=-1)
  routing = moe_lib.route(logits, cfg.top_k)
  chosen = jax.nn.one_hot(routing.experts, cfg.num_experts)  # [B, T, K, E]
  return jnp.einsum("btke,btk->bte", chosen, routing.weights)


def attention_experts_mixer(
  params,
  x_BxTxD,
  cfg: AttentionExpertsConfig,
  state=None,
  decoding: mixers.Decoding | None = None,
):
  """The routed sum of the experts' attention, with the mixer contract.

  Args:
    params: from `init_attention_experts`.
    x_BxTxD: `[batch, seq, d_model]`.
    cfg: the `AttentionExpertsConfig`.
    state: None (training), or the experts' `AttentionState`s (see
      `layers.attention.attention_mixer`), stacked `[E, ...]` unless
      `shared_kv`.
    decoding: the rows' lengths of a prefill or step (SnapKV ignored).

  Returns:
    `(y [batch, seq, d_model], state or None)`.

  Example:
    >>> attn = attention_lib.AttentionConfig(32, 4, 2, 8)
    >>> cfg = AttentionExpertsConfig(attn, 3, shared_kv=True)
    >>> p = init_attention_experts(jax.random.key(0), cfg)
    >>> attention_experts_mixer(p, jnp.ones((1, 5, 32)), cfg)[0].shape
    (1, 5, 32)
  """
  if decoding is not None:
    decoding = decoding._replace(snapkv=None)

  def expert(expert_params, kv_params, expert_state):
    return attention_lib.attention_mixer(
      {**expert_params, **kv_params},
      x_BxTxD,
      cfg.attention,
      expert_state,
      decoding,
    )

  state_axis = None if cfg.shared_kv else 0
  y_ExBxTxD, state = jax.vmap(
    expert, in_axes=(0, None, state_axis), out_axes=(0, state_axis)
  )(params["experts"], params.get("kv", {}), state)
  w_BxTxE = routing_weights(params["router"], x_BxTxD, cfg)
  y = jnp.einsum("ebtd,bte->btd", y_ExBxTxD.astype(jnp.float32), w_BxTxE)
  return y.astype(x_BxTxD.dtype), state


def init_attention_experts_state(
  cfg: AttentionExpertsConfig, batch: int, max_len: int, dtype=jnp.float32
):
  """The empty caches: the attention mixer's, `[E, ...]` unless shared."""
  state = attention_lib.init_attention_state(
    cfg.attention, batch, max_len, dtype
  )
  if cfg.shared_kv:
    return state
  return jax.tree.map(
    lambda x: jnp.broadcast_to(x, (cfg.num_experts,) + x.shape), state
  )


def _init(key, cfg, *, layer, num_layers):
  del layer, num_layers
  return init_attention_experts(key, cfg)


def _config(spec: mixers.LayerSpec) -> AttentionExpertsConfig:
  """Options naming `AttentionExpertsConfig` fields set them; the others
  go to the experts' `AttentionConfig` (built as the "attention" kind's)."""
  own = {f.name for f in dataclasses.fields(AttentionExpertsConfig)}
  attention = attention_lib.ATTENTION.config(
    spec._replace(
      options={k: v for k, v in spec.options.items() if k not in own}
    )
  )
  return AttentionExpertsConfig(
    attention, **{k: v for k, v in spec.options.items() if k in own}
  )


def _flops(cfg: AttentionExpertsConfig, seq_len: int) -> float:
  """E times the attention's sequence mixing plus the `2 E D` weighted sum
  of the experts' outputs."""
  attention = attention_lib.ATTENTION.flops(cfg.attention, seq_len)
  return cfg.num_experts * (attention + 2.0 * cfg.d_model)


_QKV = ("experts", "embed", "heads", "head_dim")  # [E, D, H, Dh]

ATTENTION_EXPERTS = mixers.register(
  mixers.Mixer(
    name=KIND,
    config=_config,
    init=_init,
    apply=attention_experts_mixer,
    empty_state=init_attention_experts_state,
    flops=_flops,
    rules=(
      (("experts", "wq"), _QKV),
      (("experts", "wk"), _QKV),  # [E, D, Hkv, Dh]
      (("experts", "wv"), _QKV),
      (("experts", "wo"), ("experts", "heads", "head_dim", "embed")),
      (("kv", "wk"), _QKV[1:]),  # shared: [D, Hkv, Dh]
      (("kv", "wv"), _QKV[1:]),
    ),
    doc="BAM attention experts (arXiv 2408.08274): E routed attention "
    "experts (soft or top-k, optionally shared KV); their KV caches as state.",
    preset={"num_layers": 4},
  )
)
