"""ODE/SDE samplers over a noise schedule, in k-diffusion's conventions.

Every sampler is `sample_<name>(denoiser, x, sigmas, *, key=None, **options)
-> x`: `denoiser(x, sigma)` maps the batch `x` and a scalar noise level to the
x0 estimate `D(x; sigma)` (EDM's preconditioned denoiser), `x` is the starting
point at `sigmas[0]` (typically `sigmas[0] * normal(...)`), and `sigmas` is a
strictly decreasing schedule, usually ending in 0. The samplers are pure and
`jax.jit`-able (`denoiser` static), loop with `lax.scan` over the steps, and
draw step `i`'s noise as `jax.random.normal(jax.random.split(key, n)[i],
x.shape)`.

The update rules are those of k-diffusion (`k_diffusion/sampling.py`), the
reference users compare against:
  * `sample_euler`: Karras et al. (2022), Alg. 2 with first-order steps,
    stochastic "churn" `S_churn, S_tmin, S_tmax, S_noise`.
  * `sample_euler_ancestral`: DDPM-like ancestral steps (`get_ancestral_step`).
  * `sample_heun`: Karras et al. (2022), Alg. 2 (2nd order, last step to
    sigma = 0 is Euler).
  * `sample_dpmpp_2m`: DPM-Solver++(2M), Lu et al. (2022), Alg. 2 in the
    data-prediction form; first step and the step to 0 are first order.
  * `sample_dpmpp_2m_sde`: SDE-DPM-Solver++(2M) (ibid.), midpoint or Heun
    correction, with `eta` and `s_noise`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax.diffusion import schedules

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


def _prepare(denoiser: Denoiser, x, sigmas, key, needs_key: bool):
  """Validates the arguments; returns `(sigmas, per-step keys or None)`."""
  _checks.check_rank("sigmas", sigmas, 1, "[num_steps + 1]")
  n = np.shape(sigmas)[0] - 1
  if n < 1:
    raise ValueError(
      f"`sigmas` needs at least 2 values (n >= 1 steps), got {n + 1}."
    )
  if not isinstance(sigmas, jax.core.Tracer):
    schedules.check_schedule(sigmas)
  out = jax.eval_shape(denoiser, x, jnp.zeros((), x.dtype))
  if out.shape != x.shape:
    raise ValueError(
      f"`denoiser(x, sigma)` must return x's shape {x.shape}, got {out.shape}."
    )
  if needs_key and key is None:
    raise ValueError("`key` is required by this stochastic sampler.")
  keys = jax.random.split(key, n) if needs_key else None
  return jnp.asarray(sigmas, x.dtype), keys


def _noise(key, x):
  return jax.random.normal(key, x.shape, x.dtype)


def _churn(x, sigma, key, gamma_max, s_tmin, s_tmax, s_noise):
  """EDM's churn: raises the level to `sigma_hat` by adding fresh noise."""
  gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax), gamma_max, 0.0)
  sigma_hat = sigma * (gamma + 1)
  if key is not None:
    # sqrt(sigma_hat^2 - sigma^2), exactly 0 when gamma = 0.
    x = x + _noise(key, x) * s_noise * sigma * jnp.sqrt(gamma * (gamma + 2))
  return x, sigma_hat


def _gamma_max(sigmas, s_churn):
  """EDM's `gamma = min(S_churn / n, sqrt(2) - 1)`."""
  return min(s_churn / (sigmas.shape[0] - 1), 2**0.5 - 1)


def sample_euler(
  denoiser: Denoiser,
  x: jax.Array,
  sigmas,
  *,
  key=None,
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = float("inf"),
  s_noise: float = 1.0,
) -> jax.Array:
  """Euler steps on the probability-flow ODE, with optional EDM churn.

  Per step: `gamma = min(s_churn / n, sqrt(2) - 1)` if `s_tmin <= sigma_i <=
  s_tmax` else 0; `sigma_hat = sigma_i (1 + gamma)`; `x += sqrt(sigma_hat^2 -
  sigma_i^2) s_noise eps`; `d = (x - D(x; sigma_hat)) / sigma_hat`;
  `x += (sigma_{i+1} - sigma_hat) d`.

  Args:
    denoiser: `D(x, sigma) -> x0 estimate`, same shape as `x`.
    x: `[batch, ...]` start at `sigmas[0]`.
    sigmas: `[n + 1]` decreasing schedule.
    key: PRNG key; required when `s_churn > 0`.
    s_churn, s_tmin, s_tmax, s_noise: EDM's stochasticity parameters.

  Returns:
    The sample at `sigmas[-1]`, shape of `x`.

  Example:
    >>> sigmas = diffusion.karras_sigmas(10)
    >>> x = sample_euler(lambda x, s: 0 * x, 80.0 * jnp.ones((2, 3)), sigmas)
    >>> # all zeros: the denoiser says x0 = 0
  """
  if s_churn < 0:
    raise ValueError(f"`s_churn` must be >= 0, got {s_churn}.")
  sigmas, keys = _prepare(denoiser, x, sigmas, key, s_churn > 0)
  gamma_max = _gamma_max(sigmas, s_churn)

  def step(x, inputs):
    sigma, sigma_next, k = inputs
    x, sigma_hat = _churn(x, sigma, k, gamma_max, s_tmin, s_tmax, s_noise)
    d = (x - denoiser(x, sigma_hat)) / sigma_hat
    return x + d * (sigma_next - sigma_hat), None

  x, _ = jax.lax.scan(step, x, (sigmas[:-1], sigmas[1:], keys))
  return x


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
  """Splits a step into an Euler part to `sigma_down` and noise `sigma_up`.

  `sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) /
  sigma_from^2))`, `sigma_down = sqrt(sigma_to^2 - sigma_up^2)`.

  Returns:
    `(sigma_down, sigma_up)`.
  """
  sigma_up = jnp.minimum(
    sigma_to,
    eta * jnp.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2),
  )
  return jnp.sqrt(jnp.maximum(sigma_to**2 - sigma_up**2, 0.0)), sigma_up


