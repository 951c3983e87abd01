"""Gaussian mixtures: exact denoiser and log-density vs. independent twins."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import diffusion

MIX = diffusion.gaussian_mixture(
  [0.2, 0.5, 0.3],
  [[-1.0, 0.0, 0.5], [1.0, 1.0, -0.5], [0.0, -1.0, 0.0]],
  [[0.2, 0.3, 0.4], [0.5, 0.1, 0.2], [0.3, 0.3, 0.3]],
)
_LOG_PROB = jax.jit(lambda x, s: diffusion.mixture_log_prob(MIX, x, s))
_DENOISE = jax.jit(lambda x, s: diffusion.mixture_denoise(MIX, x, s))
_SCORE = jax.jit(
  jax.vmap(
    jax.grad(lambda x, s: diffusion.mixture_log_prob(MIX, x[None], s)[0]),
    (0, None),
  )
)


def _np_log_prob(x, sigma):
  """float64 loop twin: log sum_k w_k prod_j N(x_j; mu_kj, s_kj^2 + sigma^2)."""
  w, mu, sd = (np.asarray(a, np.float64) for a in MIX)
  comps = []
  for k in range(len(w)):
    var = sd[k] ** 2 + sigma**2
    comps.append(
      np.log(w[k])
      - 0.5 * np.sum((x - mu[k]) ** 2 / var + np.log(2 * np.pi * var), axis=-1)
    )
  return np.logaddexp.reduce(np.stack(comps), axis=0)


@hypothesis.given(seed=st.integers(0, 2**16), log_sigma=st.floats(-4.0, 3.0))
def test_log_prob_matches_twin_and_tweedie(seed, log_sigma):
  sigma = float(np.exp(log_sigma))
  x = np.asarray(jax.random.normal(jax.random.key(seed), (8, 3))) * (1 + sigma)
  np.testing.assert_allclose(
    _LOG_PROB(x, sigma), _np_log_prob(x, sigma), rtol=1e-4, atol=1e-4
  )
  # Tweedie: D(x; sigma) = x + sigma^2 grad log p(x; sigma).
  np.testing.assert_allclose(
    _DENOISE(jnp.asarray(x, jnp.float32), sigma),
    x + sigma**2 * np.asarray(_SCORE(jnp.asarray(x, jnp.float32), sigma)),
    rtol=2e-4,
    atol=2e-4 * (1 + sigma**2),
  )


def test_samples_match_moments():
  x = diffusion.mixture_sample(MIX, jax.random.key(0), 200_000)
  w, mu, sd = (np.asarray(a, np.float64) for a in MIX)
  mean = w @ mu
  second = w @ (mu**2 + sd**2)
  # 200k samples: standard error ~ 2e-3 per coordinate.
  np.testing.assert_allclose(np.mean(x, 0), mean, atol=1e-2)
  np.testing.assert_allclose(np.mean(np.asarray(x) ** 2, 0), second, atol=1e-2)


def test_denoiser_limits():
  x = jax.random.normal(jax.random.key(1), (5, 3))
  # sigma -> 0: D(x) -> x; sigma -> inf: D(x) -> the data mean.
  np.testing.assert_allclose(_DENOISE(x, 1e-4), x, atol=1e-6)
  w, mu, _ = MIX
  np.testing.assert_allclose(
    _DENOISE(x, 1e4), jnp.broadcast_to(w @ mu, x.shape), atol=1e-5
  )


def test_toy_sets():
  ring = diffusion.toy_density("ring")
  np.testing.assert_allclose(
    jnp.linalg.norm(ring.means, axis=1), 1.0, rtol=1e-6
  )
  grid = diffusion.toy_density("grid")
  assert grid.means.shape == (25, 2)
  np.testing.assert_allclose(jnp.mean(grid.means, 0), 0.0, atol=1e-6)
  g = diffusion.gaussian(4, 2.0)
  np.testing.assert_allclose(
    diffusion.mixture_log_prob(g, jnp.zeros((1, 4)), 1.0),
    [-2 * np.log(2 * np.pi * 5.0)],
    rtol=1e-6,
  )


def test_bad_input():
  with pytest.raises(ValueError, match="weights"):
    diffusion.gaussian_mixture([1.0, -1.0], [[0.0], [1.0]], 1.0)
  with pytest.raises(ValueError, match="stds"):
    diffusion.gaussian_mixture([1.0], [[0.0, 0.0]], 0.0)
  with pytest.raises(ValueError, match="stds"):
    diffusion.gaussian_mixture([1.0], [[0.0, 0.0]], [[1.0, 1.0, 1.0]])
  with pytest.raises(ValueError, match="`x`"):
    diffusion.mixture_denoise(MIX, jnp.zeros((2, 2)), 1.0)
  with pytest.raises(ValueError, match="name"):
    diffusion.toy_density("moons")
