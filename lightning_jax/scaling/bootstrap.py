"""Bootstrap confidence intervals of fitted loss-law coefficients."""

from typing import NamedTuple

import numpy as np

from lightning_jax import _checks
from lightning_jax.scaling import laws


class Bootstrap(NamedTuple):
  """What `bootstrap` returns.

  Attributes:
    estimate: `{name: value}`, the fit of all runs.
    samples: `{name: [num_samples]}`, the fit of each resample.
    intervals: `{name: (low, high)}`, percentile intervals at `level`.
  """

  estimate: dict
  samples: dict
  intervals: dict


def bootstrap(
  n_params,
  n_tokens,
  loss,
  form: str = "overtraining",
  num_samples: int = 200,
  level: float = 0.95,
  seed: int = 0,
) -> Bootstrap:
  """Percentile bootstrap of `laws.fit_loss_law` over runs.

  Each resample draws as many runs as there are, with replacement (a draw
  with fewer distinct (N, D) points than coefficients is drawn again), and
  is fitted from the all-runs fit as its single start: the grid search
  picks the basin once, each resample refines within it.

  Args:
    n_params, n_tokens, loss: `[runs]`, as `laws.fit_loss_law`.
    form: "overtraining" or "chinchilla".
    num_samples: resamples.
    level: coverage of the intervals, in (0, 1).
    seed: seed of the resampling.

  Returns:
    `Bootstrap(estimate, samples, intervals)`.

  Raises:
    ValueError: bad runs, form, `num_samples` or `level`.
  """
  names = laws.get_form(form).names
  n, d, loss = laws.check_runs(n_params, n_tokens, loss, len(names))
  num_samples = _checks.check_positive_int("num_samples", num_samples)
  if not 0 < level < 1:
    raise ValueError(f"`level` must be in (0, 1), got {level!r}.")
  estimate = laws.fit_loss_law(n, d, loss, form)
  rng = np.random.default_rng(seed)
  rows = []
  while len(rows) < num_samples:
    idx = rng.integers(0, n.size, n.size)
    if len(set(zip(n[idx], d[idx], strict=True))) < len(names):
      continue
    fit = laws.fit_loss_law(n[idx], d[idx], loss[idx], form, [estimate])
    rows.append([fit[k] for k in names])
  rows = np.array(rows)
  tail = 50 * (1 - level)
  low, high = np.percentile(rows, [tail, 100 - tail], axis=0)
  return Bootstrap(
    estimate=estimate,
    samples=dict(zip(names, rows.T, strict=True)),
    intervals={
      k: (float(lo), float(hi))
      for k, lo, hi in zip(names, low, high, strict=True)
    },
  )
