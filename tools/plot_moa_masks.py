"""Draws MoA head masks (one PNG per head pattern) with the visited blocks.

Needs the `plot` extra (matplotlib), imported only when drawing.

  python -m tools.plot_moa_masks --out_dir=docs/moa
"""

from collections.abc import Sequence
import pathlib

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

from lightning_jax import ops

_OUT_DIR = flags.DEFINE_string("out_dir", "docs/moa", "Output directory.")
_SEQ = flags.DEFINE_integer("seq", 64, "Sequence length drawn.")
_BLOCK = flags.DEFINE_integer("block", 8, "Block size drawn.")

# name -> (alpha, beta, sink): the head patterns MoA mixes.
PATTERNS = {
  "dense": (0.0, 1.0, 0),
  "local_window": (12.0, 0.0, 0),
  "window_and_sink": (12.0, 0.0, 4),
  "elastic": (4.0, 0.25, 4),
}


def draw_mask(
  path: pathlib.Path, window: int, seq: int, block: int, sink: int, title: str
) -> None:
  """Saves the mask (kept pairs dark) and shades the blocks visited."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  mask = np.asarray(ops.moa_mask(jnp.asarray([window]), seq, sink))[0]
  n = -(-seq // block)
  visited = (
    np.pad(mask, ((0, n * block - seq),) * 2)
    .reshape(n, block, n, block)
    .any((1, 3))
  )
  image = np.kron(visited, np.ones((block, block)))[:seq, :seq] * 0.25
  image = np.maximum(image, mask.astype(float))
  fig, ax = plt.subplots(figsize=(2.6, 2.8), dpi=80)
  ax.imshow(image, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
  ax.set_xticks(np.arange(-0.5, seq, block), minor=False)
  ax.set_yticks(np.arange(-0.5, seq, block), minor=False)
  ax.set_xticklabels([])
  ax.set_yticklabels([])
  ax.grid(color="tab:blue", linewidth=0.4)
  ax.set_xlabel("key s")
  ax.set_ylabel("query t")
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _SEQ.value < 1 or _BLOCK.value < 1:
    raise app.UsageError("--seq and --block must be >= 1.")
  out_dir = pathlib.Path(_OUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  for name, (alpha, beta, sink) in PATTERNS.items():
    window = int(ops.moa_windows([alpha], [beta], _SEQ.value)[0])
    density = ops.moa_density([window], _SEQ.value, sink)[0]
    title = (
      f"{name}: a={alpha:g} b={beta:g} sink={sink}\n"
      f"N={_SEQ.value}: window {window}, density {density:.0%}"
    )
    draw_mask(
      out_dir / f"{name}.png", window, _SEQ.value, _BLOCK.value, sink, title
    )
    print(out_dir / f"{name}.png")


if __name__ == "__main__":
  app.run(main)
