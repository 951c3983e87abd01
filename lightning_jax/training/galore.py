"""GaLore: the inner optimiser runs on a low-rank projection of each matrix's
gradient (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", arXiv 2403.03507, Algorithm 1).

For a gradient `G: [m, n]` with `m <= n`, every `update_gap` steps (from step
0) the projector `P = U[:, :r]` is re-chosen from `G = U S V^T`; each step
the inner optimiser (Adam by default) sees `R = P^T G: [r, n]` and the update
is `scale * P N` for its output `N: [r, n]`. With `m > n` the same is done to
`G^T`: `Q = V[:, :r]`, `R = G Q: [m, r]`, update `scale * N Q^T`. The
projector is always on the smaller side, as in the paper (Algorithm 1 takes
`m <= n` and a left projector) and its reference code (galore-torch,
`proj_type="std"`); optax's `contrib.galore` projects the larger side. The
inner optimiser's moments live in the projected space and carry over when
the projector changes, as in the paper; so that the update after a refresh
is defined, each singular vector's sign is fixed (`canonical_signs`).

A leaf is a stack of matrices (`MatrixAxes`): its leading axes index the
matrices (experts, pipeline `[repeats, stages]`), each projected on its own.
A matrix whose smaller side is <= `rank` is not projected (the inner
optimiser sees its gradient): that saves no memory, and a full-rank rotation
would still change Adam's element-wise update.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lightning_jax import _checks
from lightning_jax.parallel import pipeline
from lightning_jax.parallel import sharding

EXPERTS = "experts"  # the logical name of a leading MoE expert axis
EMBED = "embed"


class MatrixAxes(NamedTuple):
  """Which axes of a leaf form its matrices.

  Attributes:
    batch: axes `[0, batch)` index the matrices (one projector each).
    split: rows are the axes `[batch, split)`, columns `[split, ndim)`.
  """

  batch: int
  split: int


def matrix_axes(path, leaf) -> MatrixAxes | None:
  """The default choice of projected leaves and their matrix axes.

  A leaf is a matrix when its own rank (without the pipeline's `[repeats,
  stages]` axes and a leading MoE `experts` axis, named by the partition
  rules, `parallel.sharding.logical_names`) is 2; a higher-rank linear map
  whose first (last) own dim is the model width `embed` is the matrix
  `embed x rest` (`rest x embed`), e.g. attention `wq: [D, H, Dh]` as `[D,
  H * Dh]` and `wo: [H, Dh, D]` as `[H * Dh, D]`. Vectors, convolution
  kernels and the like are not projected.

  Args:
    path: the leaf's `jax.tree_util` key path.
    leaf: the array (or `ShapeDtypeStruct`).

  Returns:
    `MatrixAxes`, or None for a leaf that is not projected.

  Example:
    >>> matrix_axes((jax.tree_util.DictKey("w_up"),), jnp.ones((2, 8, 16)))
    MatrixAxes(batch=1, split=2)
  """
  ndim = len(leaf.shape)
  own = sharding.logical_names(path)
  if own is None or len(own) > ndim:
    own = (None,) * pipeline.own_ndim(path, leaf)
  batch = ndim - len(own)
  while own and own[0] == EXPERTS:
    batch, own = batch + 1, own[1:]
  if len(own) == 2 or (len(own) > 2 and own[0] == EMBED):
    return MatrixAxes(batch, batch + 1)
  if len(own) > 2 and own[-1] == EMBED:
    return MatrixAxes(batch, ndim - 1)
  return None


class _Plan(NamedTuple):
  """How one leaf of `shape` is projected: its `MatrixAxes`, rank `r`.

  The projector and the projected gradient keep the leaf's rank (the axes
  that `r` replaces become `r, 1, ..., 1`), so the partition rules and the
  pipeline's stacking treat them like the leaf.
  """

  shape: tuple[int, ...]
  axes: MatrixAxes
  r: int

  @property
  def m(self) -> int:
    return math.prod(self.shape[self.axes.batch : self.axes.split])

  @property
  def n(self) -> int:
    return math.prod(self.shape[self.axes.split :])

  @property
  def left(self) -> bool:
    """`P^T G` (`m <= n`) rather than `G Q`."""
    return self.m <= self.n

  def _rows_to_r(self) -> tuple[int, ...]:
    """`[*batch, r, n]` in the leaf's rank."""
    batch, split = self.axes
    pad = (1,) * (split - batch - 1)
    return (*self.shape[:batch], self.r, *pad, *self.shape[split:])

  def _cols_to_r(self) -> tuple[int, ...]:
    """`[*batch, m, r]` in the leaf's rank."""
    pad = (1,) * (len(self.shape) - self.axes.split - 1)
    return (*self.shape[: self.axes.split], self.r, *pad)

  @property
  def projector_shape(self) -> tuple[int, ...]:
    """`P: [*batch, m, r]` (left) or `Q^T: [*batch, r, n]` (right)."""
    return self._cols_to_r() if self.left else self._rows_to_r()

  @property
  def projected_shape(self) -> tuple[int, ...]:
    """`R: [*batch, r, n]` (left) or `[*batch, m, r]` (right)."""
    return self._rows_to_r() if self.left else self._cols_to_r()

  def matrices(self, x, rows: int, cols: int):
    """`x` as `[*batch, rows, cols]`."""
    return x.reshape(*self.shape[: self.axes.batch], rows, cols)


def _plan(axes: MatrixAxes | None, shape, rank: int) -> _Plan | None:
  if axes is None:
    return None
  plan = _Plan(tuple(shape), axes, rank)
  return None if min(plan.m, plan.n) <= rank else plan


def _refresh(g, plan: _Plan):
  """The projector of gradient `g` (leaf shape): `U[:, :r]` (left) or
  `V[:, :r]^T` (right) of each matrix, signs fixed by `canonical_signs`."""
  wide = jnp.promote_types(g.dtype, jnp.float32)
  u, _, vh = jnp.linalg.svd(
    plan.matrices(g, plan.m, plan.n).astype(wide), full_matrices=False
  )
  vectors = u if plan.left else jnp.swapaxes(vh, -1, -2)
  vectors = canonical_signs(vectors[..., : plan.r])
  if not plan.left:
    vectors = jnp.swapaxes(vectors, -1, -2)
  return vectors.reshape(plan.projector_shape).astype(g.dtype)


def canonical_signs(vectors):
  """`vectors: [..., k, r]` with each column's largest-magnitude entry made
  positive.

  A singular vector is defined up to its sign, and the Adam moments carry
  over a projector refresh, so the sign changes the update after it: fixed
  this way, it does not depend on the SVD routine, the backend or the mesh.
  """
  rows = jnp.argmax(jnp.abs(vectors), axis=-2, keepdims=True)
  signs = jnp.sign(jnp.take_along_axis(vectors, rows, axis=-2))
  return vectors * jnp.where(signs == 0, 1, signs)


def _project(g, p, plan: _Plan):
  """`R = P^T G` or `G Q`, shaped `plan.projected_shape`."""
  m, n, r = plan.m, plan.n, plan.r
  g = plan.matrices(g, m, n)
  if plan.left:
    out = jnp.swapaxes(plan.matrices(p, m, r), -1, -2) @ g
  else:
    out = g @ jnp.swapaxes(plan.matrices(p, r, n), -1, -2)
  return out.reshape(plan.projected_shape)


def _project_back(x, p, plan: _Plan):
  """`P N` or `N Q^T` of the inner update `x`, shaped like the leaf."""
  m, n, r = plan.m, plan.n, plan.r
  if plan.left:
    out = plan.matrices(p, m, r) @ plan.matrices(x, r, n)
  else:
    out = plan.matrices(x, m, r) @ plan.matrices(p, r, n)
  return out.reshape(plan.shape)


class GaLoreState(NamedTuple):
  """State of `scale_by_galore`.

  Attributes:
    count: shape=(), dtype=int32, updates so far; the projectors are
      re-chosen when `count % update_gap == 0`.
    projectors: the params' structure: `P: [*batch, m, rank]` or `Q^T:
      [*batch, rank, n]` per projected leaf (in the leaf's rank, the
      replaced axes `rank, 1, ..., 1`), zero-size for the others.
    inner_state: the inner optimiser's state over the projected gradients
      (`[*batch, rank, n]` or `[*batch, m, rank]` likewise; the leaf's shape
      for leaves not projected).
  """

  count: jax.Array
  projectors: Any
  inner_state: Any


def check_hparams(rank, update_gap, scale, prefix: str = "") -> None:
  """Raises ValueError naming `prefix + name` for a bad rank, gap or scale."""
  _checks.check_positive_int(f"{prefix}rank", rank)
  _checks.check_positive_int(f"{prefix}update_gap", update_gap)
  if not 0 < scale < math.inf:
    raise ValueError(f"`{prefix}scale` must be finite and > 0, got {scale}.")


def scale_by_galore(
  inner: optax.GradientTransformation | None = None,
  *,
  rank: int = 32,
  update_gap: int = 200,
  scale: float = 0.25,
  matrices=matrix_axes,
) -> optax.GradientTransformation:
  """GaLore around a gradient-only `inner` transformation (optax).

  Args:
    inner: applied to the projected gradients (it never sees params, so it
      must not need them: `optax.scale_by_adam`, not `optax.adamw`); default
      `optax.scale_by_adam()`. Chain weight decay and the learning rate
      after this transformation, as `training.make_optimizer` does.
    rank: r, the projection rank.
    update_gap: T, steps between projector refreshes (SVDs).
    scale: alpha, the factor of the projected-back updates (leaves that are
      not projected are not scaled).
    matrices: `(path, leaf) -> MatrixAxes | None`, which leaves are projected
      and how they are matrices; default `matrix_axes`.

  Returns:
    An `optax.GradientTransformation` whose state is a `GaLoreState`.

  Raises:
    ValueError: `rank` or `update_gap` is not a positive integer, or `scale`
      is not finite and > 0.

  Example:
    >>> opt = optax.chain(scale_by_galore(rank=4), optax.scale(-1e-2))
    >>> params = {"w": jnp.ones((16, 32)), "b": jnp.ones(32)}
    >>> updates, state = opt.update(params, opt.init(params))
  """
  check_hparams(rank, update_gap, scale)
  inner = optax.scale_by_adam() if inner is None else inner

  def plans(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [
      _plan(matrices(path, x), x.shape, rank) for path, x in leaves
    ], treedef

  def init(params):
    plan, treedef = plans(params)
    leaves = jax.tree.leaves(params)
    projectors = [
      jnp.zeros((0,) * x.ndim if p is None else p.projector_shape, x.dtype)
      for p, x in zip(plan, leaves, strict=True)
    ]
    projected = [
      x if p is None else jnp.zeros(p.projected_shape, x.dtype)
      for p, x in zip(plan, leaves, strict=True)
    ]
    return GaLoreState(
      count=jnp.zeros((), jnp.int32),
      projectors=treedef.unflatten(projectors),
      inner_state=inner.init(treedef.unflatten(projected)),
    )

  def update(updates, state, params=None):
    del params
    plan, treedef = plans(updates)
    grads = jax.tree.leaves(updates)

    def refresh():
      return [
        q if p is None else _refresh(g, p)
        for p, g, q in zip(plan, grads, old, strict=True)
      ]

    old = jax.tree.leaves(state.projectors)
    projectors = jax.lax.cond(
      state.count % update_gap == 0, refresh, lambda: old
    )
    projected = [
      g if p is None else _project(g, q, p)
      for p, g, q in zip(plan, grads, projectors, strict=True)
    ]
    inner_updates, inner_state = inner.update(
      treedef.unflatten(projected), state.inner_state
    )
    full = [
      u if p is None else scale * _project_back(u, q, p)
      for p, u, q in zip(
        plan, jax.tree.leaves(inner_updates), projectors, strict=True
      )
    ]
    new_state = GaLoreState(
      count=optax.safe_increment(state.count),
      projectors=treedef.unflatten(projectors),
      inner_state=inner_state,
    )
    return treedef.unflatten(full), new_state

  return optax.GradientTransformation(init, update)
