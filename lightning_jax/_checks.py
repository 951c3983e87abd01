"""Argument validation shared by every room: errors name the argument."""

from collections.abc import Sequence
import math

import numpy as np


def check_rank(name: str, x, rank: int, layout: str) -> None:
  """Raises ValueError unless `x` has `rank` dims (described by `layout`)."""
  if np.ndim(x) != rank:
    raise ValueError(
      f"`{name}` must have rank {rank} {layout}, got shape {np.shape(x)}."
    )


def check_shape(name: str, x, expected: Sequence[int], layout: str) -> None:
  """Raises ValueError unless `x.shape == expected` (described by `layout`)."""
  if tuple(np.shape(x)) != tuple(expected):
    raise ValueError(
      f"`{name}` must have shape {layout} = {tuple(expected)}, "
      f"got {tuple(np.shape(x))}."
    )


def check_positive_int(name: str, value) -> int:
  """Returns `value` as int, or raises ValueError if it is not an int >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)):
    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
  if isinstance(value, float) and (
    not math.isfinite(value) or value != int(value)
  ):
    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
  if int(value) < 1:
    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
  return int(value)


def check_choice(name: str, value, choices: Sequence[str]) -> None:
  """Raises ValueError unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
