"""Align Your Steps: schedule optimisation by the KL upper bound (KLUB).

Sabour, Fidler, Kreis (2024), "Align Your Steps: Optimizing Sampling
Schedules in Diffusion Models", Sec. 3. With `sigma(t) = t, s(t) = 1`, the
reverse SDE `dx = -2 (x - D(x; t)) / t dt + sqrt(2 t) dw` and its
linearisation on `[t_{i-1}, t_i]` (the denoiser frozen at `D(x_{t_i}; t_i)`,
whose exact solution is one stochastic-DDIM step) differ only in the drift;
Girsanov's theorem bounds the KL divergence of their outputs by (Eq. 10)

  KLUB(t_{i-1}, t_i) = int_{t_{i-1}}^{t_i} t^-3
      E ||D(x_t; t) - D(x_{t_i}; t_i)||^2 dt,
  x_0 ~ p_data, x_t = x_0 + t eps, x_{t_i} = x_t + sqrt(t_i^2 - t^2) eps',

and the schedule's KLUB is the sum over its intervals (Eq. 11). The estimator
is Monte Carlo over data, noise and `t`, with `t` importance-sampled from the
integrand's value for Gaussian data `N(0, c^2 I)` (Sec. 3.3, c = 0.5). For
that data the expectation is `d [(a(t) - a(t_i))^2 (c^2 + t^2) + a(t_i)^2
(t_i^2 - t^2)]`, `a(t) = c^2 / (c^2 + t^2)`; the paper's Lemma 3.3 keeps only
the first term, whose zero at `t = t_i` is of second order where the true
integrand's is of first order, so the full expression is used here.

The optimiser is the paper's iterative refinement (Eq. 12, App. B.1): each
interior level in turn is set to the best of a grid of candidates between its
neighbours (non-neighbouring levels in parallel), sweeps repeat until the
KLUB stops improving or a validation metric stops improving (early stopping),
then the schedule is subdivided at log-midpoints and only the new levels are
refined (coarse to fine). All random draws come from one key, so a run is
deterministic from its seed, and the KLUB of a schedule is a smooth function
of the levels (common random numbers).
"""

from collections.abc import Callable
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax.diffusion import schedules

# `interval_cost(sigma_lo, sigma_hi) -> cost`, vectorised over `[b]` arrays
# with `0 < sigma_lo < sigma_hi`.
IntervalCost = Callable[[jax.Array, jax.Array], jax.Array]
# `metric(levels) -> float`, lower is better (early stopping).
Validation = Callable[[np.ndarray], float]


def _gaussian_klub_integrand(t, t_hi, c):
  """`E ||D(x_t) - D(x_{t_hi})||^2 / d` for data `N(0, c^2)`, ideal `D`."""
  a, a_hi = c**2 / (c**2 + t**2), c**2 / (c**2 + t_hi**2)
  return (a - a_hi) ** 2 * (c**2 + t**2) + a_hi**2 * (t_hi**2 - t**2)


def _importance_sample(lo, hi, u_M, proposal_std, grid_size):
  """Draws `t` in `[lo, hi]` with pdf ~ `t^-3 * Gaussian integrand`.

  The proposal is tabulated on a uniform grid in `log t`, with a
  piecewise-constant density in `log t`, inverted exactly.

  Returns:
    `(t_M, weight_M)` with `E[weight * f(t)] = int_lo^hi t^-3 f(t) dt`.
  """
  log_G = jnp.linspace(jnp.log(lo), jnp.log(hi), grid_size)
  t_G = jnp.exp(log_G)
  # Density in log t: t^-3 * integrand * t.
  dens_G = _gaussian_klub_integrand(t_G, hi, proposal_std) / t_G**2
  cell = 0.5 * (dens_G[1:] + dens_G[:-1]) * (log_G[1] - log_G[0])
  cdf = jnp.concatenate([jnp.zeros((1,), cell.dtype), jnp.cumsum(cell)])
  total = cdf[-1]
  target_M = u_M * total
  j_M = jnp.clip(
    jnp.searchsorted(cdf, target_M, side="right") - 1, 0, grid_size - 2
  )
  frac_M = (target_M - cdf[j_M]) / cell[j_M]
  log_t_M = log_G[j_M] + frac_M * (log_G[1] - log_G[0])
  t_M = jnp.exp(log_t_M)
  q_log_M = cell[j_M] / ((log_G[1] - log_G[0]) * total)  # density in log t
  # int t^-3 f dt = int t^-2 f dlog t  ->  weight = t^-2 / q_log.
  return t_M, 1.0 / (t_M**2 * q_log_M)