def sample_euler_ancestral(
  denoiser: Denoiser,
  x: jax.Array,
  sigmas,
  *,
  key=None,
  eta: float = 1.0,
  s_noise: float = 1.0,
) -> jax.Array:
  """Ancestral Euler: an Euler step to `sigma_down`, then noise `sigma_up`.

  Args:
    denoiser: `D(x, sigma) -> x0 estimate`.
    x: `[batch, ...]` start at `sigmas[0]`.
    sigmas: `[n + 1]` decreasing schedule.
    key: PRNG key (required).
    eta: ancestral noise scale (1: DDPM-like, 0: plain Euler).
    s_noise: scale of the added noise.

  Returns:
    The sample at `sigmas[-1]` (no noise is added on a step to 0).
  """
  sigmas, keys = _prepare(denoiser, x, sigmas, key, True)

  def step(x, inputs):
    sigma, sigma_next, k = inputs
    sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
    d = (x - denoiser(x, sigma)) / sigma
    x = x + d * (sigma_down - sigma)
    return x + _noise(k, x) * s_noise * sigma_up, None

  x, _ = jax.lax.scan(step, x, (sigmas[:-1], sigmas[1:], keys))
  return x


def sample_heun(
  denoiser: Denoiser,
  x: jax.Array,
  sigmas,
  *,
  key=None,
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = float("inf"),
  s_noise: float = 1.0,
) -> jax.Array:
  """EDM's 2nd-order Heun sampler; the step to sigma = 0 is an Euler step.

  Per step (after churn as in `sample_euler`): `d = (x - D(x; sigma_hat)) /
  sigma_hat`, `x2 = x + (sigma_{i+1} - sigma_hat) d`; if `sigma_{i+1} = 0`
  then `x = x2`, else `d2 = (x2 - D(x2; sigma_{i+1})) / sigma_{i+1}` and
  `x += (sigma_{i+1} - sigma_hat) (d + d2) / 2`. `2n - 1` denoiser calls for
  a schedule ending in 0.

  Args:
    denoiser: `D(x, sigma) -> x0 estimate`.
    x: `[batch, ...]` start at `sigmas[0]`.
    sigmas: `[n + 1]` decreasing schedule.
    key: PRNG key; required when `s_churn > 0`.
    s_churn, s_tmin, s_tmax, s_noise: as in `sample_euler`.

  Returns:
    The sample at `sigmas[-1]`.
  """
  if s_churn < 0:
    raise ValueError(f"`s_churn` must be >= 0, got {s_churn}.")
  sigmas, keys = _prepare(denoiser, x, sigmas, key, s_churn > 0)
  gamma_max = _gamma_max(sigmas, s_churn)

  def step(x, inputs):
    sigma, sigma_next, k = inputs
    x, sigma_hat = _churn(x, sigma, k, gamma_max, s_tmin, s_tmax, s_noise)
    d = (x - denoiser(x, sigma_hat)) / sigma_hat
    dt = sigma_next - sigma_hat
    x_euler = x + d * dt

    def heun(x_euler):
      d2 = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
      return x + (d + d2) / 2 * dt

    return jax.lax.cond(sigma_next == 0, lambda y: y, heun, x_euler), None

  x, _ = jax.lax.scan(step, x, (sigmas[:-1], sigmas[1:], keys))
  return x


def _log_step(sigma, sigma_next):
  """`h = log(sigma / sigma_next)`; 0 stands in when `sigma_next = 0`."""
  last = sigma_next == 0
  return jnp.log(sigma) - jnp.log(jnp.where(last, sigma, sigma_next)), last


