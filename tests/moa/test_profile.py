"""MoA profile: influence == finite differences of the loss on a tiny
hybrid model; the search meets the budget and the plan runs as MoA layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import models
from lightning_jax import ops
from lightning_jax import moa

SEQ, HEADS = 8, 2
# Attention, DeltaNet, attention: plan rows are the two attention layers.
CFG = models.get_preset(
  "transformer",
  vocab_size=11,
  num_layers=3,
  pattern=("attention", "deltanet"),
  d_model=16,
  num_heads=HEADS,
  num_kv_heads=1,
  head_dim=8,
  d_ff=16,
  chunk_size=4,
  attention_impl="reference",
)
PARAMS = models.init(jax.random.key(0), CFG)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 11, (3, SEQ)))

_loss_probed = jax.jit(
  lambda probes: moa.loss_probed(PARAMS, TOKENS, CFG, probes)
)
_profile = jax.jit(lambda: moa.profile_model(PARAMS, TOKENS, CFG, 1))


def _removal(a_BxHxTxT, head, i, j):
  """A' - A when A_ij is removed (in every sequence) and rows renormalised."""
  a = np.asarray(a_BxHxTxT, np.float64)
  new = a.copy()
  new[:, head, i, j] = 0.0
  new[:, head, i] /= (1.0 - a[:, head, i, j])[:, None]
  return new - a


def test_influence_matches_finite_differences():
  influence = np.asarray(_profile())  # [layers, heads, SEQ, SEQ], block 1
  zeros = [jnp.zeros((3, HEADS, SEQ, SEQ))] * 2
  base, weights = _loss_probed(zeros)
  eps = 1e-2
  for layer, head, i, j in [
    (0, 0, 5, 2),
    (0, 1, 6, 0),
    (1, 0, 3, 3),
    (1, 1, 6, 4),
    (1, 1, 2, 0),
  ]:
    delta = _removal(weights[layer], head, i, j)
    probes = lambda s, delta=delta, layer=layer: [
      jnp.asarray(s * delta, jnp.float32) if n == layer else zeros[n]
      for n in range(2)
    ]
    # Derivative of the loss along the removal: central differences.
    fd = (_loss_probed(probes(eps))[0] - _loss_probed(probes(-eps))[0]) / (
      2 * eps
    )
    np.testing.assert_allclose(
      influence[layer, head, i, j], fd, rtol=2e-2, atol=2e-6
    )
    # The actual removal agrees to first order.
    removed = _loss_probed(probes(1.0))[0] - base
    np.testing.assert_allclose(
      influence[layer, head, i, j], removed, rtol=0.3, atol=2e-3
    )
  # Future keys carry nothing; a lone key (query 0) cannot be removed; the
  # last query feeds no prediction.
  np.testing.assert_array_equal(np.triu(influence, 1), 0.0)
  np.testing.assert_array_equal(influence[:, :, 0, 0], 0.0)
  np.testing.assert_array_equal(influence[:, :, -1], 0.0)


def test_blocks_sum_elements():
  a, g = (
    jnp.asarray(
      np.random.default_rng(s).uniform(size=(2, 3, 10, 10)), jnp.float32
    )
    for s in (1, 2)
  )
  a = a / a.sum(-1, keepdims=True)
  fine = moa.attention_influence(a, g, 1)
  coarse = moa.attention_influence(a, g, 4)  # blocks 4, 4, 2
  want = (
    np.pad(np.asarray(fine), ((0, 0), (0, 2), (0, 2)))
    .reshape(3, 3, 4, 3, 4)
    .sum((2, 4))
  )
  np.testing.assert_allclose(coarse, want, rtol=1e-5, atol=1e-6)


def test_search_plan_meets_the_budget_and_runs_as_moa_layers():
  rng = np.random.default_rng(3)
  calibration = {n: jnp.asarray(rng.integers(0, 11, (2, n))) for n in (8, 16)}
  candidates = [(1.0, 0.0), (2.0, 0.25), (0.0, 1.0)]
  found = moa.search_plan(
    PARAMS, CFG, calibration, candidates, budget=0.6, block=4
  )
  assert found.lengths == (8, 16)
  assert found.plan.num_layers == 2
  assert np.all(found.density_NxLxH.mean((1, 2)) <= 0.6 + 1e-9)
  # The search spends the budget: some head is sparse, some head is dense.
  assert found.density_NxLxH.min() < 0.6 < found.density_NxLxH.max()
  # Windows of the plan reproduce the reported densities.
  for n_idx, n in enumerate(found.lengths):
    for layer in range(2):
      np.testing.assert_allclose(
        found.density_NxLxH[n_idx, layer],
        ops.moa_density(found.plan.windows(layer, n), n),
      )
  # The plan drives the model's attention layers as MoA layers; its loss
  # change is finite and an all-dense plan changes nothing.
  increase = moa.plan_loss_increase(PARAMS, CFG, found.plan, calibration[16])
  assert np.isfinite(increase)
  dense = ops.MoAPlan(((16.0, 16.0),) * 2, ((0.0, 0.0),) * 2)
  assert abs(moa.plan_loss_increase(PARAMS, CFG, dense, calibration[16])) < 1e-5


def test_profile_needs_dense_attention():
  with pytest.raises(ValueError, match="no softmax-attention"):
    moa.profile_model(
      PARAMS, TOKENS, dataclasses.replace(CFG, pattern=("deltanet",)), 4
    )