def klub_estimator(
  denoiser,
  data_sampler,
  key,
  *,
  num_samples: int = 2048,
  proposal_std: float = 0.5,
  grid_size: int = 256,
  batch_size: int = 8,
) -> IntervalCost:
  """Monte-Carlo KLUB of single intervals, for any JAX denoiser and data.

  Args:
    denoiser: `D(x, sigma) -> x0 estimate` for a batch `x` and scalar sigma.
    data_sampler: `data_sampler(key, num) -> [num, ...]` exact data samples.
    key: PRNG key; all draws (data, noises, time uniforms) come from it and
      are reused for every interval (common random numbers).
    num_samples: Monte-Carlo samples per interval.
    proposal_std: `c` of the Gaussian importance-sampling proposal.
    grid_size: grid points of the tabulated proposal.
    batch_size: intervals evaluated at once (memory vs. speed).

  Returns:
    `interval_klub(sigma_lo, sigma_hi) -> [b]` for `[b]` arrays with
    `0 < sigma_lo < sigma_hi`; jitted inside (padded to powers of two, and
    shared by estimators with the same `denoiser` object and settings).

  Example:
    >>> mix = toy.toy_density("ring")
    >>> klub = klub_estimator(toy.mixture_denoiser(mix),
    ...                       lambda k, n: toy.mixture_sample(mix, k, n),
    ...                       jax.random.key(0))
    >>> klub(jnp.array([0.5]), jnp.array([1.0])).shape
    (1,)
  """
  num_samples = _checks.check_positive_int("num_samples", num_samples)
  grid_size = _checks.check_positive_int("grid_size", grid_size)
  batch_size = _checks.check_positive_int("batch_size", batch_size)
  if grid_size < 2:
    raise ValueError(f"`grid_size` must be >= 2, got {grid_size}.")
  if not proposal_std > 0:
    raise ValueError(f"`proposal_std` must be > 0, got {proposal_std}.")
  k_data, k_t, k_hi, k_u = jax.random.split(key, 4)
  x0 = jnp.asarray(data_sampler(k_data, num_samples), jnp.float32)
  if x0.ndim < 1 or x0.shape[0] != num_samples:
    raise ValueError(
      "`data_sampler(key, num)` must return [num, ...], got "
      f"shape {x0.shape} for num={num_samples}."
    )
  out = jax.eval_shape(denoiser, x0[:1], jnp.float32(1.0))
  if out.shape != x0[:1].shape:
    raise ValueError(
      f"`denoiser(x, sigma)` must return x's shape "
      f"{x0[:1].shape}, got {out.shape}."
    )
  draws = (
    x0,
    jax.random.normal(k_t, x0.shape, x0.dtype),
    jax.random.normal(k_hi, x0.shape, x0.dtype),
    jax.random.uniform(k_u, (num_samples,), x0.dtype),
  )
  static = dict(
    denoiser=denoiser,
    proposal_std=float(proposal_std),
    grid_size=grid_size,
    batch_size=batch_size,
  )

  def interval_klub(sigma_lo, sigma_hi):
    lo = jnp.atleast_1d(jnp.asarray(sigma_lo, jnp.float32))
    hi = jnp.atleast_1d(jnp.asarray(sigma_hi, jnp.float32))
    # Pad to a power of two (with a harmless interval) to bound recompiles.
    size = max(batch_size, 1 << (lo.shape[0] - 1).bit_length())
    pad = size - lo.shape[0]
    lo_p = jnp.concatenate([lo, jnp.full((pad,), 0.5, jnp.float32)])
    hi_p = jnp.concatenate([hi, jnp.full((pad,), 1.0, jnp.float32)])
    return _interval_klub(draws, lo_p, hi_p, **static)[: lo.shape[0]]

  return interval_klub


