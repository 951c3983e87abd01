"""Mixture-of-experts FFN layer and Multi-Head MoE, returning `(y, aux)`."""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lightning_jax import _checks
from lightning_jax import moe as moe_lib
from lightning_jax.layers.mlp import dense_init

DISPATCHES = ("dropless", "capacity")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """MoE FFN config.

  Attributes:
    d_model: token width.
    d_ff: hidden width of each GLU expert.
    num_experts: number of experts.
    top_k: experts per token.
    score: router score, "softmax" or "sigmoid" (see `moe.route`).
    normalize_topk: renormalise the chosen weights to sum 1.
    dispatch: "dropless" (grouped matmuls) or "capacity".
    capacity_factor: for "capacity", see `moe.expert_capacity`.
    drop_policy: for "capacity", "position" or "probability".
    lbl_scope: load-balancing loss scope, "sequence", "micro" or "global".
    activation: GLU activation of the experts.
    dtype: parameter dtype of the experts (the router is float32).
    shared_d_ff: hidden width of an always-on shared GLU expert added to
      every token's routed output (0: none; LLaMA-MoE-v2's "residual"
      MoE, DeepSeekMoE's shared expert).
  """

  d_model: int
  d_ff: int
  num_experts: int
  top_k: int = 2
  score: str = "softmax"
  normalize_topk: bool = True
  dispatch: str = "dropless"
  capacity_factor: float = 1.25
  drop_policy: str = "position"
  lbl_scope: str = "micro"
  activation: str = "silu"
  dtype: Any = jnp.float32
  shared_d_ff: int = 0

  def __post_init__(self):
    for name in ("d_model", "d_ff", "num_experts", "top_k"):
      _checks.check_positive_int(name, getattr(self, name))
    if self.shared_d_ff:
      _checks.check_positive_int("shared_d_ff", self.shared_d_ff)
    if self.top_k > self.num_experts:
      raise ValueError(
        f"`top_k` must be <= num_experts = {self.num_experts}, "
        f"got {self.top_k}."
      )
    _checks.check_choice("score", self.score, moe_lib.SCORES)
    _checks.check_choice("dispatch", self.dispatch, DISPATCHES)
    _checks.check_choice("drop_policy", self.drop_policy, moe_lib.DROP_POLICIES)
    _checks.check_choice("lbl_scope", self.lbl_scope, moe_lib.SCOPES)
    _checks.check_choice(
      "activation", self.activation, tuple(moe_lib.ACTIVATIONS)
    )
    if not self.capacity_factor > 0:
      raise ValueError(
        f"`capacity_factor` must be > 0, got {self.capacity_factor}."
      )


class MoEAux(NamedTuple):
  """Auxiliary outputs of `moe` / `mh_moe`.

  Attributes:
    load_balancing_loss: shape=(), LBL at `cfg.lbl_scope`.
    lbl_pieces: `moe.LBLPieces` of this call's tokens, to combine
      microbatches into the exact global-batch loss
      (`moe.load_balancing_loss_from_pieces`) and to update a router bias.
    router_z_loss: shape=(), `moe.router_z_loss` of the router logits.
    load: `moe.LoadStats` (over `lbl_axis` if given, else local).
  """

  load_balancing_loss: jax.Array
  lbl_pieces: moe_lib.LBLPieces
  router_z_loss: jax.Array
  load: moe_lib.LoadStats


def init_moe(key, cfg: MoEConfig) -> dict:
  """MoE params: float32 `router` `[D, E]` and GLU `experts` stacked `[E, ...]`;
  with `shared_d_ff`, a GLU `shared` `{"w_gate", "w_up": [D, Fs], "w_down":
  [Fs, D]}`.

  Example:
    >>> cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4)
    >>> init_moe(jax.random.key(0), cfg)["experts"]["w_gate"].shape
    (4, 8, 16)
  """
  k_router, k_gate, k_up, k_down = jax.random.split(key, 4)
  d, f, e = cfg.d_model, cfg.d_ff, cfg.num_experts
  params = {
    "router": dense_init(k_router, (d, e), jnp.float32),
    "experts": {
      "w_gate": dense_init(k_gate, (e, d, f), cfg.dtype),
      "w_up": dense_init(k_up, (e, d, f), cfg.dtype),
      "w_down": dense_init(k_down, (e, f, d), cfg.dtype),
    },
  }
  if cfg.shared_d_ff:
    ks = jax.random.split(jax.random.fold_in(key, 1), 3)
    fs = cfg.shared_d_ff
    params["shared"] = {
      "w_gate": dense_init(ks[0], (d, fs), cfg.dtype),
      "w_up": dense_init(ks[1], (d, fs), cfg.dtype),
      "w_down": dense_init(ks[2], (fs, d), cfg.dtype),
    }
  return params


