"""A training step on mixed meshes == the same step on one device.

Data, fsdp, tensor and expert parallelism all come from the partition rules
and `shard_step` (jit with in/out shardings): loss, global load-balancing
loss and updated params must match the unsharded step to fp32 tolerance.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import models
from lightning_jax import moe
from lightning_jax import parallel

# Layer 0: DeltaNet + GLU MLP; layer 1: attention + top-2-of-4 MoE. Small
# graphs compile fast: scan-over-time recurrence, reference attention.
CFG = models.get_preset(
  "moe-hybrid",
  vocab_size=64,
  d_model=32,
  num_heads=4,
  head_dim=8,
  num_layers=2,
  pattern=("deltanet", "attention"),
  ffn_pattern=("mlp", "moe"),
  d_ff=64,
  moe_d_ff=32,
  num_experts=4,
  recurrent_impl="recurrent",
  attention_impl="reference",
)
TOL = dict(rtol=2e-4, atol=2e-5)


def _step(params, batch):
  """One SGD step on next-token cross-entropy + 0.01 * global-batch LBL."""

  def loss_fn(p):
    logits, aux = models.forward(p, batch["inputs"], CFG)
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.mean(jnp.take_along_axis(logp, batch["targets"][..., None], -1))
    lbl = sum(
      moe.load_balancing_loss_from_pieces(a.lbl_pieces)
      for a in aux.moe
      if a is not None
    )
    return ce + 0.01 * lbl, {"ce": ce, "lbl": lbl}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  params = jax.tree.map(lambda w, g: w - 0.5 * g, params, grads)
  return params, dict(metrics, loss=loss)


@functools.cache
def _single_device():
  """Params, batch and the one-device step's result (computed once)."""
  params = jax.jit(functools.partial(models.init, cfg=CFG))(jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, CFG.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  return params, batch, jax.jit(_step)(params, batch)


@pytest.mark.parametrize(
  "spec", ["data=2,fsdp=2,tensor=2", "data=2,expert=2,tensor=2"]
)
def test_sharded_step_matches_single_device(spec):
  params, batch, (want_params, want) = _single_device()
  mesh = parallel.make_mesh(spec)
  shardings = parallel.param_shardings(params, mesh)
  step = parallel.shard_step(
    _step, mesh, shardings, parallel.batch_sharding(mesh), donate=False
  )
  new, metrics = step(jax.device_put(params, shardings), batch)

  assert float(want["lbl"]) > 0
  for name in ("loss", "ce", "lbl"):
    np.testing.assert_allclose(metrics[name], want[name], **TOL, err_msg=name)
  assert jax.tree.map(lambda x: x.sharding, new) == shardings
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, **TOL),
    jax.device_get(new),
    jax.device_get(want_params),
  )
