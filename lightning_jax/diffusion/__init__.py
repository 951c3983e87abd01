"""Diffusion sampling: noise schedules, ODE/SDE samplers, Align Your Steps.

EDM / k-diffusion conventions: a denoiser `D(x, sigma) -> x0 estimate`,
noise levels sigma, schedules as decreasing arrays of `n + 1` sigmas ending
in 0. See docs/diffusion.md.
"""

from lightning_jax.diffusion.ays import align_your_steps
from lightning_jax.diffusion.ays import AYSResult
from lightning_jax.diffusion.ays import gaussian_euler_cost
from lightning_jax.diffusion.ays import klub_estimator
from lightning_jax.diffusion.ays import optimize_schedule
from lightning_jax.diffusion.ays import OptimizeResult
from lightning_jax.diffusion.ays import schedule_cost
from lightning_jax.diffusion.ays import subdivide_loglinear
from lightning_jax.diffusion.evaluate import compare_schedules
from lightning_jax.diffusion.evaluate import sample_quality_fn
from lightning_jax.diffusion.evaluate import sliced_wasserstein
from lightning_jax.diffusion.samplers import get_ancestral_step
from lightning_jax.diffusion.samplers import sample_dpmpp_2m
from lightning_jax.diffusion.samplers import sample_dpmpp_2m_sde
from lightning_jax.diffusion.samplers import sample_euler
from lightning_jax.diffusion.samplers import sample_euler_ancestral
from lightning_jax.diffusion.samplers import sample_heun
from lightning_jax.diffusion.samplers import SAMPLERS
from lightning_jax.diffusion.schedules import AYS_NOISE_LEVELS
from lightning_jax.diffusion.schedules import AYS_TIMESTEPS
from lightning_jax.diffusion.schedules import ays_sigmas
from lightning_jax.diffusion.schedules import check_schedule
from lightning_jax.diffusion.schedules import exponential_sigmas
from lightning_jax.diffusion.schedules import karras_sigmas
from lightning_jax.diffusion.schedules import kl_optimal_sigmas
from lightning_jax.diffusion.schedules import loglinear_interp
from lightning_jax.diffusion.schedules import to_sampling_schedule
from lightning_jax.diffusion.schedules import vp_log_sigmas
from lightning_jax.diffusion.schedules import vp_sigmas
from lightning_jax.diffusion.schedules import vp_timesteps
from lightning_jax.diffusion.toy import gaussian
from lightning_jax.diffusion.toy import gaussian_mixture
from lightning_jax.diffusion.toy import GaussianMixture
from lightning_jax.diffusion.toy import grid_mixture
from lightning_jax.diffusion.toy import mixture_denoise
from lightning_jax.diffusion.toy import mixture_denoiser
from lightning_jax.diffusion.toy import mixture_log_prob
from lightning_jax.diffusion.toy import mixture_sample
from lightning_jax.diffusion.toy import ring_mixture
from lightning_jax.diffusion.toy import TOY_DENSITIES
from lightning_jax.diffusion.toy import toy_density
