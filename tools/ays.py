"""Align Your Steps: optimise a schedule, or compare schedules on toy data.

# Optimise for a toy density (or `--denoiser=pkg.mod:fn --data=pkg.mod:fn`)
# and write the levels of every coarse-to-fine stage as JSON:
python -m tools.ays --density=ring --output=/tmp/ays_ring.json
# Reproduction table of docs/diffusion.md:
python -m tools.ays --mode=compare --density=ring
"""

import functools
import importlib
import json

from absl import app
from absl import flags
import jax
import numpy as np

from lightning_jax import diffusion
from tools import benchlib

_MODE = flags.DEFINE_enum(
  "mode",
  "optimize",
  ["optimize", "compare"],
  "optimize: write JSON; compare: print the table.",
)
_DENSITY = flags.DEFINE_enum(
  "density",
  "ring",
  list(diffusion.TOY_DENSITIES),
  "Toy density (ignored with --denoiser).",
)
_DENOISER = flags.DEFINE_string(
  "denoiser",
  None,
  "module:function returning denoiser(x, sigma); needs "
  "--data (optimize mode only).",
)
_DATA = flags.DEFINE_string(
  "data", None, "module:function returning data_sampler(key, num)."
)
_NUM_STEPS = flags.DEFINE_integer(
  "num_steps", 10, "Intervals of the first (coarse) stage."
)
_REFINEMENTS = flags.DEFINE_integer(
  "num_refinements", 2, "Subdivide-and-refine stages."
)
_SIGMA_MIN = flags.DEFINE_float("sigma_min", 0.002, "Smallest level.")
_SIGMA_MAX = flags.DEFINE_float("sigma_max", 80.0, "Largest level.")
_INIT = flags.DEFINE_enum(
  "init", "karras", ["karras", "exponential"], "Initial schedule."
)
_NUM_SAMPLES = flags.DEFINE_integer(
  "num_samples", 4096, "Monte-Carlo samples of the KLUB."
)
_CANDIDATES = flags.DEFINE_integer(
  "num_candidates", 16, "Candidates per grid in each update."
)
_MAX_SWEEPS = flags.DEFINE_integer("max_sweeps", 30, "Sweeps per stage.")
_EARLY_STOP = flags.DEFINE_string(
  "early_stop",
  "euler_ancestral",
  "Sampler whose sample quality (SW2 on "
  "validation draws) early-stops stage 0 (toy densities only); '' for none.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random draw.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output path.")
_STEPS = flags.DEFINE_list("steps", ["5", "10", "20"], "Compare: step counts.")
_SAMPLERS = flags.DEFINE_list(
  "samplers", ["euler", "heun", "dpmpp_2m"], "Compare: samplers."
)
_EVAL_SEEDS = flags.DEFINE_integer("eval_seeds", 4, "Compare: seeds.")
_EVAL_SAMPLES = flags.DEFINE_integer(
  "eval_samples", 4096, "Compare: samples per seed."
)


def _load(spec: str):
  module, _, name = spec.partition(":")
  return getattr(importlib.import_module(module), name)()


def _validate() -> None:
  if (_DENOISER.value is None) != (_DATA.value is None):
    raise app.UsageError("--denoiser and --data go together.")
  if _DENOISER.value and _MODE.value == "compare":
    raise app.UsageError("--mode=compare needs a toy --density.")
  if _EARLY_STOP.value and _EARLY_STOP.value not in diffusion.SAMPLERS:
    raise app.UsageError(
      f"--early_stop must be one of {list(diffusion.SAMPLERS)} or ''."
    )
  for name in _SAMPLERS.value:
    if name not in diffusion.SAMPLERS:
      raise app.UsageError(f"--samplers: unknown {name!r}.")
  if any(not s.isdigit() or int(s) < 2 for s in _STEPS.value):
    raise app.UsageError("--steps must be integers >= 2.")
  if not 0 < _SIGMA_MIN.value < _SIGMA_MAX.value:
    raise app.UsageError("need 0 < --sigma_min < --sigma_max.")
  if _NUM_STEPS.value < 2:
    raise app.UsageError("--num_steps must be >= 2.")


def _optimize(mix):
  """Runs AYS; returns the `AYSResult`."""
  key = jax.random.key(_SEED.value)
  if _DENOISER.value:
    denoiser, data = _load(_DENOISER.value), _load(_DATA.value)
    validation = None
  else:
    denoiser = diffusion.mixture_denoiser(mix)
    data = functools.partial(diffusion.mixture_sample, mix)
    validation = (
      diffusion.sample_quality_fn(mix, _EARLY_STOP.value)
      if _EARLY_STOP.value
      else None
    )
  klub = diffusion.klub_estimator(
    denoiser, data, key, num_samples=_NUM_SAMPLES.value
  )
  init_fn = {
    "karras": diffusion.karras_sigmas,
    "exponential": diffusion.exponential_sigmas,
  }[_INIT.value]
  init = init_fn(_NUM_STEPS.value + 1, _SIGMA_MIN.value, _SIGMA_MAX.value)
  return diffusion.align_your_steps(
    klub,
    init[:-1],
    num_refinements=_REFINEMENTS.value,
    validation_fn=validation,
    num_candidates=_CANDIDATES.value,
    max_sweeps=_MAX_SWEEPS.value,
  )


def main(argv):
  del argv
  _validate()
  mix = None if _DENOISER.value else diffusion.toy_density(_DENSITY.value)
  result = _optimize(mix)
  out = {
    "density": _DENOISER.value or _DENSITY.value,
    "seed": _SEED.value,
    "stages": [
      {
        "levels": lv.tolist(),
        "klub": st.costs,
        "validation": st.validation,
        "sweeps": st.sweeps,
      }
      for lv, st in zip(result.levels, result.stages, strict=True)
    ],
  }
  if _MODE.value == "compare":
    s_min, s_max = _SIGMA_MIN.value, _SIGMA_MAX.value
    rows = []
    for n in map(int, _STEPS.value):
      scheds = {
        "ays": diffusion.to_sampling_schedule(
          result.levels[-1], n, final="append"
        ),
        "karras": diffusion.karras_sigmas(n, s_min, s_max),
        "loglinear": diffusion.exponential_sigmas(n, s_min, s_max),
      }
      rows += [
        r
        for r in diffusion.compare_schedules(
          mix,
          scheds,
          _SAMPLERS.value,
          seeds=tuple(range(_EVAL_SEEDS.value)),
          num_samples=_EVAL_SAMPLES.value,
        )
        if r["sampler"] != "exact" or n == int(_STEPS.value[0])
      ]
    rows.sort(
      key=lambda r: (
        r["sampler"] != "exact",
        r["sampler"],
        r["steps"],
        r["schedule"],
      )
    )
    out["compare"] = rows
    print(benchlib.markdown_table(rows))
  print("AYS levels (finest stage):", np.round(result.levels[-1], 4).tolist())
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
