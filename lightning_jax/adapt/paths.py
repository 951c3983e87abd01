"""Which leaves of a params tree a transform touches, and their matrix view.

A leaf is named by its path, `"/".join(parallel.sharding.path_names(path))`,
e.g. `"layers/0/mixer/wq"` or, pipelined, `"stages/0/mixer/wq"`. Patterns
are regular expressions matched against the whole name (`re.fullmatch`).

The matrix view of a weight `x @ W` comes from the partition rules' logical
dim names (`parallel.sharding.match_rule`, the one place that names dims):
dims stacked in front of the rule (pipeline `[repeats, stages]`, scanned
layers) and a leading `experts` dim are batch dims (one matrix each); of the
rest, a weight whose last dim is `embed` writes the residual stream (all
other dims are its input, e.g. `wo [H, Dh, D]`), any other reads it (its
first dim is the input, e.g. `wq [D, H, Dh]`). A leaf without a rule is
`[*batch, in, out]`.
"""

import re
from typing import NamedTuple

import jax
import numpy as np

from lightning_jax.adapt.nf4 import NF4Tensor
from lightning_jax.parallel import sharding

# Patterns of the presets' projections (any mixer's w*, in_proj, out_proj)
# and MLP / expert matrices.
MIXER = r".*mixer/(w[a-z_]*|in_proj|out_proj)"
ATTENTION = r".*mixer/w[qkvo]"
MLP = r".*ffn/(experts/)?w_(gate|up|down)"


class MatrixView(NamedTuple):
  """A leaf `[*shape[:batch], *in (fan_in dims), *out]` as matrices.

  Attributes:
    batch: leading dims that index separate matrices.
    fan_in: dims after them that form the matrix's input.
  """

  batch: int
  fan_in: int


def check_targets(targets) -> tuple[str, ...]:
  """`targets` as a tuple; ValueError unless a non-empty sequence of
  patterns (a single string is an error: it would iterate characters)."""
  if isinstance(targets, str) or not targets:
    raise ValueError(
      f"`targets` must be a non-empty tuple of patterns, got {targets!r}."
    )
  return tuple(targets)


def is_nf4(x) -> bool:
  return isinstance(x, NF4Tensor)


def shape_of(x) -> tuple[int, ...]:
  """The shape of an array, `ShapeDtypeStruct` or `NF4Tensor` (its tensor's)."""
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def named_leaves(params) -> dict:
  """`{name: leaf}` in tree order, an `NF4Tensor` counting as one leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_nf4)
  return {path_name(p): x for p, x in flat}


def leaf_names(params) -> list[tuple[str, tuple[int, ...]]]:
  """`(name, shape)` of every leaf, an `NF4Tensor` counting as one."""
  return [(n, shape_of(x)) for n, x in named_leaves(params).items()]


def path_name(path) -> str:
  return "/".join(sharding.path_names(path))


def matrix_view(name: str, shape) -> MatrixView:
  """The matrix view of leaf `name` of `shape` (see the module docstring).

  Raises:
    ValueError: fewer than two matrix dims (a vector, a scalar).

  Example:
    >>> matrix_view("stages/0/mixer/wo", (1, 2, 4, 32, 128))
    MatrixView(batch=2, fan_in=2)
  """
  _, logical = sharding.match_rule(tuple(name.split("/")))
  if logical is None or len(logical) > len(shape):
    logical = (None,) * min(len(shape), 2)
  batch = len(shape) - len(logical)
  while logical and logical[0] == "experts":
    batch, logical = batch + 1, logical[1:]
  if len(logical) < 2:
    raise ValueError(
      f"leaf {name!r} of shape {tuple(shape)} is not a matrix (its own "
      f"dims are {logical}); target weights only."
    )
  fan_in = len(logical) - 1 if logical[-1] == "embed" else 1
  return MatrixView(batch, fan_in)


def split_shape(shape, view: MatrixView):
  """`(batch dims, in dims, out dims)` of a leaf shape under `view`."""
  shape = tuple(shape)
  lead = view.batch + view.fan_in
  return shape[: view.batch], shape[view.batch : lead], shape[lead:]


def merged_axes(axes, size: int, axis_sizes: dict):
  """The mesh axes of a dim of `size` that merges dims (row-major) split
  over `axes` (their PartitionSpec entries): the first dim's axes when the
  other dims are whole and their mesh size divides `size` (then its shards
  are the first dim's), else None (replicated).

  Example:
    >>> merged_axes(("tensor", None), 4 * 16, {"tensor": 2})  # [H, Dh]
    'tensor'
  """
  first = axes[0] if axes else None
  count = int(
    np.prod([axis_sizes.get(a, 1) for a in np.atleast_1d(first or [])])
  )
  whole = all(a is None for a in axes[1:])
  return first if whole and size % count == 0 else None


def match(params, patterns, what: str) -> tuple[str, ...]:
  """Names of the matrix leaves matched by any of `patterns`, tree order.

  Args:
    params: a params tree (arrays, `ShapeDtypeStruct`s or `NF4Tensor`s).
    patterns: regular expressions, each matched to whole leaf names.
    what: the argument's name, for errors (e.g. "LoraConfig.targets").

  Raises:
    ValueError: a pattern that matches nothing (listing the matrix leaves),
      an invalid pattern, or a match that is not a matrix.
  """
  leaves = leaf_names(params)
  chosen = set()
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as err:
      raise ValueError(
        f"`{what}` has a bad pattern {pattern!r}: {err}"
      ) from err
    hits = [n for n, _ in leaves if regex.fullmatch(n)]
    if not hits:
      available = [n for n, s in leaves if len(s) >= 2]
      raise ValueError(
        f"`{what}` pattern {pattern!r} matches no leaf; leaves with >= 2 "
        f"dims: {available}."
      )
    chosen.update(hits)
  for name, shape in leaves:
    if name in chosen:
      matrix_view(name, shape)
  return tuple(n for n, _ in leaves if n in chosen)
