"""Attention layer: impls agree, full windows == dense, causality, RoPE."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import layers
from lightning_jax import ops

F32_TOL = dict(atol=2e-5, rtol=2e-5)
CFG = layers.AttentionConfig(
  d_model=16, num_heads=4, num_kv_heads=2, head_dim=8, block_size=8
)
SEQ = 20
PARAMS = layers.init_attention(jax.random.key(0), CFG)
X = jnp.asarray(
  np.random.default_rng(0).standard_normal((2, SEQ, 16)), jnp.float32
)


@jax.jit
def _layer(params, x):
  return layers.attention_layer(params, x, CFG)


def _apply(cfg, x=X):
  return jax.jit(lambda p, x: layers.attention_layer(p, x, cfg))(PARAMS, x)


def test_windows_covering_the_sequence_give_the_dense_layer():
  dense = _layer(PARAMS, X)
  moa = dataclasses.replace(
    CFG,
    moa_alphas=(SEQ, 0.0, 5.0, 100.0),
    moa_betas=(0.0, 1.0, 1.0, 0.0),
    sink=3,
  )
  np.testing.assert_allclose(_apply(moa), dense, **F32_TOL)
  np.testing.assert_allclose(
    _apply(dataclasses.replace(CFG, window=SEQ)), dense, **F32_TOL
  )


@pytest.mark.parametrize(
  "extra",
  [
    dict(),
    dict(
      moa_alphas=(1.0, 4.0, 0.0, 9.0), moa_betas=(0.0, 0.0, 0.5, 1.0), sink=2
    ),
  ],
)
def test_blocked_matches_reference_and_probed(extra):
  cfg = dataclasses.replace(CFG, **extra)
  ref_cfg = dataclasses.replace(cfg, impl="reference")
  probe = jnp.zeros((2, 4, SEQ, SEQ))

  @jax.jit
  def run(params):
    loss = lambda p, c: jnp.sum(jnp.sin(layers.attention_layer(p, X, c)))
    return (
      jax.value_and_grad(loss)(params, cfg),
      jax.value_and_grad(loss)(params, ref_cfg),
      layers.attention_layer(params, X, ref_cfg),
      layers.attention_layer_probed(params, X, cfg, probe),
    )

  (got, got_g), (want, want_g), ref_out, (probed, a) = run(PARAMS)
  np.testing.assert_allclose(got, want, **F32_TOL)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(probed, ref_out, **F32_TOL)
  np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)


def test_causal_output_ignores_the_future():
  t = 7
  jac = jax.jit(jax.grad(lambda x: _layer(PARAMS, x)[:, t].sum()))(X)
  np.testing.assert_array_equal(jac[:, t + 1 :], 0.0)
  assert np.abs(jac[:, : t + 1]).sum() > 0


def test_rope_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  score = lambda tq, tk: jnp.sum(
    layers.apply_rope(q, jnp.array([tq]))
    * layers.apply_rope(k, jnp.array([tk]))
  )
  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
  np.testing.assert_allclose(score(0, 0), jnp.sum(q * k), rtol=1e-5)


def test_bad_configs_and_inputs():
  with pytest.raises(ValueError, match="`num_kv_heads`"):
    layers.AttentionConfig(16, 4, 3, 8)
  with pytest.raises(ValueError, match="`moa_alphas`"):
    layers.AttentionConfig(16, 4, 2, 8, moa_alphas=(1.0,), moa_betas=(0.0,))
  with pytest.raises(ValueError, match="`window`"):
    layers.AttentionConfig(16, 4, 2, 8, window=0)
  with pytest.raises(ValueError, match="`x_BxTxD`"):
    layers.attention_layer(PARAMS, X[..., :8], CFG)


def test_with_moa_plan_selects_the_layer():
  plan = ops.MoAPlan(
    alphas=((1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)),
    betas=((0.0,) * 4, (0.5,) * 4),
  )
  cfg = layers.with_moa_plan(CFG, plan, 1)
  np.testing.assert_array_equal(cfg.windows(10), [10, 10, 10, 10])
  np.testing.assert_array_equal(cfg.windows(4), [4, 4, 4, 4])
  np.testing.assert_array_equal(
    layers.with_moa_plan(CFG, plan, 0).windows(100), [1, 2, 3, 4]
  )
