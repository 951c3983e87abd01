"""Samplers: k-diffusion update rules (loop twins), order, bad input."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import diffusion

SAMPLERS = diffusion.SAMPLERS
MIX = diffusion.gaussian_mixture(
  [0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [[0.3, 0.5], [0.6, 0.2]]
)
DENOISER = diffusion.mixture_denoiser(MIX)
BATCH, DIM, STEPS = 16, 2, 6


_DENOISE = jax.jit(DENOISER)


def _np_denoise(x, sigma):
  return np.asarray(
    _DENOISE(jnp.asarray(x, jnp.float32), jnp.float32(sigma)), np.float64
  )


def _np_noise(key, n, shape):
  keys = jax.random.split(key, n)
  return [
    np.asarray(jax.random.normal(k, shape, jnp.float32), np.float64)
    for k in keys
  ]


def _ref_euler(
  x,
  sigmas,
  noise,
  s_churn=0.0,
  s_tmin=0.0,
  s_tmax=np.inf,
  s_noise=1.0,
  heun=False,
):
  """k-diffusion `sample_euler` / `sample_heun`, written as a plain loop."""
  n = len(sigmas) - 1
  for i in range(n):
    gamma = (
      min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    )
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
      x = x + noise[i] * s_noise * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    d = (x - _np_denoise(x, sigma_hat)) / sigma_hat
    dt = sigmas[i + 1] - sigma_hat
    if not heun or sigmas[i + 1] == 0:
      x = x + d * dt
    else:
      x2 = x + d * dt
      d2 = (x2 - _np_denoise(x2, sigmas[i + 1])) / sigmas[i + 1]
      x = x + (d + d2) / 2 * dt
  return x


def _ref_euler_ancestral(x, sigmas, noise, eta=1.0, s_noise=1.0):
  for i in range(len(sigmas) - 1):
    denoised = _np_denoise(x, sigmas[i])
    s_from, s_to = sigmas[i], sigmas[i + 1]
    sigma_up = min(
      s_to, eta * (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
    )
    sigma_down = (s_to**2 - sigma_up**2) ** 0.5
    x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
    if sigmas[i + 1] > 0:
      x = x + noise[i] * s_noise * sigma_up
  return x


def _ref_dpmpp_2m(x, sigmas):
  old = None
  for i in range(len(sigmas) - 1):
    denoised = _np_denoise(x, sigmas[i])
    if sigmas[i + 1] == 0:
      x = denoised  # (sigma_next / sigma) x - expm1(-inf) D
    else:
      h = np.log(sigmas[i]) - np.log(sigmas[i + 1])
      if old is None:
        dd = denoised
      else:
        r = (np.log(sigmas[i - 1]) - np.log(sigmas[i])) / h
        dd = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
      x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * dd
    old = denoised
  return x


def _ref_dpmpp_2m_sde(
  x, sigmas, noise, eta=1.0, s_noise=1.0, solver_type="midpoint"
):
  old, h_last = None, None
  for i in range(len(sigmas) - 1):
    denoised = _np_denoise(x, sigmas[i])
    if sigmas[i + 1] == 0:
      x = denoised
    else:
      h = np.log(sigmas[i]) - np.log(sigmas[i + 1])
      eta_h = eta * h
      x = (
        sigmas[i + 1] / sigmas[i] * np.exp(-eta_h) * x
        - np.expm1(-h - eta_h) * denoised
      )
      if old is not None:
        r = h_last / h
        if solver_type == "heun":
          x = x + ((-np.expm1(-h - eta_h)) / (-h - eta_h) + 1) * (1 / r) * (
            denoised - old
          )
        else:
          x = x + 0.5 * (-np.expm1(-h - eta_h)) * (1 / r) * (denoised - old)
      x = (
        x + noise[i] * sigmas[i + 1] * (-np.expm1(-2 * eta_h)) ** 0.5 * s_noise
      )
      h_last = h
    old = denoised
  return x


_JITTED = {
  name: jax.jit(lambda x, s, k, f=f: f(DENOISER, x, s, key=k))
  for name, f in SAMPLERS.items()
}


_VARIANTS = {
  "euler_churn": jax.jit(
    lambda x, s, k: diffusion.sample_euler(
      DENOISER, x, s, key=k, s_churn=2.0, s_tmin=0.1, s_tmax=10.0, s_noise=1.003
    )
  ),
  "heun_churn": jax.jit(
    lambda x, s, k: diffusion.sample_heun(DENOISER, x, s, key=k, s_churn=1.0)
  ),
  "2m_sde_heun": jax.jit(
    lambda x, s, k: diffusion.sample_dpmpp_2m_sde(
      DENOISER, x, s, key=k, eta=0.5, s_noise=0.9, solver_type="heun"
    )
  ),
}


@st.composite
def schedules(draw):
  """Random decreasing schedules of STEPS steps (fixed length: one compile)."""
  top = draw(st.floats(0.0, 3.0))
  gaps = draw(st.lists(st.floats(0.1, 1.5), min_size=STEPS, max_size=STEPS))
  return np.exp(top - np.concatenate([[0.0], np.cumsum(gaps)]))


@hypothesis.given(
  sigmas=schedules(), seed=st.integers(0, 2**16), final_zero=st.booleans()
)
def test_deterministic_samplers_match_kdiffusion_loops(
  sigmas, seed, final_zero
):
  if final_zero:
    sigmas = np.append(sigmas[:-1], 0.0)
  x = np.asarray(jax.random.normal(jax.random.key(seed), (BATCH, DIM)))
  x = x * sigmas[0]
  s32 = jnp.asarray(sigmas, jnp.float32)
  refs = {
    "euler": _ref_euler(x, sigmas, None),
    "heun": _ref_euler(x, sigmas, None, heun=True),
    "dpmpp_2m": _ref_dpmpp_2m(x, sigmas),
  }
  for name, ref in refs.items():
    got = _JITTED[name](jnp.asarray(x, jnp.float32), s32, None)
    # fp32 scan vs fp64 loop through a fp32 denoiser: relative 1e-4 of scale.
    np.testing.assert_allclose(
      got, ref, rtol=1e-4, atol=1e-4 * sigmas[0], err_msg=name
    )


@hypothesis.given(sigmas=schedules(), seed=st.integers(0, 2**16))
def test_stochastic_samplers_match_kdiffusion_loops(sigmas, seed):
  sigmas = np.append(sigmas[:-1], 0.0)
  key = jax.random.key(seed)
  x = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (BATCH, DIM)))
  x = x * sigmas[0]
  noise = _np_noise(key, STEPS, (BATCH, DIM))
  s32 = jnp.asarray(sigmas, jnp.float32)
  x32 = jnp.asarray(x, jnp.float32)
  checks = {
    "euler_ancestral": (
      _JITTED["euler_ancestral"](x32, s32, key),
      _ref_euler_ancestral(x, sigmas, noise),
    ),
    "dpmpp_2m_sde": (
      _JITTED["dpmpp_2m_sde"](x32, s32, key),
      _ref_dpmpp_2m_sde(x, sigmas, noise),
    ),
    "euler_churn": (
      _VARIANTS["euler_churn"](x32, s32, key),
      _ref_euler(x, sigmas, noise, 2.0, 0.1, 10.0, 1.003),
    ),
    "heun_churn": (
      _VARIANTS["heun_churn"](x32, s32, key),
      _ref_euler(x, sigmas, noise, 1.0, heun=True),
    ),
    "2m_sde_heun": (
      _VARIANTS["2m_sde_heun"](x32, s32, key),
      _ref_dpmpp_2m_sde(x, sigmas, noise, 0.5, 0.9, "heun"),
    ),
  }
  for name, (got, ref) in checks.items():
    np.testing.assert_allclose(
      got, ref, rtol=1e-4, atol=1e-4 * sigmas[0], err_msg=name
    )


def test_heun_last_step_is_euler():
  x = 3.0 * jax.random.normal(jax.random.key(0), (BATCH, DIM))
  sigmas = jnp.array([3.0, 1.0, 0.0])
  heun = diffusion.sample_heun(DENOISER, x, sigmas)
  x1 = diffusion.sample_heun(DENOISER, x, sigmas[:2])
  euler = diffusion.sample_euler(DENOISER, x1, sigmas[1:])
  np.testing.assert_allclose(heun, euler, rtol=1e-6, atol=1e-6)
  # The step to 0 is Euler, x + (0 - 1) (x - D) / 1 = D(x; 1), with no
  # denoiser call at sigma = 0 (which would divide by zero).
  np.testing.assert_allclose(euler, DENOISER(x1, 1.0), rtol=1e-6, atol=1e-6)
  assert not np.allclose(
    x1, diffusion.sample_euler(DENOISER, x, sigmas[:2]), atol=1e-3
  )  # ... while the first step is not Euler.


def test_dpmpp_2m_first_step_is_first_order():
  x = 5.0 * jax.random.normal(jax.random.key(1), (BATCH, DIM))
  sigmas = jnp.array([5.0, 2.0, 0.7, 0.2])
  first = diffusion.sample_dpmpp_2m(DENOISER, x, sigmas[:2])
  # First-order DPM-Solver++ (DDIM) == an Euler step in the EDM parametrisation.
  np.testing.assert_allclose(
    first, diffusion.sample_euler(DENOISER, x, sigmas[:2]), rtol=1e-5, atol=1e-5
  )
  two = diffusion.sample_dpmpp_2m(DENOISER, x, sigmas[:3])
  two_euler = diffusion.sample_euler(DENOISER, first, sigmas[1:3])
  assert not np.allclose(two, two_euler, atol=1e-3)  # second step is 2nd order


def _gaussian_ode_error(sampler, n):
  """Error at sigma_min of an n-step log-uniform schedule, Gaussian data.

  For `x_0 ~ N(mu, diag(s^2))` the probability-flow ODE is linear per
  coordinate: `x(sigma) - mu = (x(sigma_0) - mu) sqrt((s^2 + sigma^2) /
  (s^2 + sigma_0^2))`.
  """
  mu, s = jnp.array([0.5, -1.0]), jnp.array([0.4, 1.5])
  mix = diffusion.gaussian_mixture([1.0], mu[None], s[None])
  sigmas = jnp.exp(jnp.linspace(jnp.log(20.0), jnp.log(0.05), n + 1))
  x0 = 20.0 * jax.random.normal(jax.random.key(2), (64, 2))
  got = sampler(diffusion.mixture_denoiser(mix), x0, sigmas)
  exact = (
    mu[None]
    + (x0 - mu[None])
    * jnp.sqrt((s**2 + sigmas[-1] ** 2) / (s**2 + sigmas[0] ** 2))[None]
  )
  return float(jnp.max(jnp.abs(got - exact)))


@pytest.mark.parametrize(
  "name,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)]
)
def test_convergence_order_on_gaussian_ode(name, order):
  sampler = SAMPLERS[name]
  errs = [_gaussian_ode_error(sampler, n) for n in (16, 32, 64)]
  rates = np.log2(np.asarray(errs[:-1]) / np.asarray(errs[1:]))
  # Observed order when halving the step, within +-0.2 of the stated order.
  np.testing.assert_allclose(rates, order, atol=0.2, err_msg=str(errs))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_jit_and_batch(name):
  x = 10.0 * jax.random.normal(jax.random.key(3), (BATCH, DIM))
  sigmas = jnp.asarray(diffusion.karras_sigmas(STEPS, 0.01, 10.0), jnp.float32)
  key = jax.random.key(4)
  full = _JITTED[name](x, sigmas, key)
  assert full.shape == x.shape and bool(jnp.all(jnp.isfinite(full)))
  if name in ("euler", "heun", "dpmpp_2m"):  # deterministic: rows independent
    np.testing.assert_allclose(
      _JITTED[name](x[:4], sigmas, key), full[:4], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
  "sigmas,match",
  [
    ([1.0, 2.0, 0.0], "strictly decreasing"),
    ([0.0, 1.0, 2.0], r"strictly decreasing .*increasing schedule.*reversed"),
    ([2.0, -1.0, 0.0], "> 0"),
    ([2.0, 0.0, 0.0], "> 0"),
    ([1.0], "at least 2"),
    ([[1.0, 0.0]], "rank 1"),
  ],
)
def test_bad_schedules(sigmas, match):
  with pytest.raises(ValueError, match=match):
    diffusion.sample_euler(DENOISER, jnp.zeros((2, DIM)), jnp.asarray(sigmas))


def test_bad_denoiser_and_key():
  with pytest.raises(ValueError, match="must return x's shape"):
    diffusion.sample_heun(
      lambda x, s: x[:, :1], jnp.zeros((2, DIM)), jnp.array([1.0, 0.0])
    )
  with pytest.raises(ValueError, match="`key` is required"):
    diffusion.sample_euler_ancestral(
      DENOISER, jnp.zeros((2, DIM)), jnp.array([1.0, 0.0]), key=None
    )
  with pytest.raises(ValueError, match="solver_type"):
    diffusion.sample_dpmpp_2m_sde(
      DENOISER,
      jnp.zeros((2, DIM)),
      jnp.array([1.0, 0.0]),
      key=jax.random.key(0),
      solver_type="rk4",
    )
