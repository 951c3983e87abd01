"""Fits a loss law per architecture to the rows of a sweep; writes the
coefficient table (markdown) and loss-vs-compute plot (PNG).

  python -m tools.scaling --runs=/tmp/sweep/runs.jsonl --form=chinchilla

writes `<out_dir>/scaling_<form>.md` and `<out_dir>/scaling_<form>.png`
(`--out_dir` defaults to the directory of `--runs`). Each row of the
table is one architecture: the fitted coefficients with bootstrap
intervals, the compute-optimal tokens per parameter at the sweep's largest
compute and the RMS error of the fit. The plot draws loss against
C = 6 N D with one colour per architecture: the runs, the law at each
model size and the compute-optimal frontier (dashed). Rows come from
`tools/sweep.py` (fields arch, n_params, n_tokens and `--loss_key`).
Needs matplotlib (`pip install -e '.[plot]'`); bad flags or rows print
one `error:` line and exit with status 2.
"""

import json
import os

from absl import app
from absl import flags
import numpy as np

from lightning_jax import scaling
from tools import cli

_RUNS = flags.DEFINE_string("runs", None, "runs.jsonl of tools/sweep.py.")
_FORM = flags.DEFINE_enum(
  "form", "overtraining", list(scaling.FORMS), "Loss-law form."
)
_OUT_DIR = flags.DEFINE_string(
  "out_dir", None, "Output directory; default: that of --runs."
)
_LOSS_KEY = flags.DEFINE_string("loss_key", "val_loss", "Loss field of a row.")
_BOOTSTRAP = flags.DEFINE_integer(
  "bootstrap", 100, "Bootstrap resamples of the intervals; 0: none."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap.")
_PLOT = flags.DEFINE_bool("plot", True, "Also draw the PNG (matplotlib).")


def read_runs(path: str, loss_key: str) -> dict[str, dict[str, np.ndarray]]:
  """`{arch: {"n": [runs], "d": [runs], "loss": [runs]}}` from a JSONL.

  Raises:
    ValueError: a missing file, or a row without the fields.
  """
  if not os.path.exists(path):
    raise ValueError(f"--runs={path} does not exist.")
  by_arch: dict[str, list] = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      missing = {"arch", "n_params", "n_tokens", loss_key} - set(row)
      if missing:
        raise ValueError(
          f"--runs={path} line {number} lacks {sorted(missing)}."
        )
      by_arch.setdefault(row["arch"], []).append(
        (row["n_params"], row["n_tokens"], row[loss_key])
      )
  if not by_arch:
    raise ValueError(f"--runs={path} holds no rows.")
  return {
    arch: dict(
      zip(("n", "d", "loss"), np.array(rows, np.float64).T, strict=True)
    )
    for arch, rows in sorted(by_arch.items())
  }


def fit_all(runs: dict, form: str, samples: int, seed: int) -> dict:
  """`{arch: Bootstrap or the ValueError's message}` (too few runs, ...)."""
  fits = {}
  for arch, r in runs.items():
    try:
      if samples:
        fits[arch] = scaling.bootstrap(
          r["n"], r["d"], r["loss"], form, samples, seed=seed
        )
      else:
        estimate = scaling.fit_loss_law(r["n"], r["d"], r["loss"], form)
        fits[arch] = scaling.Bootstrap(estimate, {}, {})
    except ValueError as e:
      fits[arch] = str(e)
  return fits


def _cell(fit, name: str) -> str:
  value = f"{fit.estimate[name]:.4g}"
  if name in fit.intervals:
    low, high = fit.intervals[name]
    value += f" [{low:.3g}, {high:.3g}]"
  return value


def table(runs: dict, fits: dict, form: str) -> str:
  """The markdown table of the fits."""
  names = scaling.FORMS[form].names
  head = ["arch", "runs", *names, "M_opt at max C", "RMS error"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for arch, fit in fits.items():
    r = runs[arch]
    if isinstance(fit, str):
      cells = [f"not fitted: {fit}"] + [""] * (len(head) - 3)
    else:
      predicted = scaling.predict(fit.estimate, r["n"], r["d"])
      rms = float(np.sqrt(np.mean((predicted - r["loss"]) ** 2)))
      try:
        n_opt, d_opt = scaling.compute_optimal(
          fit.estimate, np.max(6 * r["n"] * r["d"])
        )
        m_opt = f"{d_opt / n_opt:.3g}"
      except ValueError:
        m_opt = "none (exponent <= 0)"
      cells = [_cell(fit, k) for k in names] + [m_opt, f"{rms:.4f}"]
    lines.append("| " + " | ".join([arch, str(r["n"].size), *cells]) + " |")
  return "\n".join(lines) + "\n"


def plot(runs: dict, fits: dict, path: str, loss_key: str) -> None:
  """Loss vs C = 6 N D: runs, the law per size, the frontier (dashed)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError("plots need matplotlib: pip install -e '.[plot]'") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (arch, r) in enumerate(runs.items()):
    color = f"C{i}"
    compute = 6 * r["n"] * r["d"]
    ax.scatter(compute, r["loss"], color=color, label=arch, zorder=3)
    fit = fits[arch]
    if isinstance(fit, str):
      continue
    grid = np.geomspace(compute.min() / 3, compute.max() * 3, 100)
    for n in np.unique(r["n"]):
      law = scaling.predict(fit.estimate, n, grid / (6 * n))
      ax.plot(grid, law, color=color, lw=0.8, alpha=0.6)
    try:
      n_opt, d_opt = scaling.compute_optimal(fit.estimate, grid)
    except ValueError:
      continue
    ax.plot(
      grid,
      scaling.predict(fit.estimate, n_opt, d_opt),
      color=color,
      lw=2,
      ls="--",
      label=f"{arch} compute-optimal",
    )
  ax.set_xscale("log")
  ax.set_xlabel("C = 6 N D (FLOPs)")
  ax.set_ylabel(loss_key)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  if not _RUNS.value:
    cli.fail("--runs (a runs.jsonl of tools/sweep.py) is required.")
  if _BOOTSTRAP.value < 0:
    cli.fail(f"--bootstrap must be >= 0, got {_BOOTSTRAP.value}.")
  out_dir = _OUT_DIR.value or os.path.dirname(os.path.abspath(_RUNS.value))
  stem = os.path.join(out_dir, f"scaling_{_FORM.value}")
  try:
    runs = read_runs(_RUNS.value, _LOSS_KEY.value)
    fits = fit_all(runs, _FORM.value, _BOOTSTRAP.value, _SEED.value)
    text = table(runs, fits, _FORM.value)
    os.makedirs(out_dir, exist_ok=True)
    with open(stem + ".md", "w", encoding="utf-8") as f:
      f.write(text)
    print(text + f"Wrote {stem}.md", flush=True)
    if _PLOT.value:
      plot(runs, fits, stem + ".png", _LOSS_KEY.value)
      print(f"Wrote {stem}.png", flush=True)
  except ValueError as e:
    cli.fail(e)


if __name__ == "__main__":
  app.run(main)
