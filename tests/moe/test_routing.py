"""Routers: top-k selection, weights, selection bias, bias update, z-loss."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import moe

E = 6


@hypothesis.given(
  top_k=st.integers(1, E),
  score=st.sampled_from(moe.SCORES),
  seed=st.integers(0, 2**16),
)
def test_route_matches_numpy_topk(top_k, score, seed):
  logits = np.random.default_rng(seed).standard_normal((2, 5, E), np.float32)
  r = moe.route(jnp.asarray(logits), top_k, score=score)
  if score == "softmax":
    s = np.exp(logits - logits.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    probs = s
  else:
    s = 1 / (1 + np.exp(-logits))
    probs = s / s.sum(-1, keepdims=True)
  experts = np.argsort(-s, axis=-1, kind="stable")[..., :top_k]
  w = np.take_along_axis(s, experts, -1)
  np.testing.assert_array_equal(r.experts, experts)
  np.testing.assert_allclose(r.probs, probs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    r.weights, w / w.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6
  )
  assert r.experts.dtype == jnp.int32


def test_route_unnormalized_weights_are_scores():
  logits = jnp.asarray(
    np.random.default_rng(0).standard_normal((1, 4, E)), jnp.float32
  )
  r = moe.route(logits, 2, score="sigmoid", normalize_topk=False)
  expected = jnp.take_along_axis(jax.nn.sigmoid(logits), r.experts, -1)
  np.testing.assert_allclose(r.weights, expected, rtol=1e-6)


def test_bias_changes_selection_only():
  logits = jnp.asarray(
    np.random.default_rng(1).standard_normal((2, 8, E)), jnp.float32
  )
  bias = jnp.zeros(E).at[E - 1].set(10.0)
  r = moe.route(logits, 2, score="sigmoid", bias=bias)
  # The biased expert is always chosen, but weights use unbiased scores.
  assert np.all(np.any(np.asarray(r.experts) == E - 1, axis=-1))
  scores = jax.nn.sigmoid(logits)
  w = jnp.take_along_axis(scores, r.experts, -1)
  np.testing.assert_allclose(r.weights, w / w.sum(-1, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(
    r.probs, scores / scores.sum(-1, keepdims=True), rtol=1e-6
  )
  grad = jax.grad(
    lambda b: jnp.sum(
      moe.route(logits, 2, bias=b).weights * jnp.arange(2.0)[None, None]
    )
  )(bias)
  np.testing.assert_array_equal(grad, np.zeros(E))


def test_update_router_bias_moves_against_load():
  bias = jnp.full(4, 0.5)
  counts = jnp.array([10.0, 2.0, 4.0, 4.0])  # mean 5
  new = moe.update_router_bias(bias, counts, rate=0.01)
  np.testing.assert_allclose(new, [0.49, 0.51, 0.51, 0.51], rtol=1e-6)
  with pytest.raises(ValueError, match="expert_counts"):
    moe.update_router_bias(bias, jnp.ones(3), rate=0.1)


def test_router_z_loss_formula():
  logits = jnp.asarray(
    np.random.default_rng(2).standard_normal((2, 3, E)), jnp.float32
  )
  z = np.log(np.sum(np.exp(np.asarray(logits, np.float64)), -1))
  np.testing.assert_allclose(
    moe.router_z_loss(logits), np.mean(z**2), rtol=1e-6
  )


def test_route_bad_input():
  logits = jnp.zeros((2, 3, 4))
  with pytest.raises(ValueError, match="top_k"):
    moe.route(logits, 5)
  with pytest.raises(ValueError, match="top_k"):
    moe.route(logits, 0)
  with pytest.raises(ValueError, match="score"):
    moe.route(logits, 1, score="tanh")
  with pytest.raises(ValueError, match="bias"):
    moe.route(logits, 1, bias=jnp.zeros(3))