def sample_dpmpp_2m(
  denoiser: Denoiser, x: jax.Array, sigmas, *, key=None
) -> jax.Array:
  """DPM-Solver++(2M): multistep 2nd order in `lambda = -log sigma`.

  With `h_i = log(sigma_i / sigma_{i+1})` and `r = h_{i-1} / h_i`:
  `D' = (1 + 1 / (2r)) D_i - D_{i-1} / (2r)` (the first step and the step to
  sigma = 0 use `D' = D_i`), then `x = (sigma_{i+1} / sigma_i) x -
  expm1(-h_i) D'`. On a step to 0 this is `x = D'`.

  Args:
    denoiser: `D(x, sigma) -> x0 estimate`.
    x: `[batch, ...]` start at `sigmas[0]`.
    sigmas: `[n + 1]` decreasing schedule.
    key: unused (deterministic); accepted for a uniform signature.

  Returns:
    The sample at `sigmas[-1]`.
  """
  del key
  sigmas, _ = _prepare(denoiser, x, sigmas, None, False)
  n = sigmas.shape[0] - 1
  h_prev = jnp.concatenate(
    [jnp.ones((1,), sigmas.dtype), _log_step(sigmas[:-2], sigmas[1:-1])[0]]
  )

  def step(carry, inputs):
    x, old_denoised = carry
    sigma, sigma_next, h_last, first = inputs
    denoised = denoiser(x, sigma)
    h, last = _log_step(sigma, sigma_next)
    r = h_last / h
    second = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    denoised_d = jnp.where(first | last, denoised, second)
    x = jnp.where(
      last, denoised_d, (sigma_next / sigma) * x - jnp.expm1(-h) * denoised_d
    )
    return (x, denoised), None

  first = jnp.arange(n) == 0
  (x, _), _ = jax.lax.scan(
    step, (x, jnp.zeros_like(x)), (sigmas[:-1], sigmas[1:], h_prev, first)
  )
  return x


def sample_dpmpp_2m_sde(
  denoiser: Denoiser,
  x: jax.Array,
  sigmas,
  *,
  key=None,
  eta: float = 1.0,
  s_noise: float = 1.0,
  solver_type: str = "midpoint",
) -> jax.Array:
  """SDE-DPM-Solver++(2M) with independent Gaussian noise per step.

  With `h = log(sigma_i / sigma_{i+1})`: `x = (sigma_{i+1} / sigma_i)
  exp(-eta h) x - expm1(-h (1 + eta)) D_i`, plus, after the first step, the
  correction `-0.5 expm1(-h (1 + eta)) (D_i - D_{i-1}) / r` ("midpoint") or
  `(-expm1(-h (1 + eta)) / (-h (1 + eta)) + 1) (D_i - D_{i-1}) / r`
  ("heun"), `r = h_{i-1} / h`, and noise `sigma_{i+1} sqrt(-expm1(-2 eta h))
  s_noise eps`. A step to sigma = 0 returns `D_i`. k-diffusion draws the noise
  from a Brownian tree by default; here each step's noise is an independent
  normal, which has the same law.

  Args:
    denoiser: `D(x, sigma) -> x0 estimate`.
    x: `[batch, ...]` start at `sigmas[0]`.
    sigmas: `[n + 1]` decreasing schedule.
    key: PRNG key (required).
    eta: SDE noise scale (0 gives a deterministic 2M variant).
    s_noise: scale of the added noise.
    solver_type: `"midpoint"` or `"heun"`.

  Returns:
    The sample at `sigmas[-1]`.
  """
  _checks.check_choice("solver_type", solver_type, ("midpoint", "heun"))
  sigmas, keys = _prepare(denoiser, x, sigmas, key, True)
  n = sigmas.shape[0] - 1
  h_prev = jnp.concatenate(
    [jnp.ones((1,), sigmas.dtype), _log_step(sigmas[:-2], sigmas[1:-1])[0]]
  )

  def step(carry, inputs):
    x, old_denoised = carry
    sigma, sigma_next, h_last, first, k = inputs
    denoised = denoiser(x, sigma)
    h, last = _log_step(sigma, sigma_next)
    eta_h = eta * h
    phi = -jnp.expm1(-h - eta_h)
    y = (sigma_next / sigma) * jnp.exp(-eta_h) * x + phi * denoised
    diff = (denoised - old_denoised) * (h / h_last)
    if solver_type == "midpoint":
      correction = 0.5 * phi * diff
    else:
      correction = (phi / (-h - eta_h) + 1) * diff
    y = y + jnp.where(first, 0.0, 1.0) * correction
    noise_scale = sigma_next * jnp.sqrt(-jnp.expm1(-2 * eta_h)) * s_noise
    y = y + _noise(k, x) * noise_scale
    return (jnp.where(last, denoised, y), denoised), None

  first = jnp.arange(n) == 0
  (x, _), _ = jax.lax.scan(
    step, (x, jnp.zeros_like(x)), (sigmas[:-1], sigmas[1:], h_prev, first, keys)
  )
  return x


SAMPLERS = {
  "euler": sample_euler,
  "euler_ancestral": sample_euler_ancestral,
  "heun": sample_heun,
  "dpmpp_2m": sample_dpmpp_2m,
  "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