@functools.partial(
  jax.jit,
  static_argnames=("denoiser", "proposal_std", "grid_size", "batch_size"),
)
def _interval_klub(
  draws, lo_B, hi_B, *, denoiser, proposal_std, grid_size, batch_size
):
  """`[b]` KLUBs of the intervals `[lo_B, hi_B]` from fixed draws."""
  x0, eps_t, eps_hi, u_M = draws
  num = x0.shape[0]
  expand = (slice(None),) + (None,) * (x0.ndim - 1)
  per_sample = jax.vmap(lambda x, s: denoiser(x[None], s)[0])

  def one(bounds):
    lo, hi = bounds
    t_M, w_M = _importance_sample(lo, hi, u_M, proposal_std, grid_size)
    x_t = x0 + t_M[expand] * eps_t
    x_hi = x_t + jnp.sqrt(jnp.maximum(hi**2 - t_M**2, 0.0))[expand] * eps_hi
    diff = per_sample(x_t, t_M) - denoiser(x_hi, hi)
    sq_M = jnp.sum(diff.reshape(num, -1) ** 2, axis=-1)
    return jnp.mean(w_M * sq_M)

  return jax.lax.map(one, (lo_B, hi_B), batch_size=batch_size)


def gaussian_euler_cost(data_std: float = 1.0) -> IntervalCost:
  """Interval cost whose sum is minimised by `kl_optimal_sigmas`.

  For data `N(0, c^2 I)` an Euler (DDIM) step of the probability-flow ODE
  from `hi` to `lo` multiplies `x` by `f = 1 - (hi - lo) hi / (c^2 + hi^2)`,
  which shrinks more than the exact flow, so the KL divergence between the
  output and `p(x; sigma_min)` (Theorem 3.1) decreases with `prod f`; the
  cost `-log f` per interval makes that KL a sum the optimiser can use.

  Args:
    data_std: `c`.

  Returns:
    `cost(sigma_lo, sigma_hi) -> [b]` (float64 numpy).
  """
  if not data_std > 0:
    raise ValueError(f"`data_std` must be > 0, got {data_std}.")

  def cost(sigma_lo, sigma_hi):
    # float64 numpy: near sigma_max the per-interval costs differ by less
    # than float32 resolves.
    lo = np.asarray(sigma_lo, np.float64)
    hi = np.asarray(sigma_hi, np.float64)
    return -np.log1p(-(hi - lo) * hi / (data_std**2 + hi**2))

  return cost


def schedule_cost(interval_cost: IntervalCost, levels) -> float:
  """Sum of `interval_cost` over a schedule's intervals (a final 0 dropped).

  Args:
    interval_cost: e.g. from `klub_estimator`.
    levels: `[m]` decreasing levels; a final 0 is ignored (the last step to
      0 is not part of the KLUB).

  Returns:
    The total, as a float.
  """
  s = schedules.check_schedule(levels, "levels")
  s = s[:-1] if s[-1] == 0 else s
  if len(s) < 2:
    raise ValueError("`levels` needs at least two positive values.")
  return float(np.sum(interval_cost(s[1:], s[:-1])))


class OptimizeResult(NamedTuple):
  """What `optimize_schedule` returns."""

  levels: np.ndarray  # [m] decreasing positive levels
  costs: list  # total cost after each sweep (index 0: the initial one)
  validation: list  # validation metric after each sweep ([] if none)
  sweeps: int  # sweeps run


