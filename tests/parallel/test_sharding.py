"""Meshes from specs and the partition rules, on hand-built parameter dicts;
reshaping layers that gather nothing on sharded inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import layers
from lightning_jax import models
from lightning_jax import ops
from lightning_jax import parallel
from tests import mixer_testing as mt

P = jax.sharding.PartitionSpec
D, H, DH, F, E, V = 16, 4, 8, 32, 4, 64


def _layer():
  return {
    "mixer_norm": {"scale": jnp.ones((D,))},
    "mixer": {
      "wq": jnp.zeros((D, H, DH)),
      "wk": jnp.zeros((D, 2, DH)),
      "wv": jnp.zeros((D, 2, DH)),
      "wo": jnp.zeros((H, DH, D)),
    },
    "ffn_norm": {"scale": jnp.ones((D,))},
    "ffn": {
      "router": jnp.zeros((D, E)),
      "experts": {
        "w_gate": jnp.zeros((E, D, F)),
        "w_up": jnp.zeros((E, D, F)),
        "w_down": jnp.zeros((E, F, D)),
      },
    },
  }


def _params():
  dense = _layer()
  dense["ffn"] = {
    "w_gate": jnp.zeros((D, F)),
    "w_up": jnp.zeros((D, F)),
    "w_down": jnp.zeros((F, D)),
  }
  return {
    "embed": jnp.zeros((V, D)),
    "layers": (dense, _layer()),
    "final_norm": {"scale": jnp.ones((D,))},
    "unembed": jnp.zeros((D, V)),
  }


def test_parse_mesh_spec():
  assert parallel.parse_mesh_spec("data=2, pipe=2,expert=2") == {
    "data": 2,
    "pipe": 2,
    "expert": 2,
  }
  assert parallel.parse_mesh_spec(None) == {} == parallel.parse_mesh_spec("")
  for bad in (
    "data=2,data=2",
    "model=2",
    "data",
    "data=0",
    "data=1.5",
    "data=x",
  ):
    with pytest.raises(ValueError, match="spec"):
      parallel.parse_mesh_spec(bad)


def test_make_mesh():
  mesh = parallel.make_mesh("data=2,tensor=4")
  assert parallel.mesh_axis_sizes(mesh) == {"data": 2, "tensor": 4}
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
  assert parallel.make_mesh(None).shape == {"data": 8}
  assert parallel.axis_size(mesh, "pipe") == 1
  with pytest.raises(
    ValueError,
    match=r"needs 4 devices, but there are 8"
    r"(.|\n)*7: cpu",
  ):
    parallel.make_mesh("data=2,pipe=2")


def test_rules_tensor_fsdp_expert():
  mesh = parallel.make_mesh("fsdp=2,tensor=2,expert=2")
  specs = parallel.param_partition_specs(_params(), mesh)
  dense, moe = specs["layers"]
  assert specs["embed"] == P("tensor", "fsdp")
  assert specs["unembed"] == P("fsdp", "tensor")
  assert dense["mixer"]["wq"] == P("fsdp", "tensor", None)
  assert dense["mixer"]["wk"] == P("fsdp", "tensor", None)
  assert dense["mixer"]["wo"] == P("tensor", None, "fsdp")
  assert dense["mixer_norm"]["scale"] == P(None)
  assert dense["ffn"]["w_gate"] == P("fsdp", "tensor")
  assert dense["ffn"]["w_down"] == P("tensor", "fsdp")
  assert moe["ffn"]["experts"]["w_up"] == P("expert", "fsdp", "tensor")
  assert moe["ffn"]["experts"]["w_down"] == P("expert", "tensor", "fsdp")
  assert moe["ffn"]["router"] == P("fsdp", None)


def test_rules_not_divisible_replicate_and_say_so():
  mesh = parallel.make_mesh("tensor=4,fsdp=2")
  specs = parallel.param_partition_specs(_params(), mesh)
  assert specs["layers"][0]["mixer"]["wk"] == P(
    "fsdp", None, None
  )  # 2 kv heads
  summary = parallel.sharding_summary(_params(), mesh)
  assert "heads=2 not divisible by tensor=4: replicated" in summary
  row = next(
    r for r in summary.splitlines() if r.startswith("layers/0/mixer/wk")
  )
  assert f"{D * 2 * DH * 4 // 2:,}" in row  # fp32, halved by fsdp only


def test_rules_apply_inside_optimizer_state_and_stages():
  mesh = parallel.make_mesh("pipe=2,tensor=2,fsdp=2")
  # The pipeline layout [repeats, stages, layers_per_stage, ...].
  stacked = jax.tree.map(lambda x: jnp.zeros((3, 2, 1, *x.shape)), _layer())
  stacked["mystery"] = jnp.zeros((3, 2, 1, 6))  # no rule
  state = ({"mu": {"stages": stacked}, "count": jnp.zeros((), jnp.int32)},)
  specs = parallel.param_partition_specs(state, mesh)[0]
  assert specs["mu"]["stages"]["mixer"]["wq"] == P(
    None, "pipe", None, "fsdp", "tensor", None
  )
  assert specs["mu"]["stages"]["mixer_norm"]["scale"] == P(
    None, "pipe", None, None
  )
  assert specs["mu"]["stages"]["mystery"] == P(None, "pipe", None, "fsdp")
  assert specs["count"] == P()
  # A plain [stages, ...] stack (mixer rules match under the "mixer" key).
  layer = {"mixer": _layer()["mixer"]}
  stacked = jax.tree.map(lambda x: jnp.zeros((2, *x.shape)), layer)
  specs = parallel.param_partition_specs(
    {"stages": stacked}, mesh, stage_axis=0
  )
  assert specs["stages"]["mixer"]["wo"] == P("pipe", "tensor", None, "fsdp")
  with pytest.raises(ValueError, match="stage_axis"):
    parallel.param_partition_specs({"stages": stacked}, mesh)


def _init(key):
  k1, k2 = jax.random.split(key)
  return {
    "embed": jax.random.normal(k1, (V, D)),
    "layers": ({"ffn": {"w_up": jax.random.normal(k2, (D, F))}},),
  }


def test_init_sharded_matches_unsharded_and_summary():
  mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
  key = jax.random.key(0)
  params = parallel.init_sharded(_init, key, mesh)
  assert params["embed"].sharding.spec == P("tensor", "fsdp")
  shard = params["layers"][0]["ffn"]["w_up"].addressable_shards[0]
  assert shard.data.shape == (D // 2, F // 2)
  jax.tree.map(np.testing.assert_array_equal, params, _init(key))
  summary = parallel.sharding_summary(params, mesh)
  assert summary.splitlines()[0] == "mesh: data=2, fsdp=2, tensor=2"
  assert "per device: " in summary and "(25.0%)" in summary


def test_batch_sharding():
  assert parallel.batch_spec(
    parallel.make_mesh("data=2,expert=2,tensor=2")
  ) == P(("data", "expert"), None)
  assert parallel.batch_spec(parallel.make_mesh("fsdp=4,seq=2")) == P(
    ("fsdp",), "seq"
  )
  assert parallel.batch_spec(parallel.make_mesh("tensor=8")) == P(None, None)


def test_shard_step_keeps_shardings():
  mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
  params = parallel.init_sharded(_init, jax.random.key(1), mesh)
  shardings = jax.tree.map(lambda x: x.sharding, params)

  def step(p, batch):
    loss = lambda p: jnp.mean(
      (p["embed"][batch] @ p["layers"][0]["ffn"]["w_up"]) ** 2
    )
    value, grads = jax.value_and_grad(loss)(p)
    return jax.tree.map(lambda w, g: w - 0.1 * g, p, grads), {"loss": value}

  batch = jnp.arange(16).reshape(4, 4) % V
  expected = step(params, batch)
  sharded = parallel.shard_step(
    step, mesh, shardings, parallel.batch_sharding(mesh), donate=False
  )
  new, metrics = sharded(params, batch)
  assert jax.tree.map(lambda x: x.sharding, new) == shardings
  np.testing.assert_allclose(metrics["loss"], expected[1]["loss"], rtol=1e-6)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
    new,
    expected[0],
  )


def _configs_of_every_preset_and_mixer():
  small = dict(d_model=32, num_heads=4, head_dim=8)
  for name in models.preset_names():
    yield models.get_preset(name, **small)
  for kind in mt.kinds():
    yield models.get_preset(
      "transformer",
      pattern=(kind,),
      num_layers=1,
      **small,
      **mt.overrides(kind, 1, 4),
    )


def test_every_model_param_has_a_rule():
  """Each preset's and each registered mixer's leaves match a rule (so
  stage stacking finds their dims)."""
  mesh = parallel.make_mesh("fsdp=2,tensor=2,expert=2")
  for cfg in _configs_of_every_preset_and_mixer():
    abstract = jax.eval_shape(
      functools.partial(models.init, cfg=cfg), jax.random.key(0)
    )
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    sizes = parallel.mesh_axis_sizes(mesh)
    for path, leaf in flat:
      names = parallel.sharding.path_names(path)
      plan = parallel.plan_leaf(names, leaf.shape, sizes)
      assert plan.rule != "-", names
      assert not plan.notes, (names, plan.notes)


def _all_gathers(fn, args, mesh, spec):
  """All-gathers in the compiled gradient of `sum(fn(*args) ** 2)` with
  every arg sharded `spec` on `mesh`."""
  with jax.set_mesh(mesh):
    args = [jax.device_put(a, jax.NamedSharding(mesh, spec)) for a in args]
    loss = lambda *a: jnp.sum(fn(*a) ** 2)
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    return grad.lower(*args).compile().as_text().count(" all-gather(")


def test_norm_and_gla_layouts_gather_nothing():
  """The norms and GLA's sub-blocks reshape their inputs (size-1 axes go,
  `ops.drop_unit_axes`); merging axes sharded over different mesh axes
  instead made XLA gather them (1 and 7 all-gathers here)."""
  mesh = parallel.make_mesh("data=2,tensor=4")
  x = jnp.ones((4, 16, 8, D))
  norm = lambda x: layers.rms_norm(layers.init_rms_norm(D), x)
  assert _all_gathers(norm, [x], mesh, P("data", None, "tensor")) == 0
  gla = lambda q, k, v, g: ops.gated_linear_attention(
    q, k, v, -jax.nn.softplus(g), chunk_size=8
  )
  assert _all_gathers(gla, [x] * 4, mesh, P("data", None, "tensor")) == 0
