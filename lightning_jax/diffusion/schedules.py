"""Noise schedules: decreasing arrays of noise levels sigma, ending in 0.

Conventions of EDM (Karras et al., 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models") and k-diffusion: `x_sigma = x_0 + sigma *
eps`, a schedule for `n` steps is `n + 1` values `sigma_0 > ... > sigma_n`,
and `sigma_n = 0` for a sampling schedule. Schedules are small host-side
constants, so they are built in float64 numpy; pass them to the samplers as
they are (JAX casts them to the sampling dtype).
"""

import numpy as np

from lightning_jax import _checks

# Stable Diffusion's discrete DDPM schedule ("scaled_linear" betas).
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_NUM_TRAIN_TIMESTEPS = 1000

# Align Your Steps 10-step noise levels (Sabour, Fidler, Kreis, 2024), as
# published on the project's how-to page
# (https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html) and
# copied by ComfyUI (comfy_extras/nodes_align_your_steps.py, `NOISE_LEVELS`).
# Eleven levels, sigma_max -> sigma_min; the final 0 is not part of the table.
# For SD 1.5 / SDXL these are the VP sigmas at `AYS_TIMESTEPS` (to 1e-9).
AYS_NOISE_LEVELS = {
  "sd15": (
    14.6146412293,
    6.4745760956,
    3.8636745985,
    2.6946151520,
    1.8841921177,
    1.3943805092,
    0.9642583904,
    0.6523686016,
    0.3977456272,
    0.1515232662,
    0.0291671582,
  ),
  "sdxl": (
    14.6146412293,
    6.3184485287,
    3.7681790315,
    2.1811480769,
    1.3405244945,
    0.8620721141,
    0.5550693289,
    0.3798540708,
    0.2332364134,
    0.1114188177,
    0.0291671582,
  ),
  "svd": (
    700.00,
    54.5,
    15.886,
    7.977,
    4.248,
    1.789,
    0.981,
    0.403,
    0.173,
    0.034,
    0.002,
  ),
}
# The same schedules as discrete timesteps of SD's 1000-step DDPM (project
# how-to page; diffusers `AysSchedules` lists the first ten).
AYS_TIMESTEPS = {
  "sd15": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0),
  "sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0),
}
FINAL_CONVENTIONS = ("replace", "append")


def check_schedule(
  sigmas, name: str = "sigmas", *, allow_final_zero: bool = True
) -> np.ndarray:
  """Validates a noise schedule and returns it as a float64 array.

  Args:
    sigmas: `[n + 1]` noise levels.
    name: argument name used in error messages.
    allow_final_zero: whether the last value may be 0 (sampling schedules);
      otherwise every value must be > 0.

  Returns:
    The schedule as a float64 numpy array.

  Raises:
    ValueError: if `sigmas` is not rank 1 with at least 2 values, is not
      finite, has a negative value (or a zero other than a final one), or is
      not strictly decreasing.
  """
  _checks.check_rank(name, sigmas, 1, "[n + 1]")
  s = np.array(sigmas, np.float64)  # a copy: callers may edit it
  if s.shape[0] < 2:
    raise ValueError(
      f"`{name}` needs at least 2 values (one step), got {s.shape[0]}."
    )
  if not np.all(np.isfinite(s)):
    raise ValueError(f"`{name}` must be finite, got {s}.")
  if np.all(np.diff(s) > 0):
    raise ValueError(
      f"`{name}` must be strictly decreasing (sigma_max first), got an "
      f"increasing schedule {s}: reversed?"
    )
  positive = s[:-1] if allow_final_zero else s
  if np.any(positive <= 0) or s[-1] < 0:
    what = "> 0 (a final 0 allowed)" if allow_final_zero else "> 0"
    raise ValueError(f"`{name}` must be {what}, got {s}.")
  i = np.flatnonzero(np.diff(s) >= 0)
  if i.size:
    i = i[0]
    raise ValueError(
      f"`{name}` must be strictly decreasing, but {name}[{i}] = {s[i]} <= "
      f"{name}[{i + 1}] = {s[i + 1]} in {s}."
    )
  return s


def _check_range(sigma_min, sigma_max) -> None:
  if not (
    np.isfinite(sigma_min)
    and np.isfinite(sigma_max)
    and 0 < sigma_min < sigma_max
  ):
    raise ValueError(
      "need 0 < `sigma_min` < `sigma_max`, got "
      f"sigma_min={sigma_min}, sigma_max={sigma_max}."
    )


def _exact_ends(sigmas, sigma_min, sigma_max):
  """Sets the first and last nonzero levels exactly (undoing round-off)."""
  sigmas[0] = sigma_max
  if len(sigmas) > 2:
    sigmas[-2] = sigma_min
  return sigmas