_MIN_ZOOM = 1 / 64


def _candidates(upper, lower, current, num, zoom):
  """`[I, 2 num + 1]` levels strictly inside `(lower, upper)` per index.

  A log-uniform grid over the whole gap, a finer one around the current
  value (`zoom` coarse cells each side), and the current value itself.
  """
  lu, ll, lc = np.log(upper), np.log(lower), np.log(current)
  coarse = np.linspace(ll, lu, num + 2)[1:-1].T
  cell = (lu - ll) / (num + 1)
  fine = lc[:, None] + np.linspace(-zoom, zoom, num)[None, :] * cell[:, None]
  fine = np.clip(
    fine, ll[:, None] + 0.01 * cell[:, None], lu[:, None] - 0.01 * cell[:, None]
  )
  return np.exp(np.concatenate([coarse, fine, lc[:, None]], axis=1))


def optimize_schedule(
  interval_cost: IntervalCost,
  levels,
  *,
  free=None,
  num_candidates: int = 16,
  max_sweeps: int = 50,
  rtol: float = 1e-4,
  validation_fn: Validation | None = None,
  patience: int = 2,
) -> OptimizeResult:
  """AYS iterative refinement of the interior levels of a schedule.

  Each sweep updates the odd, then the even interior indices (non-neighbours
  in parallel): level `i` becomes the candidate between `levels[i+1]` and
  `levels[i-1]` minimising `cost(levels[i], levels[i-1]) + cost(levels[i+1],
  levels[i])`. The current value is a candidate, so the total never
  increases. When a sweep improves the total by less than `rtol`
  (relative), the fine grid around each level shrinks 4x; after three such
  refinements the sweeps stop. They also stop after `max_sweeps`, or, with
  `validation_fn`, when the
  validation metric has not improved for `patience` sweeps; then the levels
  with the best validation metric are returned (early stopping, as the KLUB
  is a bound and over-optimising it can hurt samples).

  Args:
    interval_cost: `cost(sigma_lo, sigma_hi) -> [b]`, e.g. `klub_estimator`.
    levels: `[m]` strictly decreasing positive levels; the endpoints stay.
    free: optional `[m]` bool mask of the levels that may move (interior
      only); default all interior levels.
    num_candidates: size of each of the two candidate grids.
    max_sweeps: maximum number of sweeps.
    rtol: relative improvement below which the sweeps stop.
    validation_fn: optional `levels -> metric` (lower is better).
    patience: sweeps without validation improvement before stopping.

  Returns:
    An `OptimizeResult`.

  Example:
    >>> init = karras_sigmas(10)[:-1]
    >>> res = optimize_schedule(gaussian_euler_cost(1.0), init)
  """
  s = schedules.check_schedule(levels, "levels", allow_final_zero=False)
  m = len(s)
  if m < 3:
    raise ValueError(
      f"`levels` needs >= 3 values to have an interior, got {m}."
    )
  num_candidates = _checks.check_positive_int("num_candidates", num_candidates)
  max_sweeps = _checks.check_positive_int("max_sweeps", max_sweeps)
  patience = _checks.check_positive_int("patience", patience)
  mask = np.zeros(m, bool)
  mask[1:-1] = True
  if free is not None:
    _checks.check_shape("free", free, (m,), "[m]")
    free = np.asarray(free, bool)
    if free[0] or free[-1]:
      raise ValueError("`free` must keep the endpoints fixed (False).")
    mask &= free
  costs = [schedule_cost(interval_cost, s)]
  validation = [] if validation_fn is None else [float(validation_fn(s))]
  best, since_best, sweeps, zoom = s.copy(), 0, 0, 1.0
  for sweeps in range(1, max_sweeps + 1):  # noqa: B007 (read after the loop)
    for parity in (1, 0):
      idx = np.flatnonzero(mask & (np.arange(m) % 2 == parity))
      if idx.size == 0:
        continue
      cand = _candidates(s[idx - 1], s[idx + 1], s[idx], num_candidates, zoom)
      upper = np.broadcast_to(s[idx - 1][:, None], cand.shape)
      lower = np.broadcast_to(s[idx + 1][:, None], cand.shape)
      lo = np.concatenate([cand.ravel(), lower.ravel()])
      hi = np.concatenate([upper.ravel(), cand.ravel()])
      c = np.asarray(interval_cost(lo, hi), np.float64).reshape(2, *cand.shape)
      total = c[0] + c[1]
      total = np.where(np.isfinite(total), total, np.inf)
      s[idx] = cand[np.arange(idx.size), np.argmin(total, axis=1)]
    costs.append(schedule_cost(interval_cost, s))
    if validation_fn is not None:
      validation.append(float(validation_fn(s)))
      if validation[-1] < min(validation[:-1]):
        best, since_best = s.copy(), 0
      else:
        since_best += 1
        if since_best >= patience:
          break
    else:
      best = s.copy()
    if costs[-2] - costs[-1] <= rtol * abs(costs[-2]):
      if zoom <= _MIN_ZOOM:
        break
      zoom /= 4  # stalled on the grid: refine around the current levels

  return OptimizeResult(best, costs, validation, sweeps)


