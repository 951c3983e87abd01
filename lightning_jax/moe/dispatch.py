"""Dispatch tokens to experts and combine: dropless (grouped) or capacity."""

import math

import jax
import jax.numpy as jnp

from lightning_jax import _checks
from lightning_jax.moe import expert_parallel
from lightning_jax.moe import experts as experts_lib
from lightning_jax.moe import routing

DROPLESS_IMPLS = ("ragged", "loop")
DROP_POLICIES = ("position", "probability")


def _check_tokens(x_NxD, weights_NxK, experts_NxK, glu_weights) -> None:
  _checks.check_rank("x_NxD", x_NxD, 2, "[tokens, d_model]")
  _checks.check_rank("weights_NxK", weights_NxK, 2, "[tokens, top_k]")
  _checks.check_shape(
    "experts_NxK", experts_NxK, weights_NxK.shape, "[tokens, top_k]"
  )
  if weights_NxK.shape[0] != x_NxD.shape[0]:
    raise ValueError(
      f"`weights_NxK` must have {x_NxD.shape[0]} tokens (the "
      f"rows of `x_NxD`), got shape {weights_NxK.shape}."
    )
  num_experts, d_model, d_ff = glu_weights.w_gate.shape
  _checks.check_shape(
    "glu_weights.w_up",
    glu_weights.w_up,
    (num_experts, d_model, d_ff),
    "[num_experts, d_model, d_ff]",
  )
  _checks.check_shape(
    "glu_weights.w_down",
    glu_weights.w_down,
    (num_experts, d_ff, d_model),
    "[num_experts, d_ff, d_model]",
  )
  if d_model != x_NxD.shape[1]:
    raise ValueError(
      f"`glu_weights` d_model = {d_model} must match the last "
      f"dim of `x_NxD` {x_NxD.shape}."
    )


def _num_experts(glu_weights, expert_axis) -> int:
  """All experts: this device's times the `expert_axis` size (if any)."""
  num_experts = glu_weights.w_gate.shape[0]
  if expert_axis is not None:
    num_experts *= expert_parallel.axis_size(expert_axis)
  return num_experts


def _combine(y_NxKxD, weights_NxK, dtype):
  """`sum_k weights[n, k] * y[n, k]` in float32, returned in `dtype`."""
  y = jnp.einsum(
    "nkd,nk->nd", y_NxKxD.astype(jnp.float32), weights_NxK.astype(jnp.float32)
  )
  return y.astype(dtype)


def _dropless_loop(x_NxD, weights_NxK, experts_NxK, glu_weights, activation):
  """Reference: every expert on every token, masked by its combine weight."""
  y = jnp.zeros(x_NxD.shape, jnp.float32)
  for e in range(glu_weights.w_gate.shape[0]):
    w_e = jax.tree.map(lambda w, e=e: w[e], glu_weights)
    gate = jnp.sum(jnp.where(experts_NxK == e, weights_NxK, 0.0), axis=-1)
    y_e = experts_lib.glu(x_NxD, w_e, activation=activation)
    y = y + gate[:, None] * y_e.astype(jnp.float32)
  return y.astype(x_NxD.dtype)