def karras_sigmas(
  n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
  """EDM schedule: `n` levels uniform in `sigma ** (1 / rho)`, then 0.

  `sigma_i = (sigma_max^(1/rho) + i / (n - 1) * (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho` for `i < n` (Karras et al., 2022, Eq. 5).

  Args:
    n: number of steps (`n` nonzero levels).
    sigma_min: the last nonzero level.
    sigma_max: the first level.
    rho: curvature; 7 in EDM.

  Returns:
    `[n + 1]` float64 schedule ending in 0.

  Example:
    >>> karras_sigmas(18)[:2]  # EDM's default 18 steps
    array([80.        , 57.58....])
  """
  n = _checks.check_positive_int("n", n)
  _check_range(sigma_min, sigma_max)
  if not rho > 0:
    raise ValueError(f"`rho` must be > 0, got {rho}.")
  u = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return _exact_ends(
    np.append((hi + u * (lo - hi)) ** rho, 0.0), sigma_min, sigma_max
  )


def exponential_sigmas(
  n: int, sigma_min: float = 0.002, sigma_max: float = 80.0
) -> np.ndarray:
  """Log-linear schedule: `n` levels uniform in `log sigma`, then 0.

  Args:
    n: number of steps.
    sigma_min: the last nonzero level.
    sigma_max: the first level.

  Returns:
    `[n + 1]` float64 schedule ending in 0.

  Example:
    >>> exponential_sigmas(2, 0.1, 10.0)
    array([10. ,  0.1,  0. ])
  """
  n = _checks.check_positive_int("n", n)
  _check_range(sigma_min, sigma_max)
  return _exact_ends(
    np.append(
      np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n)), 0.0
    ),
    sigma_min,
    sigma_max,
  )


def kl_optimal_sigmas(
  n: int,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  data_std: float = 1.0,
) -> np.ndarray:
  """AYS closed-form schedule for Gaussian data `N(0, c^2 I)`, then 0.

  Theorem 3.1 of Sabour et al. (2024): for Gaussian data and Euler (DDIM)
  steps on the probability-flow ODE, the schedule minimising the KL divergence
  between the output and `p(x; sigma_min)` has `atan(sigma / c)` linear in the
  step index: `sigma_i = c * tan((1 - u_i) atan(sigma_max / c) + u_i
  atan(sigma_min / c))`, `u_i = i / (n - 1)`.

  Args:
    n: number of steps (`n` nonzero levels).
    sigma_min: the last nonzero level.
    sigma_max: the first level.
    data_std: the data standard deviation `c`.

  Returns:
    `[n + 1]` float64 schedule ending in 0.

  Example:
    >>> kl_optimal_sigmas(3, 0.002, 80.0)[1]  # tan(mean of the atans)
    1.0...
  """
  n = _checks.check_positive_int("n", n)
  _check_range(sigma_min, sigma_max)
  if not data_std > 0:
    raise ValueError(f"`data_std` must be > 0, got {data_std}.")
  u = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
  a_max = np.arctan(sigma_max / data_std)
  a_min = np.arctan(sigma_min / data_std)
  return _exact_ends(
    np.append(data_std * np.tan((1 - u) * a_max + u * a_min), 0.0),
    sigma_min,
    sigma_max,
  )


def vp_log_sigmas(
  beta_start: float = SD_BETA_START,
  beta_end: float = SD_BETA_END,
  num_train_timesteps: int = SD_NUM_TRAIN_TIMESTEPS,
) -> np.ndarray:
  """`log sigma_t` of a discrete DDPM with "scaled-linear" betas.

  `beta_t = (sqrt(beta_start) + t / (T - 1) (sqrt(beta_end) -
  sqrt(beta_start)))^2`, `alpha_bar_t = prod_{s <= t} (1 - beta_s)`,
  `sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)` (the EDM/VE view of a VP
  model, `x / sqrt(alpha_bar) = x_0 + sigma eps`).

  Args:
    beta_start: `beta_0`; Stable Diffusion uses 0.00085.
    beta_end: `beta_{T-1}`; Stable Diffusion uses 0.012.
    num_train_timesteps: `T`; 1000.

  Returns:
    `[T]` float64 `log sigma_t`, increasing in `t`.
  """
  num = _checks.check_positive_int("num_train_timesteps", num_train_timesteps)
  if not 0 < beta_start <= beta_end < 1:
    raise ValueError(
      f"need 0 < `beta_start` <= `beta_end` < 1, got {beta_start}, {beta_end}."
    )
  betas = np.linspace(beta_start**0.5, beta_end**0.5, num) ** 2
  log_alpha_bar = np.cumsum(np.log1p(-betas))
  return 0.5 * (np.log(-np.expm1(log_alpha_bar)) - log_alpha_bar)


def vp_sigmas(timesteps, **vp_kwargs) -> np.ndarray:
  """Noise level of a discrete DDPM at (possibly fractional) timesteps.

  Integer timesteps index the table of `vp_log_sigmas`; fractional ones
  interpolate `log sigma` linearly between neighbours (k-diffusion's
  `DiscreteSchedule.t_to_sigma`). Append 0 for a sampling schedule.

  Args:
    timesteps: array of timesteps in `[0, T - 1]`.
    **vp_kwargs: `beta_start`, `beta_end`, `num_train_timesteps` of
      `vp_log_sigmas` (Stable Diffusion's by default).

  Returns:
    float64 sigmas, the shape of `timesteps`.

  Raises:
    ValueError: if a timestep is outside `[0, T - 1]`.

  Example:
    >>> vp_sigmas([999, 0])  # Stable Diffusion's range
    array([14.61464119,  0.02916753])
  """
  log_sigmas = vp_log_sigmas(**vp_kwargs)
  t = np.asarray(timesteps, np.float64)
  if not np.all((t >= 0) & (t <= len(log_sigmas) - 1)):
    raise ValueError(
      f"`timesteps` must lie in [0, {len(log_sigmas) - 1}], got {t}."
    )
  return np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas))


