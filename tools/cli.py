"""What a binary in tools/ does with bad input: one `error:` line, exit 2.

Flags and files are checked before anything compiles; library errors
(`ValueError`, an unreadable checkpoint) become the same one line instead
of a traceback.
"""

import math
import os
import sys

from absl import flags
import jax

from lightning_jax import training

# Errors that mean "bad input" rather than a bug: reported as one line.
INPUT_ERRORS = (ValueError, OSError, training.CheckpointError)


def fail(message, status: int = 2):
  """Prints `error: <first line of message>` to stderr and exits."""
  lines = str(message).splitlines() or [""]
  print(f"error: {lines[0]}", file=sys.stderr)
  sys.exit(status)


def check_workdir(path: str) -> None:
  """Raises ValueError unless `path` is an existing directory."""
  if not os.path.exists(path):
    raise ValueError(f"--workdir {path} does not exist.")
  if not os.path.isdir(path):
    raise ValueError(f"--workdir {path} is not a directory.")


def parse_numbers(flag: str, items, kind, low, high=math.inf) -> list:
  """Comma-list flag values as `kind` numbers in `[low, high]`.

  Raises:
    ValueError: naming `--flag`, on an empty list, an empty item, a value
      that is not a finite `kind` or one outside the range.
  """
  if not items:
    raise ValueError(f"--{flag} must not be empty.")
  values = []
  for item in items:
    try:
      value = kind(item)
    except ValueError:
      value = None
    if value is None or not math.isfinite(value) or not low <= value <= high:
      raise ValueError(
        f"--{flag} must be a comma-separated list of {kind.__name__}s in "
        f"[{low}, {high}], got {item!r} in {','.join(items)!r}."
      )
    values.append(value)
  return values


def parse_size(size: str, head_dim: int) -> dict[str, str]:
  """A `--sizes` entry `"<d_model>x<layers>"` -> tools/train overrides.

  The heads keep the preset's `head_dim` (d_model / head_dim of them) and
  d_ff = 3 d_model, the presets' ratio: `"64x2"` with head_dim 32 ->
  `{"d_model": "64", "num_layers": "2", "num_heads": "2", "d_ff": "192"}`.

  Raises:
    ValueError: naming `--sizes`, on a malformed entry or a d_model that is
      not a positive multiple of `head_dim`.
  """
  width, x, layers = size.partition("x")
  if not (x and width.isdigit() and layers.isdigit() and int(layers) > 0):
    raise ValueError(f"--sizes entries must be `<d_model>x<layers>`: {size!r}.")
  if int(width) % head_dim or not int(width):
    raise ValueError(
      f"--sizes: d_model {width} must be a positive multiple of the "
      f"preset's head_dim {head_dim} ({size!r})."
    )
  return {
    "d_model": width,
    "num_layers": layers,
    "num_heads": str(int(width) // head_dim),
    "d_ff": str(3 * int(width)),
  }


def resume_from_workdir(
  workdir: str,
  resumed,
  frozen,
  *,
  growing=frozenset({"steps"}),
  allow_change: bool = False,
) -> None:
  """Fills the absl flags not given from `<workdir>/config.json`, if any.

  Args:
    workdir: the run directory.
    resumed: names of the flags a rerun takes from the workdir.
    frozen: those of them that change what is trained.
    growing: frozen numeric flags that may grow (`training.resume_flags`).
    allow_change: accept changes of frozen flags.

  Raises:
    ValueError: a frozen flag given with another value than the saved one.
    training.WorkdirError: config.json is unreadable, or another run holds
      the workdir.
  """
  record = training.read_run_config(workdir)
  if record is None:
    return
  if jax.process_index() == 0:  # the lock's holder; a live run: say so first
    with training.lock_workdir(workdir):
      pass
  saved = {k: v for k, v in record["flags"].items() if k in resumed}
  explicit = {name for name in resumed if flags.FLAGS[name].present}
  values = training.resume_flags(
    saved,
    {name: flags.FLAGS[name].value for name in resumed},
    explicit,
    frozen=frozen,
    growing=growing,
    allow_change=allow_change,
  )
  for name, value in values.items():
    if name not in explicit:
      flags.FLAGS[name].value = value