def dropless_moe(
  x_NxD,
  weights_NxK,
  experts_NxK,
  glu_weights,
  *,
  activation: str = "silu",
  impl: str = "ragged",
  expert_axis=None,
):
  """Dropless MoE: every routing slot is computed by its expert.

  `impl="ragged"` sorts the `tokens * top_k` slots by expert, runs the GLU
  experts as grouped matmuls (`jax.lax.ragged_dot`), unsorts and combines
  with the router weights (MegaBlocks-style, Gale et al., 2022).
  `impl="loop"` is the reference: a plain loop over experts.

  Args:
    x_NxD: `[tokens, d_model]`.
    weights_NxK: `[tokens, top_k]` combine weights (`Routing.weights`).
    experts_NxK: `[tokens, top_k]` int expert ids (`Routing.experts`) in
      `[0, num_experts)`; under `jit`, a slot with an id outside gets a zero
      output.
    glu_weights: `GLUWeights` stacked `[num_experts, ...]`; with
      `expert_axis`, this device's `num_experts / axis_size` experts.
    activation: GLU activation, see `experts.glu`.
    impl: "ragged" or "loop".
    expert_axis: mesh axis that shards the experts (inside `shard_map`):
      slots are exchanged with `all_to_all` (see `expert_parallel`).

  Returns:
    `[tokens, d_model]` in `x_NxD.dtype`.

  Raises:
    ValueError: shapes disagree, a concrete expert id is outside
      `[0, num_experts)`, `impl` is unknown, or `impl="loop"` with
      `expert_axis`.

  Example:
    >>> w = GLUWeights(jnp.ones((4, 8, 16)), jnp.ones((4, 8, 16)),
    ...                jnp.ones((4, 16, 8)))
    >>> r = route(jnp.zeros((5, 4)), top_k=2)
    >>> dropless_moe(jnp.ones((5, 8)), r.weights, r.experts, w).shape
    (5, 8)
  """
  _check_tokens(x_NxD, weights_NxK, experts_NxK, glu_weights)
  _checks.check_choice("impl", impl, DROPLESS_IMPLS)
  if impl == "loop" and expert_axis is not None:
    raise ValueError(
      f"`impl='loop'` is single-device; got expert_axis={expert_axis!r}."
    )
  num_experts = _num_experts(glu_weights, expert_axis)
  experts_NxK = routing.expert_ids("experts_NxK", experts_NxK, num_experts)
  weights_NxK = jnp.where(experts_NxK < num_experts, weights_NxK, 0.0)
  if impl == "loop":
    return _dropless_loop(
      x_NxD, weights_NxK, experts_NxK, glu_weights, activation
    )
  if expert_axis is not None:
    y_NxKxD = expert_parallel.dropless_exchange(
      x_NxD,
      experts_NxK,
      glu_weights,
      axis_name=expert_axis,
      activation=activation,
    )
    return _combine(y_NxKxD, weights_NxK, x_NxD.dtype)
  num_tokens, top_k = experts_NxK.shape
  slot_experts = experts_NxK.reshape(-1)
  order = jnp.argsort(slot_experts, stable=True)
  group_sizes = jnp.bincount(slot_experts, length=num_experts)
  x_sorted = x_NxD[order // top_k]
  y_sorted = experts_lib.grouped_glu(
    x_sorted, group_sizes.astype(jnp.int32), glu_weights, activation=activation
  )
  y_slots = (
    jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
  )
  return _combine(
    y_slots.reshape(num_tokens, top_k, -1), weights_NxK, x_NxD.dtype
  )


def expert_capacity(
  num_tokens: int, top_k: int, num_experts: int, capacity_factor: float
) -> int:
  """Slots per expert: `ceil(tokens * top_k / num_experts * capacity_factor)`.

  Args:
    num_tokens: tokens routed together (on this device).
    top_k: slots per token.
    num_experts: number of experts.
    capacity_factor: > 0; 1.0 fits a perfectly balanced load.

  Returns:
    The capacity, an int >= 1.

  Raises:
    ValueError: `capacity_factor <= 0`.

  Example:
    >>> expert_capacity(10, 2, 4, 1.25)
    7
  """
  if not capacity_factor > 0:
    raise ValueError(f"`capacity_factor` must be > 0, got {capacity_factor}.")
  return max(1, math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def capacity_slots(
  weights_NxK,
  experts_NxK,
  *,
  num_experts: int,
  capacity: int,
  drop_policy: str = "position",
):
  """Buffer position of every routing slot in its expert, and whether it fits.

  Slots are served choice-major (all first choices before any second choice,
  as in GShard); within a choice rank, `drop_policy="position"` serves tokens
  in order, `"probability"` by descending router weight (Riquelme et al.,
  2021, "Batch Prioritized Routing"). The first `capacity` slots of every
  expert are kept, the rest dropped.

  Args:
    weights_NxK: `[tokens, top_k]` router weights.
    experts_NxK: `[tokens, top_k]` int expert ids in `[0, num_experts)`;
      under `jit`, a slot with an id outside is not kept.
    num_experts: number of experts.
    capacity: slots per expert.
    drop_policy: "position" or "probability".

  Returns:
    `(position_NxK, kept_NxK)`: int32 rank of each slot within its expert's
    queue, and bool `position < capacity` (and a valid expert id).

  Raises:
    ValueError: `drop_policy` is unknown or a concrete expert id is outside
      `[0, num_experts)`.

  Example:
    >>> pos, kept = capacity_slots(jnp.ones((3, 1)), jnp.zeros((3, 1), int),
    ...                            num_experts=2, capacity=2)
    >>> kept[:, 0]
    Array([ True,  True, False], dtype=bool)
  """
  _checks.check_choice("drop_policy", drop_policy, DROP_POLICIES)
  experts_NxK = routing.expert_ids("experts_NxK", experts_NxK, num_experts)
  num_tokens, top_k = experts_NxK.shape
  token_NxK = jnp.broadcast_to(
    jnp.arange(num_tokens)[:, None], experts_NxK.shape
  )
  choice_NxK = jnp.broadcast_to(jnp.arange(top_k)[None, :], experts_NxK.shape)
  if drop_policy == "position":
    within_choice = token_NxK
  else:
    within_choice = -jax.lax.stop_gradient(weights_NxK)
  # Primary key last: expert, then choice rank, then position / probability.
  order = jnp.lexsort(
    (within_choice.reshape(-1), choice_NxK.reshape(-1), experts_NxK.reshape(-1))
  )
  sorted_experts = experts_NxK.reshape(-1)[order]
  group_sizes = jnp.bincount(sorted_experts, length=num_experts)
  starts = jnp.cumsum(group_sizes) - group_sizes
  rank_sorted = jnp.arange(order.shape[0]) - starts[sorted_experts]
  position = (
    jnp.zeros_like(rank_sorted).at[order].set(rank_sorted, unique_indices=True)
  )
  position = position.reshape(num_tokens, top_k).astype(jnp.int32)
  return position, (position < capacity) & (experts_NxK < num_experts)


def capacity_moe(
  x_NxD,
  weights_NxK,
  experts_NxK,
  glu_weights,
  *,
  capacity_factor: float,
  drop_policy: str = "position",
  activation: str = "silu",
  expert_axis=None,
):
  """Capacity-based MoE (GShard / Switch): fixed `[experts, capacity]` buffers.

  Overflowing slots are dropped (see `capacity_slots`): their expert output
  is zero, so a token whose every slot is dropped passes through the
  caller's residual connection unchanged. Kept slots keep their router
  weight (no renormalisation).

  Args:
    x_NxD: `[tokens, d_model]` (the tokens that share the capacity).
    weights_NxK: `[tokens, top_k]` combine weights.
    experts_NxK: `[tokens, top_k]` int expert ids in `[0, num_experts)`;
      under `jit`, a slot with an id outside is dropped.
    glu_weights: `GLUWeights` stacked `[num_experts, ...]` (this device's
      experts with `expert_axis`).
    capacity_factor: see `expert_capacity`.
    drop_policy: "position" or "probability".
    activation: GLU activation.
    expert_axis: mesh axis that shards the experts (inside `shard_map`): the
      buffers are exchanged with `all_to_all`.

  Returns:
    `(y_NxD, kept_NxK)`: output in `x_NxD.dtype` and the bool mask of kept
    slots.

  Raises:
    ValueError: bad shapes, `capacity_factor` or `drop_policy`, or a
      concrete expert id outside `[0, num_experts)`.

  Example:
    >>> w = GLUWeights(jnp.ones((4, 8, 16)), jnp.ones((4, 8, 16)),
    ...                jnp.ones((4, 16, 8)))
    >>> r = route(jnp.zeros((5, 4)), top_k=1)
    >>> y, kept = capacity_moe(jnp.ones((5, 8)), r.weights, r.experts, w,
    ...                        capacity_factor=1.0)
    >>> kept.sum()  # every token picks expert 0, capacity 2
    Array(2, dtype=int32)
  """
  _check_tokens(x_NxD, weights_NxK, experts_NxK, glu_weights)
  num_tokens, top_k = experts_NxK.shape
  num_experts = _num_experts(glu_weights, expert_axis)
  experts_NxK = routing.expert_ids("experts_NxK", experts_NxK, num_experts)
  capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
  position, kept = capacity_slots(
    weights_NxK,
    experts_NxK,
    num_experts=num_experts,
    capacity=capacity,
    drop_policy=drop_policy,
  )
  x_NxKxD = jnp.broadcast_to(
    x_NxD[:, None, :], (num_tokens, top_k, x_NxD.shape[1])
  )
  buffer_ExCxD = (
    jnp.zeros((num_experts, capacity, x_NxD.shape[1]), x_NxD.dtype)
    .at[experts_NxK, position]
    .set(x_NxKxD, mode="drop")
  )
  if expert_axis is None:
    y_ExCxD = experts_lib.batched_glu(
      buffer_ExCxD, glu_weights, activation=activation
    )
  else:
    y_ExCxD = expert_parallel.capacity_exchange(
      buffer_ExCxD, glu_weights, axis_name=expert_axis, activation=activation
    )
  y_NxKxD = y_ExCxD.at[experts_NxK, position].get(mode="fill", fill_value=0)
  y = _combine(y_NxKxD, jnp.where(kept, weights_NxK, 0.0), x_NxD.dtype)
  return y, kept
