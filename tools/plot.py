"""Draws the loss curve of a run from its `metrics.jsonl`.

  python -m tools.plot --workdir=/tmp/lightning_jax/tiny-hybrid

writes `<workdir>/loss.png` (or `--output`): training loss (and the
cross-entropy part when auxiliary MoE losses are present) against step, with
the learning rate on a second axis. Several `--workdir`s are overlaid.
Needs matplotlib (`pip install -e '.[plot]'`).
"""

import json
import os

from absl import app
from absl import flags

from lightning_jax.training import metrics as metrics_lib

_WORKDIR = flags.DEFINE_multi_string(
  "workdir",
  None,
  "Run directory holding metrics.jsonl; repeatable.",
  required=True,
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "PNG path; default <first workdir>/loss.png."
)
_LOG_Y = flags.DEFINE_bool("log_y", False, "Logarithmic loss axis.")


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl`; a resumed run's repeated steps keep
  their last value, sorted by step."""
  rows = {}
  with open(
    os.path.join(workdir, metrics_lib.METRICS_FILE), encoding="utf-8"
  ) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows[row["step"]] = row
  return [rows[s] for s in sorted(rows)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(6, 4))
  lr_ax = ax.twinx()
  for workdir in _WORKDIR.value:
    rows = read_metrics(workdir)
    steps = [r["step"] for r in rows]
    name = os.path.basename(os.path.normpath(workdir))
    (line,) = ax.plot(steps, [r["loss"] for r in rows], label=f"{name} loss")
    if any(r.get("lbl_loss", 0) or r.get("z_loss", 0) for r in rows):
      ax.plot(
        steps,
        [r["ce_loss"] for r in rows],
        ls="--",
        color=line.get_color(),
        label=f"{name} cross-entropy",
      )
    lr_ax.plot(
      steps, [r["lr"] for r in rows], color=line.get_color(), alpha=0.3, lw=1
    )
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  lr_ax.set_ylabel("learning rate (faint)")
  if _LOG_Y.value:
    ax.set_yscale("log")
  ax.legend(fontsize=8)
  fig.tight_layout()
  output = _OUTPUT.value or os.path.join(_WORKDIR.value[0], "loss.png")
  fig.savefig(output, dpi=100)
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
