"""Sampling: greedy == argmax, top-k / top-p masks, temperature -> 0."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import inference

V = 12


def _logits(seed, batch=3):
  return jnp.asarray(
    np.random.default_rng(seed).standard_normal((batch, V)), jnp.float32
  )


_sample = jax.jit(inference.sample, static_argnums=2)


def test_greedy_is_argmax():
  logits = _logits(0, batch=5)
  got = _sample(jax.random.key(0), logits, inference.SamplingConfig(0.0))
  np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
  assert got.dtype == jnp.int32


@hypothesis.given(seed=st.integers(0, 2**16), k=st.integers(1, V + 2))
def test_top_k_mask_keeps_the_k_largest(seed, k):
  logits = np.asarray(_logits(seed))
  got = np.asarray(inference.top_k_mask(jnp.asarray(logits), k))
  for row, out in zip(logits, got, strict=True):
    keep = np.argsort(-row)[: min(k, V)]
    np.testing.assert_array_equal(
      np.flatnonzero(np.isfinite(out)), np.sort(keep)
    )
    np.testing.assert_array_equal(out[keep], row[keep])


@hypothesis.given(
  seed=st.integers(0, 2**16), p=st.floats(0.01, 1.0, exclude_min=True)
)
def test_top_p_mask_is_the_smallest_nucleus(seed, p):
  logits = np.asarray(_logits(seed), np.float64)
  got = np.asarray(inference.top_p_mask(jnp.asarray(logits, jnp.float32), p))
  for row, out in zip(logits, got, strict=True):
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    # Smallest n with mass of the top n >= p (float32 slack at the edge).
    cum = np.cumsum(probs[order])
    n = int(np.searchsorted(cum, p - 1e-6)) + 1
    kept = np.flatnonzero(np.isfinite(out))
    if abs(cum[n - 1] - p) > 1e-5 and (n < 2 or abs(cum[n - 2] - p) > 1e-5):
      np.testing.assert_array_equal(kept, np.sort(order[: min(n, V)]))
    assert order[0] in kept


def test_top_p_hand_case():
  logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
  kept = lambda p: np.flatnonzero(np.isfinite(inference.top_p_mask(logits, p)))
  np.testing.assert_array_equal(kept(0.5), [1])
  np.testing.assert_array_equal(kept(0.6), [1, 3])
  np.testing.assert_array_equal(kept(0.8), [1, 2, 3])
  np.testing.assert_array_equal(kept(1.0), [0, 1, 2, 3])


def test_samples_stay_in_the_kept_set_and_follow_the_distribution():
  logits = jnp.tile(jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]])), (4000, 1))
  cfg = inference.SamplingConfig(temperature=1.0, top_k=3, top_p=0.7)
  draws = np.asarray(_sample(jax.random.key(1), logits, cfg))
  assert set(np.unique(draws)) == {1, 3}  # top-3 {1,3,2}, then nucleus {1,3}
  freq = np.mean(draws == 1)
  assert abs(freq - 0.5 / 0.75) < 0.03  # 4000 draws: std ~0.0075
  # Rows are independent draws from one key; the key decides them.
  again = np.asarray(_sample(jax.random.key(1), logits, cfg))
  np.testing.assert_array_equal(draws, again)


def test_low_temperature_tends_to_greedy():
  logits = _logits(3, batch=64)
  cold = _sample(jax.random.key(2), logits, inference.SamplingConfig(1e-4))
  np.testing.assert_array_equal(cold, np.argmax(logits, axis=-1))
  top = [
    jax.nn.softmax(
      inference.sampling.processed_logits(logits, inference.SamplingConfig(t)),
      axis=-1,
    ).max(axis=-1)
    for t in (1.0, 0.1, 0.01, 1e-4)
  ]
  for hot, cold in zip(top[:-1], top[1:], strict=True):
    assert np.all(cold >= hot - 1e-6)  # the argmax mass grows as t falls
  np.testing.assert_allclose(top[-1], 1.0, atol=1e-5)


def test_bad_config():
  for kwargs, name in (
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=1.5), "top_p"),
  ):
    with pytest.raises(ValueError, match=name):
      inference.SamplingConfig(**kwargs)
  with pytest.raises(ValueError, match="logits_BxV"):
    inference.sample(jax.random.key(0), jnp.zeros((5,)))
