"""Draws pipeline timelines (one PNG per schedule) from the executed tick
tables.

Each cell is (tick, stage); its colour and label name the microbatch (and
repeat, `m.r`). 1F1B ticks are split: forward on top, backward (hatched)
below. GPipe / circular backward passes are the reverse-mode transpose of the
forward scan, drawn mirrored after it. Needs matplotlib.

  python -m tools.plot_pipeline --out_dir=docs/pipeline
"""

from collections.abc import Sequence
import pathlib

from absl import app
from absl import flags
import numpy as np

from lightning_jax.parallel import schedules

_OUT_DIR = flags.DEFINE_string("out_dir", "docs/pipeline", "Output directory.")
_STAGES = flags.DEFINE_integer("num_stages", 4, "Pipeline stages S.")
_MICROBATCHES = flags.DEFINE_integer("num_microbatches", 8, "Microbatches M.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Circular repeats R.")


def _lanes(table: schedules.TickTable):
  """Rows of (label, microbatch [ticks, S], repeat [ticks, S]) to draw."""
  if table.schedule == "1f1b":
    return [
      ("forward", table.fwd_microbatch, table.fwd_repeat),
      ("backward", table.bwd_microbatch, table.bwd_repeat),
    ]
  # Autodiff runs the scan's ticks in reverse: the mirrored table.
  return [
    ("forward", table.fwd_microbatch, table.fwd_repeat),
    (
      "backward (transposed scan)",
      table.fwd_microbatch[::-1],
      table.fwd_repeat[::-1],
    ),
  ]


def draw_timeline(path: pathlib.Path, table: schedules.TickTable) -> None:
  """Saves the timeline of `table`."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  from matplotlib import patches  # pylint: disable=import-outside-toplevel
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  num_stages, ticks = table.num_stages, table.num_ticks
  colours = plt.get_cmap("tab20")
  lanes = _lanes(table)
  split = table.schedule == "1f1b"
  width = ticks if split else 2 * ticks
  fig, ax = plt.subplots(
    figsize=(max(6.0, 0.42 * width + 1.5), 0.5 * num_stages + 1.3), dpi=100
  )
  for lane, (name, mb, rep) in enumerate(lanes):
    for t in range(ticks):
      for s in range(num_stages):
        m = mb[t, s]
        if m < 0:
          continue
        x = t if split else t + lane * ticks
        y, h = (s + 0.5 * lane, 0.5) if split else (s, 1.0)
        backward = name.startswith("backward")
        ax.add_patch(
          patches.Rectangle(
            (x, y),
            1,
            h,
            facecolor=colours(m % 20),
            edgecolor="black",
            linewidth=0.5,
            hatch="///" if backward else None,
            alpha=0.6 if backward else 1.0,
          )
        )
        label = f"{m}" if table.repeats == 1 else f"{m}.{rep[t, s]}"
        ax.text(
          x + 0.5,
          y + h / 2,
          label,
          ha="center",
          va="center",
          fontsize=7 if split else 8,
        )
  if not split:
    ax.axvline(ticks, color="black", linewidth=1.5)
  ax.set_xlim(0, width)
  ax.set_ylim(num_stages, 0)
  ax.set_yticks(np.arange(num_stages) + 0.5)
  ax.set_yticklabels([f"stage {s}" for s in range(num_stages)])
  ax.set_xlabel("tick" + ("" if split else " (forward | backward)"))
  repeats = f", R={table.repeats}" if table.repeats > 1 else ""
  ax.set_title(
    f"{table.schedule}: S={num_stages}, M={table.num_microbatches}{repeats}"
    f", bubble {table.bubble_fraction:.3f} = (S-1)/(RM+S-1)"
    + ("  (top: forward, hatched: backward)" if split else ""),
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  out = pathlib.Path(_OUT_DIR.value)
  out.mkdir(parents=True, exist_ok=True)
  s, m = _STAGES.value, _MICROBATCHES.value
  for schedule, repeats in (
    ("gpipe", 1),
    ("circular", _REPEATS.value),
    ("1f1b", 1),
  ):
    table = schedules.tick_table(schedule, s, m, repeats)
    path = out / f"{schedule}.png"
    draw_timeline(path, table)
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
