"""Analytic test densities: Gaussian mixtures with exact denoiser and density.

For data `x_0 ~ sum_k w_k N(mu_k, diag(s_k^2))` and `x = x_0 + sigma eps`, the
noised marginal is `p(x; sigma) = sum_k w_k N(x; mu_k, diag(s_k^2 + sigma^2))`
and the ideal denoiser (posterior mean, EDM's `D(x; sigma)`) is
`sum_k gamma_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k))` with
responsibilities `gamma_k(x)` proportional to the k-th term of `p(x; sigma)`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks


class GaussianMixture(NamedTuple):
  """A diagonal Gaussian mixture in `d` dimensions (a pytree of arrays)."""

  weights: jax.Array  # [k], sums to 1
  means: jax.Array  # [k, d]
  stds: jax.Array  # [k, d], > 0


def gaussian_mixture(weights, means, stds) -> GaussianMixture:
  """Builds a validated `GaussianMixture` (float32).

  Args:
    weights: `[k]` nonnegative mixture weights (normalised here).
    means: `[k, d]` component means.
    stds: `[k, d]`, `[k]` or scalar positive component standard deviations.

  Returns:
    The mixture.

  Raises:
    ValueError: on shape mismatches, negative weights or nonpositive stds.

  Example:
    >>> mix = gaussian_mixture([1.0], [[0.0, 0.0]], 1.0)  # N(0, I_2)
  """
  _checks.check_rank("weights", weights, 1, "[k]")
  _checks.check_rank("means", means, 2, "[k, d]")
  k, d = np.shape(means)
  _checks.check_shape("weights", weights, (k,), "[k]")
  w = np.asarray(weights, np.float64)
  if np.any(w < 0) or not w.sum() > 0:
    raise ValueError(f"`weights` must be >= 0 with a positive sum, got {w}.")
  s = np.asarray(stds, np.float64)
  if s.ndim == 0:
    s = np.full((k, d), s)
  elif s.ndim == 1:
    _checks.check_shape("stds", s, (k,), "[k]")
    s = np.repeat(s[:, None], d, axis=1)
  _checks.check_shape("stds", s, (k, d), "[k, d]")
  if np.any(s <= 0):
    raise ValueError(f"`stds` must be > 0, got {s}.")
  return GaussianMixture(
    jnp.asarray(w / w.sum(), jnp.float32),
    jnp.asarray(means, jnp.float32),
    jnp.asarray(s, jnp.float32),
  )


def _component_terms(mix: GaussianMixture, x_BxD, sigma):
  """Per-component log densities `[B, K]` of `p(x; sigma)` and variances."""
  var_KxD = mix.stds**2 + sigma**2
  diff_BxKxD = x_BxD[:, None, :] - mix.means[None, :, :]
  log_norm_K = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * var_KxD), axis=-1)
  log_BxK = (
    jnp.log(mix.weights)[None, :]
    + log_norm_K[None, :]
    - 0.5 * jnp.sum(diff_BxKxD**2 / var_KxD[None], axis=-1)
  )
  return log_BxK, diff_BxKxD, var_KxD


def _check_points(mix: GaussianMixture, x):
  _checks.check_rank("x", x, 2, "[batch, d]")
  d = mix.means.shape[1]
  if np.shape(x)[1] != d:
    raise ValueError(f"`x` must have shape [batch, {d}], got {np.shape(x)}.")


def mixture_log_prob(mix: GaussianMixture, x, sigma=0.0) -> jax.Array:
  """Exact `log p(x; sigma)` of the noised mixture.

  Args:
    mix: the mixture.
    x: `[batch, d]` points.
    sigma: scalar noise level (0: the data density).

  Returns:
    `[batch]` log densities (float32).
  """
  _check_points(mix, x)
  log_BxK, _, _ = _component_terms(mix, jnp.asarray(x, jnp.float32), sigma)
  return jax.nn.logsumexp(log_BxK, axis=-1)


def mixture_denoise(mix: GaussianMixture, x, sigma) -> jax.Array:
  """Ideal denoiser `E[x_0 | x_0 + sigma eps = x]` (posterior mean).

  Args:
    mix: the mixture.
    x: `[batch, d]` noisy points.
    sigma: scalar noise level.

  Returns:
    `[batch, d]` posterior means, in `x`'s dtype.
  """
  _check_points(mix, x)
  x32 = jnp.asarray(x, jnp.float32)
  log_BxK, diff_BxKxD, var_KxD = _component_terms(mix, x32, sigma)
  gamma_BxK = jax.nn.softmax(log_BxK, axis=-1)
  shrink_KxD = mix.stds**2 / var_KxD
  post_BxKxD = mix.means[None] + shrink_KxD[None] * diff_BxKxD
  return jnp.sum(gamma_BxK[..., None] * post_BxKxD, axis=1).astype(x.dtype)


def mixture_denoiser(mix: GaussianMixture):
  """`denoiser(x, sigma)` closure of `mixture_denoise`, for the samplers.

  Example:
    >>> D = mixture_denoiser(toy_density("ring"))
    >>> D(jnp.zeros((4, 2)), 1.0).shape
    (4, 2)
  """
  return lambda x, sigma: mixture_denoise(mix, x, sigma)


def mixture_sample(mix: GaussianMixture, key, num: int) -> jax.Array:
  """Exact samples `[num, d]` (float32) from the mixture."""
  num = _checks.check_positive_int("num", num)
  k_comp, k_noise = jax.random.split(key)
  comp = jax.random.categorical(k_comp, jnp.log(mix.weights), shape=(num,))
  eps = jax.random.normal(k_noise, (num, mix.means.shape[1]), jnp.float32)
  return mix.means[comp] + mix.stds[comp] * eps


def ring_mixture(
  num_modes: int = 8, radius: float = 1.0, std: float = 0.05
) -> GaussianMixture:
  """`num_modes` equal isotropic Gaussians on a circle (2D)."""
  num_modes = _checks.check_positive_int("num_modes", num_modes)
  angle = 2 * np.pi * np.arange(num_modes) / num_modes
  means = radius * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
  return gaussian_mixture(np.ones(num_modes), means, std)


def grid_mixture(
  side: int = 5, spacing: float = 0.5, std: float = 0.05
) -> GaussianMixture:
  """`side x side` equal isotropic Gaussians on a centred square grid (2D)."""
  side = _checks.check_positive_int("side", side)
  axis = (np.arange(side) - (side - 1) / 2) * spacing
  means = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
  return gaussian_mixture(np.ones(side * side), means, std)


def gaussian(dim: int = 2, std: float = 1.0) -> GaussianMixture:
  """Isotropic Gaussian `N(0, std^2 I_dim)` as a one-component mixture."""
  dim = _checks.check_positive_int("dim", dim)
  return gaussian_mixture([1.0], np.zeros((1, dim)), std)


TOY_DENSITIES = {
  "ring": ring_mixture,
  "grid": grid_mixture,
  "gaussian": gaussian,
}


def toy_density(name: str) -> GaussianMixture:
  """A named toy density with its default parameters (`TOY_DENSITIES`)."""
  _checks.check_choice("name", name, tuple(TOY_DENSITIES))
  return TOY_DENSITIES[name]()