def vp_timesteps(sigmas, **vp_kwargs) -> np.ndarray:
  """Fractional DDPM timesteps of noise levels: the inverse of `vp_sigmas`.

  Args:
    sigmas: array of noise levels within the model's `[sigma_0, sigma_{T-1}]`.
    **vp_kwargs: as in `vp_sigmas`.

  Returns:
    float64 timesteps, the shape of `sigmas`.

  Raises:
    ValueError: if a sigma is outside the model's range.

  Example:
    >>> vp_timesteps(vp_sigmas([850.0]))
    array([850.])
  """
  log_sigmas = vp_log_sigmas(**vp_kwargs)
  s = np.asarray(sigmas, np.float64)
  lo, hi = np.exp(log_sigmas[0]), np.exp(log_sigmas[-1])
  if not np.all((s >= lo * (1 - 1e-12)) & (s <= hi * (1 + 1e-12))):
    raise ValueError(f"`sigmas` must lie in [{lo}, {hi}], got {s}.")
  return np.interp(np.log(s), log_sigmas, np.arange(len(log_sigmas)))


def loglinear_interp(sigmas, num: int) -> np.ndarray:
  """Resamples a decreasing positive schedule to `num` values.

  `log sigma` is viewed as piecewise linear on a uniform grid over `[0, 1]`
  and read off at `num` uniform points (how AYS extends its 10-step tables,
  Sabour et al., 2024, Sec. 3.3). Interpolating to the schedule's own length
  is the identity; the result is decreasing and keeps both endpoints.

  Args:
    sigmas: `[m]` strictly decreasing positive levels (no final 0), m >= 2.
    num: number of output values, >= 2.

  Returns:
    `[num]` float64 levels.

  Example:
    >>> loglinear_interp([100.0, 1.0], 3)
    array([100.,  10.,   1.])
  """
  s = check_schedule(sigmas, allow_final_zero=False)
  num = _checks.check_positive_int("num", num)
  if num < 2:
    raise ValueError(f"`num` must be >= 2, got {num}.")
  xs = np.linspace(0.0, 1.0, len(s))
  out = np.exp(np.interp(np.linspace(0.0, 1.0, num), xs, np.log(s)))
  out[[0, -1]] = s[[0, -1]]  # exact endpoints (exp(log(x)) may round)
  return out


def to_sampling_schedule(
  levels, num_steps: int, final: str = "replace"
) -> np.ndarray:
  """Turns positive noise levels into an `num_steps`-step schedule ending in 0.

  Two conventions are in use for the final value:
    * `"replace"` (ComfyUI's AlignYourStepsScheduler, diffusers'
      `AysSchedules` sigmas): interpolate to `num_steps + 1` levels and set
      the last (sigma_min) to 0, so the last step goes to 0 from the
      second-smallest level;
    * `"append"` (k-diffusion's `get_sigmas_*`, EDM): interpolate to
      `num_steps` levels, sigma_min included, and append 0.

  Args:
    levels: `[m]` decreasing positive levels, sigma_max -> sigma_min.
    num_steps: steps of the output.
    final: `"replace"` or `"append"`.

  Returns:
    `[num_steps + 1]` float64 schedule ending in 0.
  """
  num_steps = _checks.check_positive_int("num_steps", num_steps)
  _checks.check_choice("final", final, FINAL_CONVENTIONS)
  if final == "replace":
    out = loglinear_interp(levels, num_steps + 1)
    out[-1] = 0.0
    return out
  if num_steps == 1:
    return np.array(
      [check_schedule(levels, "levels", allow_final_zero=False)[0], 0.0]
    )
  return np.append(loglinear_interp(levels, num_steps), 0.0)


def ays_sigmas(
  name: str, num_steps: int = 10, final: str = "replace"
) -> np.ndarray:
  """Published Align Your Steps schedule, resampled to `num_steps` steps.

  Args:
    name: `"sd15"`, `"sdxl"` or `"svd"` (`AYS_NOISE_LEVELS`).
    num_steps: steps of the output; the tables are for 10 and are resampled
      log-linearly otherwise.
    final: how the final 0 enters, see `to_sampling_schedule`. With
      `"replace"` and 10 steps the table is returned with its last value set
      to 0 (diffusers' `AysSchedules` and ComfyUI).

  Returns:
    `[num_steps + 1]` float64 schedule ending in 0.

  Example:
    >>> ays_sigmas("sd15", 10)[-3:]
    array([0.39774563, 0.15152327, 0.        ])
  """
  _checks.check_choice("name", name, tuple(AYS_NOISE_LEVELS))
  return to_sampling_schedule(AYS_NOISE_LEVELS[name], num_steps, final)