def subdivide_loglinear(levels) -> np.ndarray:
  """Doubles the steps: inserts the geometric mean between neighbours.

  Args:
    levels: `[m]` decreasing positive levels.

  Returns:
    `[2m - 1]` levels; the even indices are the old ones.
  """
  s = schedules.check_schedule(levels, "levels", allow_final_zero=False)
  out = np.empty(2 * len(s) - 1)
  out[0::2] = s
  out[1::2] = np.sqrt(s[:-1] * s[1:])
  return out


class AYSResult(NamedTuple):
  """What `align_your_steps` returns: one entry per stage (coarse to fine)."""

  levels: list  # [stage] -> [m_stage] positive levels
  stages: list  # [stage] -> OptimizeResult


def align_your_steps(
  interval_cost: IntervalCost,
  init_levels,
  *,
  num_refinements: int = 2,
  validation_fn: Validation | None = None,
  **optimize_kwargs,
) -> AYSResult:
  """AYS coarse to fine: optimise all interior levels, then subdivide+refine.

  Stage 0 optimises every interior level of `init_levels` (with early
  stopping by `validation_fn` if given); each of `num_refinements` further
  stages subdivides at log-midpoints (`subdivide_loglinear`) and optimises
  only the new levels, keeping the shape found so far (Sec. 3.3: 10 -> 20 ->
  40 steps). Use `schedules.to_sampling_schedule` on a stage's levels to get a
  sampling schedule of any length.

  Args:
    interval_cost: e.g. from `klub_estimator`.
    init_levels: `[n + 1]` decreasing positive levels (e.g. Karras without
      its final 0).
    num_refinements: subdivision stages after the first.
    validation_fn: early-stopping metric for stage 0 (lower is better).
    **optimize_kwargs: passed to `optimize_schedule`.

  Returns:
    An `AYSResult` with `num_refinements + 1` stages.
  """
  if num_refinements < 0:
    raise ValueError(f"`num_refinements` must be >= 0, got {num_refinements}.")
  res = optimize_schedule(
    interval_cost, init_levels, validation_fn=validation_fn, **optimize_kwargs
  )
  levels, stages = [res.levels], [res]
  for _ in range(num_refinements):
    fine = subdivide_loglinear(levels[-1])
    free = np.zeros(len(fine), bool)
    free[1::2] = True
    res = optimize_schedule(interval_cost, fine, free=free, **optimize_kwargs)
    levels.append(res.levels)
    stages.append(res)
  return AYSResult(levels, stages)
