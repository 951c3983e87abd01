"""Pipelined model == `training.loss_fn`: loss, metrics and gradients.

Every schedule (gpipe, circular R=2, SPMD 1f1b) over S in {2, 4} and M in
{S, 2S, 3S}, on a tiny MoE model with the exact global-batch LBL (so bubble
ticks and microbatching must not change the expert counts), then every
registered mixer under every schedule, then mixed meshes.
fp32; tolerance: loss rtol 1e-5, gradients 2e-5 of each leaf's largest
entry, and for every mixer also |g - g_seq|_2 <= 1e-5 |g_seq|_2 per leaf.
The same comparison in float64 agrees to <= 3e-14 for every built-in kind
and schedule (docs/pipeline.md): what is left in fp32 is rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import models
from lightning_jax import parallel
from lightning_jax import training
from lightning_jax.parallel import pipeline
from tests import mixer_testing as mt

_BATCH, _SEQ, _VOCAB = 24, 8, 32
_LOSS_CFG = training.LossConfig(lbl_coef=0.1, z_coef=0.01)


def _model(num_layers, **overrides):
  """One attention + MoE block per layer, 16 wide (cheap to compile)."""
  fields = dict(
    vocab_size=_VOCAB,
    d_model=16,
    num_layers=num_layers,
    pattern=("attention",),
    ffn_pattern=("moe",),
    num_heads=2,
    head_dim=8,
    num_experts=4,
    top_k=2,
    moe_d_ff=16,
    attention_impl="reference",
    tie_embeddings=False,
  )
  fields.update(overrides)
  return models.get_preset("moe-hybrid", **fields)


def _batch():
  k1, k2 = jax.random.split(jax.random.key(1))
  positions = jnp.arange(_BATCH * _SEQ).reshape(_BATCH, _SEQ)
  return {
    "inputs": jax.random.randint(k1, (_BATCH, _SEQ), 0, _VOCAB),
    "targets": jax.random.randint(k2, (_BATCH, _SEQ), 0, _VOCAB),
    "mask": (positions % 5 != 0).astype(jnp.float32),
  }


@functools.cache
def _reference(num_layers, **overrides):
  """Params, batch and ((loss, metrics), grads) of `training.loss_fn`."""
  cfg = _model(num_layers, **overrides)
  params = models.init(jax.random.key(num_layers), cfg)
  batch = _batch()
  grad_fn = jax.value_and_grad(
    functools.partial(training.loss_fn, model_cfg=cfg, loss_cfg=_LOSS_CFG),
    has_aux=True,
  )
  return cfg, params, batch, jax.jit(grad_fn)(params, batch, jax.random.key(0))


def _assert_same(got, want, grad_atol=2e-5, grad_rtol=None):
  (loss, metrics), grads = got
  (want_loss, want_metrics), want_grads = want
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert set(metrics) == set(want_metrics)
  for name in want_metrics:
    np.testing.assert_allclose(
      metrics[name], want_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name
    )
  for path, g, w in zip(
    jax.tree_util.tree_leaves_with_path(want_grads),
    jax.tree.leaves(grads),
    jax.tree.leaves(want_grads),
    strict=True,
  ):
    scale = float(jnp.max(jnp.abs(w))) + 1e-12
    np.testing.assert_allclose(
      g,
      w,
      rtol=0,
      atol=grad_atol * scale,
      err_msg=jax.tree_util.keystr(path[0]),
    )
    if grad_rtol is not None:  # |g - w|_2 / |w|_2, per leaf
      rel = float(jnp.linalg.norm(g - w) / (jnp.linalg.norm(w) + 1e-30))
      assert rel <= grad_rtol, (jax.tree_util.keystr(path[0]), rel)


def _pipe_mesh(num_stages):
  """`pipe` alone (compiles faster; mixed meshes are tested below)."""
  return parallel.make_mesh(
    {"pipe": num_stages}, devices=jax.devices()[:num_stages]
  )


@pytest.mark.parametrize(
  "schedule,repeats", [("gpipe", 1), ("circular", 2), ("1f1b", 1)]
)
@pytest.mark.parametrize("num_stages", [2, 4])
@pytest.mark.parametrize("microbatches_per_stage", [1, 2, 3])
def test_pipelined_equals_sequential(
  schedule, repeats, num_stages, microbatches_per_stage
):
  num_layers = num_stages * repeats  # one layer per virtual stage
  cfg, params, batch, want = _reference(num_layers)
  grad_fn = pipeline.pipeline_grad_fn(
    cfg,
    _LOSS_CFG,
    _pipe_mesh(num_stages),
    schedule=schedule,
    num_microbatches=microbatches_per_stage * num_stages,
    repeats=repeats,
  )
  stacked = pipeline.to_pipeline_params(params, num_stages, repeats)
  (loss, metrics), grads = jax.jit(grad_fn)(stacked, batch, jax.random.key(0))
  assert jax.tree.structure(grads) == jax.tree.structure(stacked)
  _assert_same(((loss, metrics), pipeline.from_pipeline_params(grads)), want)


_SCHEDULES = (("gpipe", 1), ("circular", 2), ("1f1b", 1))


@pytest.mark.parametrize("schedule,repeats", _SCHEDULES)
@pytest.mark.parametrize("kind", mt.kinds())
def test_every_mixer_pipelined_equals_sequential(kind, schedule, repeats):
  # Every registered mixer in pipeline stages (with MoE FFNs), every
  # schedule. Recurrent ops scan a zero state, which must vary
  # over `pipe` like the activations. norm_eps = 1e-2: near a zero head
  # output the per-head output norms amplify fp32 rounding ~30x (TNL at
  # 1e-6: the sequential fp32 gradient is itself 4e-5 off the float64 one).
  cfg, params, batch, want = _reference(
    2 * repeats,
    pattern=(kind,),
    chunk_size=4,
    norm_eps=1e-2,
    **mt.overrides(kind, 2 * repeats, 2),
  )
  grad_fn = pipeline.pipeline_grad_fn(
    cfg,
    _LOSS_CFG,
    _pipe_mesh(2),
    schedule=schedule,
    num_microbatches=4,
    repeats=repeats,
  )
  stacked = pipeline.to_pipeline_params(params, 2, repeats)
  (loss, metrics), grads = jax.jit(grad_fn)(stacked, batch, jax.random.key(0))
  _assert_same(
    ((loss, metrics), pipeline.from_pipeline_params(grads)),
    want,
    grad_rtol=1e-5,
  )


@pytest.mark.parametrize(
  "lbl_scope,loss_cfg",
  [
    ("sequence", _LOSS_CFG),
    ("global", training.LossConfig(lbl_coef=0.0, z_coef=0.01)),
  ],
)
def test_1f1b_statistics_gradient_of_every_lbl_scope(lbl_scope, loss_cfg):
  # 1F1B takes d loss / d MoE statistics from `jax.grad` of the one loss:
  # here at statistics it does not count (the LBL is linear in them).
  cfg = _model(2, lbl_scope=lbl_scope)
  params = models.init(jax.random.key(2), cfg)
  batch = _batch()
  want = jax.jit(
    jax.value_and_grad(
      functools.partial(training.loss_fn, model_cfg=cfg, loss_cfg=loss_cfg),
      has_aux=True,
    )
  )(params, batch, jax.random.key(0))
  grad_fn = pipeline.pipeline_grad_fn(
    cfg, loss_cfg, _pipe_mesh(2), schedule="1f1b", num_microbatches=4
  )
  (loss, metrics), grads = jax.jit(grad_fn)(
    pipeline.to_pipeline_params(params, 2), batch, jax.random.key(0)
  )
  _assert_same(((loss, metrics), pipeline.from_pipeline_params(grads)), want)


@pytest.mark.parametrize(
  "spec,schedule",
  [
    ("data=2,pipe=2,expert=2", "1f1b"),
    ("fsdp=2,pipe=2,tensor=2", "gpipe"),
  ],
)
def test_mixed_mesh_equals_single_device(spec, schedule):
  cfg, params, batch, want = _reference(2)
  mesh = parallel.make_mesh(spec)
  stacked = pipeline.to_pipeline_params(params, 2)
  shardings = parallel.param_shardings(stacked, mesh, stage_axis=1)
  stacked = jax.device_put(stacked, shardings)
  batch = jax.device_put(batch, parallel.batch_sharding(mesh))
  grad_fn = pipeline.pipeline_grad_fn(
    cfg, _LOSS_CFG, mesh, schedule=schedule, num_microbatches=4
  )
  got = jax.jit(grad_fn, out_shardings=(None, shardings))(
    stacked, batch, jax.random.key(0)
  )
  assert (
    got[1]["stages"][0]["ffn"]["experts"]["w_up"].sharding
    == (shardings["stages"][0]["ffn"]["experts"]["w_up"])
  )
  _assert_same((got[0], pipeline.from_pipeline_params(got[1])), want)


def test_stack_unstack_round_trip():
  layers = tuple(
    {"w": jnp.full((3,), float(i)), "b": {"c": jnp.ones(2) * i}}
    for i in range(8)
  )
  stacked = pipeline.stack_stages(layers, num_stages=2, repeats=2)
  assert len(stacked) == 2  # two layers per virtual stage
  assert stacked[0]["w"].shape == (2, 2, 3)  # [repeats, stages, ...]
  # Virtual stage v = r * S + s holds layers 2v, 2v + 1.
  np.testing.assert_array_equal(stacked[1]["w"][1, 0], [5.0] * 3)
  for got, want in zip(pipeline.unstack_stages(stacked), layers, strict=True):
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bad_input():
  cfg = _model(4)
  params = models.init(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match="split into num_stages"):
    pipeline.stack_stages(params["layers"], num_stages=3)
  # OpenELM layer-wise scaling: every layer has its own FFN width.
  scaled = _model(4, ffn_pattern=("mlp",), layerwise_ffn=(1.0, 4.0))
  with pytest.raises(ValueError, match="structurally identical"):
    pipeline.stack_stages(models.init(jax.random.key(0), scaled)["layers"], 2)
  # A block pattern that does not repeat every stage: different mixers.
  hybrid = _model(2, pattern=("attention", "deltanet"))
  with pytest.raises(ValueError, match="structurally identical"):
    pipeline.stage_block_configs(models.block_configs(hybrid), 2)
  with pytest.raises(ValueError, match="'pipe' axis"):
    pipeline.pipeline_grad_fn(
      cfg, _LOSS_CFG, parallel.make_mesh("data=8"), num_microbatches=2
    )
  grad_fn = pipeline.pipeline_grad_fn(
    cfg, _LOSS_CFG, _pipe_mesh(2), num_microbatches=5
  )
  with pytest.raises(ValueError, match="must divide the batch size"):
    grad_fn(pipeline.to_pipeline_params(params, 2), _batch(), None)
