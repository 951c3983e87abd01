"""MoE and MH-MoE layers: aux, MH-MoE reductions, sharded == one device."""

import dataclasses
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

from lightning_jax import layers
from lightning_jax import moe

B, T, D = 8, 4, 8
CFG = layers.MoEConfig(d_model=D, d_ff=12, num_experts=4, top_k=2)
TOL = dict(rtol=1e-5, atol=1e-5)
_init_moe = jax.jit(layers.init_moe, static_argnums=1)


def _params(init, cfg, seed=0):
  """Fan-in scaled numpy params with the structure of `init(key, cfg)`
  (no PRNG kernels to compile; `test_init_shapes` runs the real init)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(init, cfg=cfg), jax.random.key(0))
  return jax.tree.map(
    lambda s: jnp.asarray(
      rng.standard_normal(s.shape) * s.shape[-2] ** -0.5, s.dtype
    ),
    shapes,
  )


_moe = jax.jit(layers.moe, static_argnums=2)
_mh_moe = jax.jit(layers.mh_moe, static_argnums=2)


def _x(seed=1, shape=(B, T, D)):
  return jnp.asarray(
    np.random.default_rng(seed).standard_normal(shape), jnp.float32
  )


def test_init_shapes():
  p = _init_moe(jax.random.key(0), CFG)
  np.testing.assert_allclose(np.std(p["experts"]["w_gate"]), D**-0.5, rtol=0.3)
  assert p["router"].shape == (D, 4) and p["router"].dtype == jnp.float32
  assert p["experts"]["w_gate"].shape == (4, D, 12)
  assert p["experts"]["w_down"].shape == (4, 12, D)


def test_moe_matches_routing_and_expert_loop_and_reports_aux():
  params = _params(layers.init_moe, CFG)
  x = _x()
  y, aux = _moe(params, x, CFG)
  logits = jnp.einsum("btd,de->bte", x, params["router"])
  r = moe.route(logits, 2)
  ref = moe.dropless_moe(
    x.reshape(-1, D),
    r.weights.reshape(-1, 2),
    r.experts.reshape(-1, 2),
    moe.GLUWeights(**params["experts"]),
    impl="loop",
  )
  np.testing.assert_allclose(y, ref.reshape(B, T, D), **TOL)
  np.testing.assert_allclose(
    aux.load_balancing_loss,
    moe.load_balancing_loss(r.probs, r.experts, num_experts=4),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    aux.router_z_loss, moe.router_z_loss(logits), rtol=1e-6
  )
  counts = np.bincount(np.asarray(r.experts).ravel(), minlength=4)
  np.testing.assert_array_equal(aux.lbl_pieces.expert_counts, counts)
  np.testing.assert_allclose(aux.load.expert_load, counts / counts.sum())
  assert float(aux.load.dropped_fraction) == 0.0


def test_capacity_layer_without_overflow_equals_dropless_and_reports_drops():
  params = _params(layers.init_moe, CFG)
  x = _x()
  big = dataclasses.replace(CFG, dispatch="capacity", capacity_factor=4.0)
  y_drop, _ = _moe(params, x, CFG)
  y_cap, aux = _moe(params, x, big)
  np.testing.assert_allclose(y_cap, y_drop, **TOL)
  assert float(aux.load.dropped_fraction) == 0.0
  small = dataclasses.replace(big, capacity_factor=0.5)
  _, aux = _moe(params, x, small)
  # Capacity 0.5 fits at most half of the slots.
  assert float(aux.load.dropped_fraction) >= 0.5


def test_router_bias_changes_selection():
  params = _params(layers.init_moe, CFG)
  bias = jnp.array([0.0, 0.0, 0.0, 100.0])
  _, aux = layers.moe(params, _x(), CFG, router_bias=bias)
  assert float(aux.load.expert_load[3]) == 0.5  # every token picks expert 3


def _mh_cfg(num_heads):
  return layers.MHMoEConfig(num_heads, CFG)


def test_mh_moe_with_one_head_and_identity_projections_is_moe():
  cfg = _mh_cfg(1)
  params = _params(layers.init_mh_moe, cfg)
  params = dict(params, head_proj=jnp.eye(D), merge_proj=jnp.eye(D))
  x, cot = _x(), _x(2)

  @jax.jit
  def both(params, x, cot):
    def value_and_input_grad(layer):
      (y, aux), vjp = jax.vjp(layer, x)
      return (
        y,
        aux.load_balancing_loss,
        vjp((cot, jax.tree.map(jnp.zeros_like, aux)))[0],
      )

    return (
      value_and_input_grad(lambda x: layers.mh_moe(params, x, cfg)),
      value_and_input_grad(lambda x: layers.moe(params["moe"], x, CFG)),
    )

  (y, lbl, dx), (y_ref, lbl_ref, dx_ref) = both(params, x, cot)
  np.testing.assert_allclose(y, y_ref, **TOL)
  np.testing.assert_allclose(lbl, lbl_ref, rtol=1e-6)
  np.testing.assert_allclose(dx, dx_ref, **TOL)


def test_mh_moe_routes_each_sub_token_independently():
  cfg = _mh_cfg(2)
  params = _params(layers.init_mh_moe, cfg)
  x = _x()
  y, aux = _mh_moe(params, x, cfg)

  @jax.jit
  def reference(params, x):
    heads = (x @ params["head_proj"]).reshape(B, T, 2, D // 2)
    per_head = [
      layers.moe(params["moe"], heads[:, :, j], cfg.sub_token_moe)[0]
      for j in range(2)
    ]
    merged = jnp.stack(per_head, axis=2).reshape(B, T, D)
    return merged @ params["merge_proj"]

  np.testing.assert_allclose(y, reference(params, x), **TOL)
  assert float(aux.lbl_pieces.num_tokens) == B * T * 2
  assert params["moe"]["experts"]["w_gate"].shape == (4, D // 2, 12)


MESH = jax.make_mesh(
  (4, 2), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2
)
AXES = ("data", "expert")
GLOBAL_CFG = dataclasses.replace(CFG, lbl_scope="global")


def _objective(y, aux, cot):
  return jnp.sum(y * cot) + 0.1 * aux.load_balancing_loss


@jax.jit
def _one_device(params, x, cot):
  def f(params, x):
    y, aux = layers.moe(params, x, CFG)  # whole batch: micro == global
    return _objective(y, aux, cot), y

  return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)


def _sharded_step():
  param_specs = {
    "router": P(),
    "experts": jax.tree.map(
      lambda _: P("expert"), {"w_gate": 0, "w_up": 0, "w_down": 0}
    ),
  }
  layer = jax.shard_map(
    lambda p, x: jax.tree.map(
      lambda a: a[None] if a.ndim == 0 else a,
      layers.moe(p, x, GLOBAL_CFG, lbl_axis=AXES, expert_axis="expert"),
    ),
    mesh=MESH,
    in_specs=(param_specs, P(AXES)),
    out_specs=(P(AXES), P(AXES)),
  )

  def f(params, x, cot):
    y, aux = layer(params, x)
    # Mean-reduction of the per-device aux losses across all devices.
    lbl = jnp.mean(aux.load_balancing_loss)
    return jnp.sum(y * cot) + 0.1 * lbl, y

  run = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  def call(params, x, cot):
    put = lambda a, s: jax.device_put(a, NamedSharding(MESH, s))
    params = jax.tree.map(put, params, param_specs)
    with jax.set_mesh(MESH):
      return run(params, put(x, P(AXES)), put(cot, P(AXES)))

  return call


SHARDED_STEP = _sharded_step()


@hypothesis.settings(max_examples=4)
@hypothesis.given(seed=st.integers(0, 2**16))
def test_expert_parallel_global_lbl_layer_equals_one_device(seed):
  """Tokens on data x expert, experts on `expert`, global LBL: the layer's
  output, mean aux loss and all gradients equal the one-device layer."""
  params = _params(layers.init_moe, CFG, seed)
  x, cot = _x(seed + 1), _x(seed + 2)
  (v, y), grads = SHARDED_STEP(params, x, cot)
  (v_ref, y_ref), grads_ref = _one_device(params, x, cot)
  np.testing.assert_allclose(v, v_ref, **TOL)
  np.testing.assert_allclose(y, y_ref, **TOL)
  for a, b in zip(
    jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True
  ):
    np.testing.assert_allclose(a, b, **TOL)


def test_bad_config_and_input():
  with pytest.raises(ValueError, match="top_k"):
    layers.MoEConfig(d_model=8, d_ff=8, num_experts=2, top_k=3)
  with pytest.raises(ValueError, match="lbl_scope"):
    layers.MoEConfig(d_model=8, d_ff=8, num_experts=2, lbl_scope="batch")
  with pytest.raises(ValueError, match="dispatch"):
    layers.MoEConfig(d_model=8, d_ff=8, num_experts=2, dispatch="sparse")
  with pytest.raises(ValueError, match="capacity_factor"):
    layers.MoEConfig(d_model=8, d_ff=8, num_experts=2, capacity_factor=0.0)
  with pytest.raises(ValueError, match="num_heads"):
    layers.MHMoEConfig(3, CFG)
  params = _params(layers.init_moe, CFG)
  with pytest.raises(ValueError, match="x_BxTxD"):
    layers.moe(params, jnp.ones((2, 3, 4)), CFG)
  with pytest.raises(ValueError, match="axis_name"):
    layers.moe(params, _x(), GLOBAL_CFG)
  with pytest.raises(ValueError, match="axis_name"):
    layers.moe(params, _x(), CFG, lbl_axis="data")
