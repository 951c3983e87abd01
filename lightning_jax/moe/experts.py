"""GLU expert MLPs: one expert, a batch of experts, grouped (ragged) experts."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lightning_jax import _checks

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


class GLUWeights(NamedTuple):
  """GLU MLP weights, optionally stacked on a leading expert axis `[E, ...]`.

  Attributes:
    w_gate: `[..., d_model, d_ff]`.
    w_up: `[..., d_model, d_ff]`.
    w_down: `[..., d_ff, d_model]`.
  """

  w_gate: jax.Array
  w_up: jax.Array
  w_down: jax.Array


def _activation(name: str):
  _checks.check_choice("activation", name, tuple(ACTIVATIONS))
  return ACTIVATIONS[name]


def glu(x_NxD, weights: GLUWeights, *, activation: str = "silu"):
  """GLU MLP `(act(x W_gate) * x W_up) W_down` (Shazeer, 2020, "GLU Variants").

  Matmuls accumulate in float32; the hidden is cast back to the input dtype
  before the down projection; the output has the input dtype.

  Args:
    x_NxD: `[..., d_model]` inputs.
    weights: `GLUWeights` with `[d_model, d_ff]`, `[d_model, d_ff]`,
      `[d_ff, d_model]`.
    activation: "silu" (SwiGLU), "gelu" (GeGLU) or "relu" (ReGLU).

  Returns:
    `[..., d_model]` in `x_NxD.dtype`.

  Example:
    >>> w = GLUWeights(jnp.ones((4, 8)), jnp.ones((4, 8)), jnp.ones((8, 4)))
    >>> glu(jnp.ones((3, 4)), w).shape
    (3, 4)
  """
  act = _activation(activation)
  dot = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  h = act(dot(x_NxD, weights.w_gate)) * dot(x_NxD, weights.w_up)
  return dot(h.astype(x_NxD.dtype), weights.w_down).astype(x_NxD.dtype)


def grouped_glu(
  x_MxD, group_sizes_E, weights: GLUWeights, *, activation: str = "silu"
):
  """GLU experts on rows sorted by expert, with `jax.lax.ragged_dot`.

  Rows `[sum(group_sizes[:e]), sum(group_sizes[:e+1]))` go through expert
  `e`; rows past `sum(group_sizes)` give zeros (padding).

  Args:
    x_MxD: `[rows, d_model]` rows grouped by expert.
    group_sizes_E: `[num_experts]` int32 rows per expert.
    weights: `GLUWeights` stacked `[num_experts, ...]`.
    activation: see `glu`.

  Returns:
    `[rows, d_model]` in `x_MxD.dtype`.

  Example:
    >>> w = GLUWeights(jnp.ones((2, 4, 8)), jnp.ones((2, 4, 8)),
    ...                jnp.ones((2, 8, 4)))
    >>> grouped_glu(jnp.ones((3, 4)), jnp.array([1, 2]), w).shape
    (3, 4)
  """
  act = _activation(activation)
  dot = functools.partial(
    jax.lax.ragged_dot,
    group_sizes=group_sizes_E,
    preferred_element_type=jnp.float32,
  )
  h = act(dot(x_MxD, weights.w_gate)) * dot(x_MxD, weights.w_up)
  return dot(h.astype(x_MxD.dtype), weights.w_down).astype(x_MxD.dtype)


def batched_glu(x_ExCxD, weights: GLUWeights, *, activation: str = "silu"):
  """Expert `e` applied to `x_ExCxD[e]` (capacity buffers).

  Args:
    x_ExCxD: `[num_experts, capacity, d_model]`.
    weights: `GLUWeights` stacked `[num_experts, ...]`.
    activation: see `glu`.

  Returns:
    `[num_experts, capacity, d_model]` in `x_ExCxD.dtype`.
  """
  return jax.vmap(functools.partial(glu, activation=activation))(
    x_ExCxD, weights
  )
