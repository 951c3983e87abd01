"""Samples a toy density with a chosen sampler and schedule; saves PNGs.

  python -m tools.sample --density=ring --sampler=dpmpp_2m --schedule=ays \
      --ays_json=/tmp/ays_ring.json --num_steps=10 --output_dir=/tmp/sample

writes `scatter.png` (samples next to exact ones) and `schedules.png` (log
sigma against step for Karras, log-linear, KL-optimal and the chosen
schedule). Plotting needs matplotlib (`pip install -e .[plot]`).
"""

import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import diffusion

_SCHEDULES = [
  "karras",
  "loglinear",
  "kl_optimal",
  "ays",
  "ays_sd15",
  "ays_sdxl",
  "ays_svd",
]
_DENSITY = flags.DEFINE_enum(
  "density", "ring", list(diffusion.TOY_DENSITIES), "Toy density."
)
_SAMPLER = flags.DEFINE_enum(
  "sampler", "dpmpp_2m", list(diffusion.SAMPLERS), "Sampler."
)
_SCHEDULE = flags.DEFINE_enum(
  "schedule", "karras", _SCHEDULES, "Schedule; 'ays' reads --ays_json."
)
_AYS_JSON = flags.DEFINE_string(
  "ays_json", None, "Output of tools/ays.py (finest stage used)."
)
_NUM_STEPS = flags.DEFINE_integer("num_steps", 10, "Sampling steps.")
_SIGMA_MIN = flags.DEFINE_float("sigma_min", 0.002, "Smallest level.")
_SIGMA_MAX = flags.DEFINE_float("sigma_max", 80.0, "Largest level.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4096, "Samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_OUTPUT_DIR = flags.DEFINE_string(
  "output_dir", None, "Where PNGs go.", required=True
)


def _schedules(n, ays_levels):
  s_min, s_max = _SIGMA_MIN.value, _SIGMA_MAX.value
  out = {
    "karras": diffusion.karras_sigmas(n, s_min, s_max),
    "loglinear": diffusion.exponential_sigmas(n, s_min, s_max),
    "kl_optimal": diffusion.kl_optimal_sigmas(n, s_min, s_max),
  }
  if ays_levels is not None:
    out["ays"] = diffusion.to_sampling_schedule(ays_levels, n, final="append")
  for name in ("sd15", "sdxl", "svd"):
    out[f"ays_{name}"] = diffusion.ays_sigmas(name, n)
  return out


def _plot(samples, exact, scheds, chosen, output_dir):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
  for ax, pts, title in (
    (axes[0], exact, "exact"),
    (axes[1], samples, f"{_SAMPLER.value}, {chosen}, {_NUM_STEPS.value} steps"),
  ):
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
  lim = 1.5 * float(np.max(np.abs(exact)))
  axes[0].set_xlim(-lim, lim)
  axes[0].set_ylim(-lim, lim)
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "scatter.png"), dpi=80)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, s in scheds.items():
    if name.startswith("ays_") and name != chosen:
      continue
    ax.plot(
      np.arange(len(s) - 1),
      np.log(s[:-1]),
      marker="o",
      ms=3,
      label=name,
      lw=2.5 if name == chosen else 1,
    )
  ax.set_xlabel("step")
  ax.set_ylabel("log sigma")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "schedules.png"), dpi=80)
  plt.close(fig)


def main(argv):
  del argv
  if _NUM_STEPS.value < 1 or _NUM_SAMPLES.value < 1:
    raise app.UsageError("--num_steps and --num_samples must be >= 1.")
  if (_SCHEDULE.value == "ays") != (_AYS_JSON.value is not None):
    raise app.UsageError("--ays_json goes with (and only with) --schedule=ays.")
  ays_levels = None
  if _AYS_JSON.value:
    with open(_AYS_JSON.value) as f:
      ays_levels = np.asarray(json.load(f)["stages"][-1]["levels"])
  scheds = _schedules(_NUM_STEPS.value, ays_levels)
  sigmas = scheds[_SCHEDULE.value]
  mix = diffusion.toy_density(_DENSITY.value)
  k_data, k_noise, k_sde = jax.random.split(jax.random.key(_SEED.value), 3)
  exact = diffusion.mixture_sample(mix, k_data, _NUM_SAMPLES.value)
  x = float(sigmas[0]) * jax.random.normal(k_noise, exact.shape)
  sampler = diffusion.SAMPLERS[_SAMPLER.value]
  samples = jax.jit(
    lambda x, s: sampler(diffusion.mixture_denoiser(mix), x, s, key=k_sde)
  )(x, jnp.asarray(sigmas, jnp.float32))
  gap = float(
    jnp.mean(diffusion.mixture_log_prob(mix, exact))
    - jnp.mean(diffusion.mixture_log_prob(mix, samples))
  )
  print(
    f"{_SAMPLER.value} / {_SCHEDULE.value} / {_NUM_STEPS.value} steps: "
    f"log-likelihood gap {gap:.4f}"
  )
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  _plot(
    np.asarray(samples),
    np.asarray(exact),
    scheds,
    _SCHEDULE.value,
    _OUTPUT_DIR.value,
  )


if __name__ == "__main__":
  app.run(main)