def moe(
  params: dict,
  x_BxTxD,
  cfg: MoEConfig,
  *,
  router_bias=None,
  lbl_axis=None,
  expert_axis=None,
):
  """Top-k MoE FFN: route, run GLU experts, combine; aux losses and stats.

  With `cfg.shared_d_ff`, the shared expert's GLU output is added for
  every token (weight 1, outside the routing):
  `y = sum_k w_k FFN_{e_k}(x) + FFN_shared(x)`.

  The output of dropped slots (capacity dispatch) is zero: add the layer
  to a residual stream (`x + y`) so dropped tokens pass through.

  Args:
    params: from `init_moe` (with `expert_axis`, this device's experts).
    x_BxTxD: `[batch, seq, d_model]` (this device's tokens).
    cfg: the `MoEConfig`.
    router_bias: optional `[num_experts]` aux-loss-free selection bias.
    lbl_axis: mesh axes over which the "global" LBL counts load (inside
      `shard_map`); required by, and only allowed with, `lbl_scope="global"`.
    expert_axis: mesh axis sharding the experts (inside `shard_map`).

  Returns:
    `(y_BxTxD, MoEAux)`, `y` in `x_BxTxD.dtype`.

  Raises:
    ValueError: bad shapes, or `lbl_axis` inconsistent with `cfg.lbl_scope`.

  Example:
    >>> cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4)
    >>> p = init_moe(jax.random.key(0), cfg)
    >>> y, aux = moe(p, jnp.ones((2, 3, 8)), cfg)
    >>> y.shape, aux.load.expert_load.shape
    ((2, 3, 8), (4,))
  """
  _checks.check_rank("x_BxTxD", x_BxTxD, 3, "[batch, seq, d_model]")
  _checks.check_shape(
    "x_BxTxD",
    x_BxTxD,
    x_BxTxD.shape[:2] + (cfg.d_model,),
    "[batch, seq, d_model]",
  )
  logits_BxTxE = jnp.einsum(
    "btd,de->bte", x_BxTxD.astype(jnp.float32), params["router"]
  )
  routing = moe_lib.route(
    logits_BxTxE,
    cfg.top_k,
    score=cfg.score,
    normalize_topk=cfg.normalize_topk,
    bias=router_bias,
  )
  x_NxD = x_BxTxD.reshape(-1, cfg.d_model)
  weights_NxK = routing.weights.reshape(-1, cfg.top_k)
  experts_NxK = routing.experts.reshape(-1, cfg.top_k)
  glu_weights = moe_lib.GLUWeights(**params["experts"])
  if cfg.dispatch == "dropless":
    y_NxD = moe_lib.dropless_moe(
      x_NxD,
      weights_NxK,
      experts_NxK,
      glu_weights,
      activation=cfg.activation,
      expert_axis=expert_axis,
    )
    kept = None
  else:
    y_NxD, kept = moe_lib.capacity_moe(
      x_NxD,
      weights_NxK,
      experts_NxK,
      glu_weights,
      capacity_factor=cfg.capacity_factor,
      drop_policy=cfg.drop_policy,
      activation=cfg.activation,
      expert_axis=expert_axis,
    )
  if cfg.shared_d_ff:
    shared = moe_lib.GLUWeights(**params["shared"])
    y_NxD = y_NxD + moe_lib.glu(x_NxD, shared, activation=cfg.activation)
  lbl = moe_lib.load_balancing_loss(
    routing.probs,
    routing.experts,
    num_experts=cfg.num_experts,
    scope=cfg.lbl_scope,
    axis_name=lbl_axis,
  )
  pieces = moe_lib.load_balancing_pieces(
    routing.probs, routing.experts, num_experts=cfg.num_experts
  )
  aux = MoEAux(
    load_balancing_loss=lbl,
    lbl_pieces=pieces,
    router_z_loss=moe_lib.router_z_loss(logits_BxTxE),
    load=moe_lib.load_stats(
      pieces.expert_counts, kept=kept, axis_name=lbl_axis
    ),
  )
  return y_NxD.reshape(x_BxTxD.shape), aux


