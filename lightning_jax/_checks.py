"""Argument validation shared by every room: errors name the argument."""

from collections.abc import Sequence
import math

import jax
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


def concrete(x) -> np.ndarray | None:
  """`x` as a numpy array, or None if it is traced (inside `jit`)."""
  try:
    return np.asarray(x)
  except (
    jax.errors.TracerArrayConversionError,
    jax.errors.ConcretizationTypeError,
  ):
    return None


def check_ids(name: str, ids, num: int, what: str) -> None:
  """Raises ValueError if a concrete `ids` has an entry outside `[0, num)`.

  Traced values (inside `jit`) cannot be inspected and pass unchecked.
  """
  values = concrete(ids)
  if values is None:
    return
  bad = (values < 0) | (values >= num)
  if bad.any():
    raise ValueError(
      f"`{name}` must hold {what} in [0, {num}): {int(bad.sum())} of "
      f"{values.size} are outside, e.g. {values[bad][0]}."
    )
