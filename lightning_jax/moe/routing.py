"""Top-k routers, the aux-loss-free balancing bias and the router z-loss."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lightning_jax import _checks

SCORES = ("softmax", "sigmoid")


class Routing(NamedTuple):
  """A router's decision for every token.

  Attributes:
    probs: `[..., num_experts]` float32, the full score distribution (sums to
      1 over experts), the `p` of the load-balancing loss.
    weights: `[..., top_k]` float32, combine weights of the chosen experts.
    experts: `[..., top_k]` int32, chosen expert ids, distinct per token.
  """

  probs: jax.Array
  weights: jax.Array
  experts: jax.Array


def route(
  logits,
  top_k: int,
  *,
  score: str = "softmax",
  normalize_topk: bool = True,
  bias=None,
) -> Routing:
  """Top-k routing of `logits` `[..., num_experts]`.

  `score="softmax"` (GShard, Switch) scores experts with `softmax(logits)`;
  `score="sigmoid"` (DeepSeek-V3) with `sigmoid(logits)`, and `probs` is then
  the sigmoid scores normalised to sum 1 (the `s'` of DeepSeek-V3's balance
  loss). `bias` `[num_experts]` is DeepSeek-V3's aux-loss-free balancing bias
  (Liu et al., 2024, "DeepSeek-V3 Technical Report", sec. 2.1.2): it is added
  to the scores to *select* experts only; the weights come from the unbiased
  scores. The bias gets no gradient (update it with `update_router_bias`).

  Args:
    logits: `[..., num_experts]` router logits (any float dtype).
    top_k: experts per token, `1 <= top_k <= num_experts`.
    score: "softmax" or "sigmoid".
    normalize_topk: rescale the `top_k` chosen scores to sum 1.
    bias: optional `[num_experts]` selection bias.

  Returns:
    A `Routing` (float32 probs and weights, int32 experts).

  Raises:
    ValueError: `top_k` is not in `[1, num_experts]`, `score` is unknown,
      or `bias` is not `[num_experts]`.

  Example:
    >>> r = route(jnp.zeros((2, 3, 4)), top_k=2)
    >>> r.probs.shape, r.weights.shape, r.experts.shape
    ((2, 3, 4), (2, 3, 2), (2, 3, 2))
  """
  num_experts = logits.shape[-1]
  top_k = _checks.check_positive_int("top_k", top_k)
  if top_k > num_experts:
    raise ValueError(
      f"`top_k` must be <= num_experts = {num_experts} (the "
      f"last dim of `logits`), got {top_k}."
    )
  _checks.check_choice("score", score, SCORES)
  logits = logits.astype(jnp.float32)
  if score == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
    probs = scores
  else:
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  selection = scores
  if bias is not None:
    _checks.check_shape("bias", bias, (num_experts,), "[num_experts]")
    bias = jax.lax.stop_gradient(bias.astype(jnp.float32))
    selection = scores + bias.reshape((1,) * (scores.ndim - 1) + bias.shape)
  _, experts = jax.lax.top_k(selection, top_k)
  weights = jnp.take_along_axis(scores, experts, axis=-1)
  if normalize_topk:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(probs, weights, experts.astype(jnp.int32))


def expert_ids(name: str, experts, num_experts: int):
  """Checks expert ids; maps out-of-range traced ones to `num_experts`.

  Concrete ids outside `[0, num_experts)` raise. Traced ones (inside `jit`)
  cannot be checked: they become `num_experts`, which every consumer drops
  (`jnp.bincount(..., length=num_experts)`, `.at[...]` with `mode="drop"`),
  rather than letting a negative id wrap around to the last expert.

  Args:
    name: the argument's name, for the error.
    experts: int array of expert ids.
    num_experts: number of experts.

  Returns:
    `experts` with ids outside `[0, num_experts)` set to `num_experts`.

  Raises:
    ValueError: a concrete id is outside `[0, num_experts)`.
  """
  _checks.check_ids(name, experts, num_experts, "expert ids")
  valid = (experts >= 0) & (experts < num_experts)
  return jnp.where(valid, experts, num_experts)


def update_router_bias(bias, expert_counts, *, rate: float):
  """One aux-loss-free balancing step: `b_i += rate * sign(mean_load - load_i)`.

  Overloaded experts get a lower selection bias, underloaded ones a higher one
  (DeepSeek-V3, sec. 2.1.2). Feed it the step's global counts
  (`LBLPieces.expert_counts` summed over microbatches and devices).

  Args:
    bias: `[num_experts]` current bias.
    expert_counts: `[num_experts]` routing slots per expert in the step.
    rate: the bias update speed (gamma).

  Returns:
    The updated `[num_experts]` bias, in `bias.dtype`.

  Raises:
    ValueError: `expert_counts` does not match `bias`.

  Example:
    >>> update_router_bias(jnp.zeros(2), jnp.array([3., 1.]), rate=0.1)
    Array([-0.1,  0.1], dtype=float32)
  """
  _checks.check_shape(
    "expert_counts", expert_counts, bias.shape, "[num_experts]"
  )
  load = expert_counts.astype(jnp.float32)
  step = rate * jnp.sign(jnp.mean(load) - load)
  return (bias + step).astype(bias.dtype)


def router_z_loss(logits):
  """Router z-loss `mean_tokens(logsumexp(logits) ** 2)`.

  Zoph et al., 2022, "ST-MoE", eq. 5: keeps router logits small.

  Args:
    logits: `[..., num_experts]` router logits.

  Returns:
    Scalar float32 mean over every leading (token) position.

  Example:
    >>> router_z_loss(jnp.zeros((1, 2, 4)))  # log(4) ** 2
    Array(1.921812, dtype=float32)
  """
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(z))
