"""BAM attention experts: identical soft experts == dense attention for any
router, with and without shared KV; top-k and shared-KV caches decode like
the forward (the default variant is in the registry-wide tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import layers

ATTN = layers.AttentionConfig(16, 4, 2, 8, impl="reference")


@pytest.mark.parametrize("shared_kv", [False, True])
def test_identical_soft_experts_equal_dense_attention(shared_kv):
  cfg = layers.AttentionExpertsConfig(ATTN, 3, shared_kv=shared_kv)
  dense = layers.init_attention(jax.random.key(0), ATTN)
  params = layers.init_attention_experts(jax.random.key(1), cfg)
  params["experts"] = {k: jnp.stack([dense[k]] * 3) for k in params["experts"]}
  if shared_kv:
    params["kv"] = {k: dense[k] for k in params["kv"]}
  params["router"] = 5.0 * jax.random.normal(jax.random.key(2), (16, 3))
  x = jax.random.normal(jax.random.key(3), (2, 7, 16))
  got, _ = jax.jit(layers.attention_experts_mixer, static_argnums=2)(
    params, x, cfg
  )
  want = jax.jit(layers.attention_layer, static_argnums=2)(dense, x, ATTN)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_top_k_weights_are_renormalised_and_sparse():
  cfg = layers.AttentionExpertsConfig(ATTN, 4, top_k=2)
  router = jax.random.normal(jax.random.key(0), (16, 4))
  w = layers.attention_experts.routing_weights(
    router, jax.random.normal(jax.random.key(1), (2, 5, 16)), cfg
  )
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal((w > 0).sum(-1), 2)


def test_bad_options_name_the_argument():
  with pytest.raises(ValueError, match="top_k"):
    layers.AttentionExpertsConfig(ATTN, 2, top_k=3)
  with pytest.raises(ValueError, match="shared_kv"):
    layers.AttentionExpertsConfig(ATTN, 2, shared_kv=1)


def test_top_k_shared_kv_variant_decodes_like_forward():
  cfg = layers.AttentionExpertsConfig(ATTN, 3, top_k=1, shared_kv=True)
  params = layers.init_attention_experts(jax.random.key(0), cfg)
  mixer = jax.jit(layers.attention_experts_mixer, static_argnums=2)
  x = jax.random.normal(jax.random.key(1), (2, 7, 16))
  lengths = jnp.array([5, 3])
  state = layers.attention_experts.init_attention_experts_state(cfg, 2, 7)
  y, state = mixer(params, x[:, :5], cfg, state, layers.Decoding(lengths))
  got = [jnp.take_along_axis(y, (lengths - 1)[:, None, None], axis=1)]
  for i in range(2):
    x_t = jnp.take_along_axis(x, (lengths + i)[:, None, None], axis=1)
    y, state = mixer(
      params, x_t, cfg, state, layers.Decoding(jnp.ones(2, jnp.int32))
    )
    got.append(y)
  full, _ = mixer(params, x, cfg)
  want = jnp.take_along_axis(
    full, (lengths[:, None] - 1 + jnp.arange(3)[None])[..., None], axis=1
  )
  np.testing.assert_allclose(
    jnp.concatenate(got, 1), want, atol=2e-5, rtol=2e-5
  )
