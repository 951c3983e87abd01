"""Expert-parallel MoE (all_to_all in shard_map) == single-device MoE.

Tokens are sharded over every device, the experts' leading axis over the
`expert` mesh axis. Dropless EP equals the single-device layer on the whole
batch; capacity EP equals the single-device layer on each device's tokens
(the capacity is per routing group). Outputs and gradients w.r.t. tokens,
router logits and expert weights, fp32.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from lightning_jax import moe

N, D, F, E, K = 32, 8, 12, 8, 2  # 4 tokens per device
TOL = dict(rtol=1e-5, atol=1e-5)
MESHES = {
  "data4_expert2": jax.make_mesh(
    (4, 2), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2
  ),
  "data2_expert4": jax.make_mesh(
    (2, 4), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2
  ),
}
TOKENS = P(("data", "expert"))


def _layer(x, logits, glu_weights, dispatch, expert_axis=None):
  r = moe.route(logits, K)
  if dispatch == "dropless":
    y = moe.dropless_moe(
      x, r.weights, r.experts, glu_weights, expert_axis=expert_axis
    )
  else:
    y, _ = moe.capacity_moe(
      x,
      r.weights,
      r.experts,
      glu_weights,
      capacity_factor=1.0,
      expert_axis=expert_axis,
    )
  return y


def _loss(layer, x, logits, glu_weights, cot):
  y = layer(x, logits, glu_weights)
  return jnp.sum(y * cot), y


@functools.partial(jax.jit, static_argnames="dispatch")
def _single_device(x, logits, glu_weights, cot, dispatch):
  vjp = jax.value_and_grad(
    functools.partial(_loss, functools.partial(_layer, dispatch=dispatch)),
    argnums=(0, 1, 2),
    has_aux=True,
  )
  if dispatch == "capacity":  # one routing group per device
    groups = lambda a: a.reshape(8, -1, a.shape[-1])
    (_, y), grads = jax.vmap(vjp, in_axes=(0, 0, None, 0))(
      groups(x), groups(logits), glu_weights, groups(cot)
    )
    grads = (
      grads[0].reshape(N, D),
      grads[1].reshape(N, E),
      jax.tree.map(lambda g: jnp.sum(g, 0), grads[2]),
    )
    return y.reshape(N, D), grads
  (_, y), grads = vjp(x, logits, glu_weights, cot)
  return y, grads


@functools.lru_cache(maxsize=None)
def _expert_parallel(mesh_name, dispatch):
  mesh = MESHES[mesh_name]
  layer = jax.shard_map(
    functools.partial(_layer, dispatch=dispatch, expert_axis="expert"),
    mesh=mesh,
    in_specs=(TOKENS, TOKENS, P("expert")),
    out_specs=TOKENS,
  )
  run = jax.jit(
    jax.value_and_grad(
      functools.partial(_loss, layer), argnums=(0, 1, 2), has_aux=True
    )
  )

  def call(x, logits, glu_weights, cot):
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
    args = (
      put(x, TOKENS),
      put(logits, TOKENS),
      jax.tree.map(lambda w: put(w, P("expert")), glu_weights),
      put(cot, TOKENS),
    )
    with jax.set_mesh(mesh):
      (_, y), grads = run(*args)
    return y, grads

  return call


def _problem(seed, skew):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  glu_weights = moe.GLUWeights(
    normal(E, D, F) / 3, normal(E, D, F) / 3, normal(E, F, D) / 4
  )
  # Skew towards experts 0 and 1 (both on expert-shard 0): worst-case buffers.
  logits = normal(N, E).at[:, :2].add(skew)
  return normal(N, D), logits, glu_weights, normal(N, D)


@pytest.mark.parametrize(
  "mesh_name,dispatch",
  [
    ("data4_expert2", "dropless"),
    ("data2_expert4", "dropless"),
    ("data4_expert2", "capacity"),
  ],
)
@hypothesis.given(seed=st.integers(0, 2**16), skew=st.floats(0, 8))
def test_expert_parallel_equals_single_device(mesh_name, dispatch, seed, skew):
  args = _problem(seed, skew)
  y, grads = _expert_parallel(mesh_name, dispatch)(*args)
  y_ref, grads_ref = _single_device(*args, dispatch)
  np.testing.assert_allclose(y, y_ref, **TOL)
  for a, b in zip(
    jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True
  ):
    np.testing.assert_allclose(a, b, **TOL)
