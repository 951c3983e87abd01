"""Expert parallelism: exchange routing slots with `all_to_all` in `shard_map`.

The expert axis of the expert weights is sharded over a mesh axis (say
`expert`, of size P): device `j` of that axis holds experts
`[j * E/P, (j + 1) * E/P)`. Every device routes its own tokens, sends each
slot to the device holding its expert, which runs its experts on what it
received, and sends the results back (GShard, Lepikhin et al., 2020).

XLA:CPU does not implement `ragged_all_to_all`, so the dropless exchange
uses a dense `all_to_all` with per-destination buffers padded to the worst
case (`tokens * min(top_k, E/P)` rows): exact and dropless, at P times the
ideal traffic. The capacity exchange sends the `[E, capacity]` buffers.
"""

import jax
import jax.numpy as jnp

from lightning_jax.moe import experts as experts_lib


def axis_size(axis_name) -> int:
  """Size of the bound mesh axis `axis_name`.

  Raises:
    ValueError: `axis_name` is not bound (not inside `shard_map`).
  """
  try:
    return jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
      f"`expert_axis` {axis_name!r} is not bound: call the "
      "expert-parallel MoE inside `jax.shard_map`."
    ) from e


def _all_to_all(x, axis_name):
  return jax.lax.all_to_all(x, axis_name, split_axis=0, concat_axis=0)


def dropless_exchange(
  x_NxD, experts_NxK, glu_weights, *, axis_name, activation: str
):
  """Expert outputs of every routing slot, experts sharded over `axis_name`.

  Args:
    x_NxD: `[tokens, d_model]` this device's tokens.
    experts_NxK: `[tokens, top_k]` global expert ids in `[0, E)`.
    glu_weights: this device's `GLUWeights` `[E / P, ...]`.
    axis_name: the mesh axis sharding the experts.
    activation: GLU activation.

  Returns:
    `[tokens, top_k, d_model]` expert output of every slot (not yet weighted).
  """
  num_shards = axis_size(axis_name)
  local_experts = glu_weights.w_gate.shape[0]
  num_tokens, top_k = experts_NxK.shape
  d_model = x_NxD.shape[1]
  rows = num_tokens * min(top_k, local_experts)

  slot_experts = experts_NxK.reshape(-1)
  order = jnp.argsort(slot_experts, stable=True)
  sorted_experts = slot_experts[order]
  dest = sorted_experts // local_experts
  dest_sizes = jnp.bincount(dest, length=num_shards)
  pos = jnp.arange(order.shape[0]) - (jnp.cumsum(dest_sizes) - dest_sizes)[dest]

  send_x = (
    jnp.zeros((num_shards, rows, d_model), x_NxD.dtype)
    .at[dest, pos]
    .set(x_NxD[order // top_k], unique_indices=True)
  )
  # Padding rows carry the sentinel id `local_experts`: sorted last, and
  # `ragged_dot` leaves rows past the groups at zero.
  send_id = (
    jnp.full((num_shards, rows), local_experts, jnp.int32)
    .at[dest, pos]
    .set(sorted_experts % local_experts, unique_indices=True)
  )
  recv_x = _all_to_all(send_x, axis_name).reshape(-1, d_model)
  recv_id = _all_to_all(send_id, axis_name).reshape(-1)

  recv_order = jnp.argsort(recv_id, stable=True)
  group_sizes = jnp.bincount(recv_id, length=local_experts + 1)[:-1]
  y_sorted = experts_lib.grouped_glu(
    recv_x[recv_order],
    group_sizes.astype(jnp.int32),
    glu_weights,
    activation=activation,
  )
  y_recv = (
    jnp.zeros_like(y_sorted).at[recv_order].set(y_sorted, unique_indices=True)
  )
  y_back = _all_to_all(y_recv.reshape(num_shards, rows, d_model), axis_name)
  y_slots = (
    jnp.zeros((order.shape[0], d_model), y_back.dtype)
    .at[order]
    .set(y_back[dest, pos], unique_indices=True)
  )
  return y_slots.reshape(num_tokens, top_k, d_model)


def capacity_exchange(buffer_ExCxD, glu_weights, *, axis_name, activation: str):
  """Expert outputs of capacity buffers, experts sharded over `axis_name`.

  Args:
    buffer_ExCxD: `[E, capacity, d_model]` this device's buffers for all E
      experts.
    glu_weights: this device's `GLUWeights` `[E / P, ...]`.
    axis_name: the mesh axis sharding the experts.
    activation: GLU activation.

  Returns:
    `[E, capacity, d_model]` expert outputs of this device's buffers.
  """
  num_shards = axis_size(axis_name)
  num_experts, capacity, d_model = buffer_ExCxD.shape
  local_experts = num_experts // num_shards
  send = buffer_ExCxD.reshape(num_shards, local_experts, capacity, d_model)
  recv_PxLxCxD = _all_to_all(send, axis_name)
  x_LxRxD = recv_PxLxCxD.transpose(1, 0, 2, 3).reshape(
    local_experts, num_shards * capacity, d_model
  )
  y_LxRxD = experts_lib.batched_glu(x_LxRxD, glu_weights, activation=activation)
  y_PxLxCxD = y_LxRxD.reshape(
    local_experts, num_shards, capacity, d_model
  ).transpose(1, 0, 2, 3)
  return _all_to_all(y_PxLxCxD, axis_name).reshape(buffer_ExCxD.shape)