@dataclasses.dataclass(frozen=True)
class MHMoEConfig:
  """Multi-Head MoE config.

  Attributes:
    num_heads: sub-tokens per token (h).
    moe: the MoE on sub-tokens; `moe.d_model` is the *token* width D, which
      `num_heads` must divide; experts act on width `D / num_heads`.
  """

  num_heads: int
  moe: MoEConfig

  def __post_init__(self):
    _checks.check_positive_int("num_heads", self.num_heads)
    if self.moe.d_model % self.num_heads:
      raise ValueError(
        f"`num_heads` = {self.num_heads} must divide "
        f"moe.d_model = {self.moe.d_model}."
      )

  @property
  def sub_token_moe(self) -> MoEConfig:
    """The MoE config on sub-tokens of width `d_model / num_heads`."""
    return dataclasses.replace(
      self.moe, d_model=self.moe.d_model // self.num_heads
    )


def init_mh_moe(key, cfg: MHMoEConfig) -> dict:
  """MH-MoE params: `head_proj`, `merge_proj` `[D, D]` and the sub-token `moe`.

  Example:
    >>> cfg = MHMoEConfig(2, MoEConfig(d_model=8, d_ff=16, num_experts=4))
    >>> init_mh_moe(jax.random.key(0), cfg)["moe"]["router"].shape
    (4, 4)
  """
  k_head, k_merge, k_moe = jax.random.split(key, 3)
  d = cfg.moe.d_model
  return {
    "head_proj": dense_init(k_head, (d, d), cfg.moe.dtype),
    "merge_proj": dense_init(k_merge, (d, d), cfg.moe.dtype),
    "moe": init_moe(k_moe, cfg.sub_token_moe),
  }


def mh_moe(params: dict, x_BxTxD, cfg: MHMoEConfig, **moe_kwargs):
  """Multi-Head MoE (Wu et al., 2024, "Multi-Head Mixture-of-Experts").

  `x W_head` is split into `h` sub-tokens of width `D / h`, which are routed
  and processed as tokens (sequence `[batch, seq * h]`, the sub-tokens of a
  token adjacent), merged back to width D and projected by `W_merge`.

  Args:
    params: from `init_mh_moe`.
    x_BxTxD: `[batch, seq, d_model]`.
    cfg: the `MHMoEConfig`.
    **moe_kwargs: `router_bias`, `lbl_axis`, `expert_axis` of `moe`.

  Returns:
    `(y_BxTxD, MoEAux)`; the aux statistics count sub-tokens.

  Raises:
    ValueError: bad shapes.

  Example:
    >>> cfg = MHMoEConfig(2, MoEConfig(d_model=8, d_ff=16, num_experts=4))
    >>> p = init_mh_moe(jax.random.key(0), cfg)
    >>> mh_moe(p, jnp.ones((2, 3, 8)), cfg)[0].shape
    (2, 3, 8)
  """
  _checks.check_rank("x_BxTxD", x_BxTxD, 3, "[batch, seq, d_model]")
  batch, seq, d_model = x_BxTxD.shape
  _checks.check_shape(
    "x_BxTxD", x_BxTxD, (batch, seq, cfg.moe.d_model), "[batch, seq, d_model]"
  )
  heads = jnp.matmul(
    x_BxTxD, params["head_proj"], preferred_element_type=jnp.float32
  ).astype(x_BxTxD.dtype)
  sub_BxThxd = heads.reshape(batch, seq * cfg.num_heads, -1)
  y_sub, aux = moe(params["moe"], sub_BxThxd, cfg.sub_token_moe, **moe_kwargs)
  y = jnp.matmul(
    y_sub.reshape(batch, seq, d_model),
    params["merge_proj"],
    preferred_element_type=jnp.float32,
  )
  return y.astype(x_BxTxD.dtype), aux
