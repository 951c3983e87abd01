"""Sample-quality metrics against a known density, and schedule comparisons."""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax.diffusion import samplers as samplers_lib
from lightning_jax.diffusion import schedules as schedules_lib
from lightning_jax.diffusion import toy


def sliced_wasserstein(x, y, key, num_projections: int = 256) -> jax.Array:
  """Sliced 2-Wasserstein distance between two equal-size point clouds.

  `SW2(x, y)^2 = E_theta W2^2(<x, theta>, <y, theta>)` over unit directions
  `theta`, each 1D `W2` from sorted projections (Rabin et al., 2011).

  Args:
    x: `[n, d]` points.
    y: `[n, d]` points.
    key: PRNG key for the directions.
    num_projections: number of random directions.

  Returns:
    Scalar `SW2` (float32).

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (512, 2))
    >>> float(sliced_wasserstein(x, x, jax.random.key(1)))
    0.0
  """
  _checks.check_rank("x", x, 2, "[n, d]")
  _checks.check_shape("y", y, np.shape(x), "[n, d] like x")
  num_projections = _checks.check_positive_int(
    "num_projections", num_projections
  )
  theta = jax.random.normal(key, (np.shape(x)[1], num_projections))
  theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
  px = jnp.sort(jnp.asarray(x, jnp.float32) @ theta, axis=0)
  py = jnp.sort(jnp.asarray(y, jnp.float32) @ theta, axis=0)
  return jnp.sqrt(jnp.mean((px - py) ** 2))


def compare_schedules(
  mix: toy.GaussianMixture,
  schedules: Mapping[str, np.ndarray],
  sampler_names,
  *,
  seeds=(0, 1, 2, 3),
  num_samples: int = 4096,
  num_projections: int = 256,
) -> list[dict]:
  """Samples `mix` with each sampler x schedule and scores it against truth.

  For each seed the same starting noise `sigma_0 * eps` is used by every
  sampler and schedule (schedules must share `sigma_0`), and compared with
  `num_samples` exact samples of that seed: the log-likelihood gap `mean log
  p(exact) - mean log p(samples)` under the true density (0 is perfect,
  positive means samples fall in low-density regions) and the sliced
  2-Wasserstein distance. The row `"exact"` scores a second exact sample set
  (the Monte-Carlo noise floor).

  Args:
    mix: the data density.
    schedules: name -> `[n + 1]` sampling schedule.
    sampler_names: keys of `samplers.SAMPLERS`.
    seeds: seeds averaged over.
    num_samples: samples per seed.
    num_projections: directions of the sliced Wasserstein distance.

  Returns:
    Rows `{sampler, schedule, steps, nll_gap, nll_gap_std, sw2, sw2_std}`
    (mean and standard deviation over seeds).
  """
  num_samples = _checks.check_positive_int("num_samples", num_samples)
  if not seeds:
    raise ValueError("`seeds` must not be empty.")
  for name in sampler_names:
    _checks.check_choice("sampler_names", name, tuple(samplers_lib.SAMPLERS))
  firsts = np.array([float(s[0]) for s in schedules.values()])
  if not np.allclose(firsts, firsts[0], rtol=1e-9, atol=0):
    raise ValueError(f"`schedules` must share sigma_0, got {firsts}.")
  denoiser = toy.mixture_denoiser(mix)
  log_prob = jax.jit(lambda x: jnp.mean(toy.mixture_log_prob(mix, x)))
  runs = {
    name: jax.jit(
      lambda x, s, k, f=samplers_lib.SAMPLERS[name]: f(denoiser, x, s, key=k)
    )
    for name in sampler_names
  }
  results = {}
  for seed in seeds:
    k_ref, k_ref2, k_noise, k_proj, k_sde = jax.random.split(
      jax.random.key(seed), 5
    )
    ref = toy.mixture_sample(mix, k_ref, num_samples)
    ref_lp = log_prob(ref)
    start = jax.random.normal(k_noise, ref.shape)
    evals = {("exact", "exact"): toy.mixture_sample(mix, k_ref2, num_samples)}
    for sched_name, sigmas in schedules.items():
      for name in sampler_names:
        evals[(name, sched_name)] = runs[name](
          start * float(sigmas[0]), jnp.asarray(sigmas, jnp.float32), k_sde
        )
    for key, x in evals.items():
      gap = float(ref_lp - log_prob(x))
      sw = float(sliced_wasserstein(x, ref, k_proj, num_projections))
      results.setdefault(key, []).append((gap, sw))
  rows = []
  for (name, sched_name), vals in results.items():
    v = np.asarray(vals)
    steps = 0 if name == "exact" else len(schedules[sched_name]) - 1
    rows.append(
      dict(
        sampler=name,
        schedule=sched_name,
        steps=steps,
        nll_gap=float(v[:, 0].mean()),
        nll_gap_std=float(v[:, 0].std()),
        sw2=float(v[:, 1].mean()),
        sw2_std=float(v[:, 1].std()),
      )
    )
  return rows


def sample_quality_fn(
  mix: toy.GaussianMixture,
  sampler_name: str = "euler_ancestral",
  *,
  seed: int = 1000,
  num_samples: int = 2048,
  num_projections: int = 128,
) -> Callable[[np.ndarray], float]:
  """Validation metric for AYS early stopping: SW2 of samples vs. truth.

  Args:
    mix: the data density.
    sampler_name: sampler run on `levels` with 0 appended.
    seed: seed of the validation draws (keep it apart from evaluation seeds).
    num_samples: samples per evaluation.
    num_projections: sliced-Wasserstein directions.

  Returns:
    `metric(levels) -> float`, lower is better, deterministic.
  """
  _checks.check_choice(
    "sampler_name", sampler_name, tuple(samplers_lib.SAMPLERS)
  )
  sampler = samplers_lib.SAMPLERS[sampler_name]
  denoiser = toy.mixture_denoiser(mix)
  k_ref, k_noise, k_proj, k_sde = jax.random.split(jax.random.key(seed), 4)
  ref = toy.mixture_sample(mix, k_ref, num_samples)
  noise = jax.random.normal(k_noise, ref.shape)
  run = jax.jit(
    lambda s: sliced_wasserstein(
      sampler(denoiser, noise * s[0], s, key=k_sde),
      ref,
      k_proj,
      num_projections,
    )
  )

  def metric(levels) -> float:
    s = schedules_lib.check_schedule(levels, "levels", allow_final_zero=False)
    return float(run(jnp.asarray(np.append(s, 0.0), jnp.float32)))

  return metric
