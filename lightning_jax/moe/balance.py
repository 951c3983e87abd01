"""Load-balancing loss at sequence, micro-batch and exact global-batch scope.

`LBL = num_experts * sum_i f_i * p_i` (Fedus et al., 2021, "Switch
Transformers", eq. 4; generalised to top-k by GShard), with `f_i` the share of
routing slots assigned to expert `i` (a constant: it gets no gradient) and
`p_i` the mean router probability of expert `i`. Qiu et al., 2025, "Demons in
the Detail" show that the set of tokens over which `f` is counted matters:
balancing every micro-batch forbids domain specialisation, balancing the
global batch allows it. docs/moe.md derives the global-batch gradient.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lightning_jax import _checks
from lightning_jax.moe import routing

SCOPES = ("sequence", "micro", "global")


class LBLPieces(NamedTuple):
  """Sufficient statistics of the load-balancing loss for a set of tokens.

  Pieces of several microbatches (stacked on leading axes) or devices (summed
  with `psum`) add up to the pieces of their union.

  Attributes:
    expert_counts: `[..., num_experts]` float32 routing slots per expert
      (no gradient).
    prob_sums: `[..., num_experts]` float32 router probabilities summed over
      tokens (differentiable).
    num_tokens: `[...]` float32 number of tokens.
  """

  expert_counts: jax.Array
  prob_sums: jax.Array
  num_tokens: jax.Array


class LoadStats(NamedTuple):
  """Expert load, for logging.

  Attributes:
    expert_load: `[num_experts]` share of routing slots per expert (sums 1).
    max_over_mean: shape=(), max expert load / mean expert load (1 = balanced).
    dropped_fraction: shape=(), share of routing slots dropped by capacity.
  """

  expert_load: jax.Array
  max_over_mean: jax.Array
  dropped_fraction: jax.Array


def _check_routing(probs, experts, num_experts: int) -> None:
  """Raises ValueError unless `probs` `[batch, seq, ..., num_experts]` and
  `experts` `[batch, seq, ..., top_k]` agree."""
  num_experts = _checks.check_positive_int("num_experts", num_experts)
  if probs.ndim < 3:
    raise ValueError(
      "`probs` must have shape [batch, seq, ..., num_experts], "
      f"got {probs.shape}."
    )
  if probs.shape[-1] != num_experts:
    raise ValueError(
      f"`probs` last dim must be num_experts = {num_experts}, "
      f"got shape {probs.shape}."
    )
  if experts.shape[:-1] != probs.shape[:-1] or experts.ndim != probs.ndim:
    raise ValueError(
      "`experts` must have shape [batch, seq, ..., top_k] with "
      f"the leading dims of `probs` {probs.shape[:-1]}, got "
      f"{experts.shape}."
    )
  if not jnp.issubdtype(experts.dtype, jnp.integer):
    raise ValueError(f"`experts` must hold integer ids, got {experts.dtype}.")


def load_balancing_pieces(probs, experts, *, num_experts: int) -> LBLPieces:
  """The `LBLPieces` of all tokens in `probs` / `experts`.

  Args:
    probs: `[batch, seq, ..., num_experts]` router probabilities
      (`Routing.probs`).
    experts: `[batch, seq, ..., top_k]` chosen expert ids in
      `[0, num_experts)`; under `jit`, ids outside are not counted.
    num_experts: number of experts.

  Returns:
    `LBLPieces` with `[num_experts]` counts and probability sums.

  Raises:
    ValueError: shapes disagree (see `load_balancing_loss`), or a concrete
      expert id is outside `[0, num_experts)`.

  Example:
    >>> r = route(jnp.zeros((2, 3, 4)), top_k=1)
    >>> load_balancing_pieces(r.probs, r.experts, num_experts=4).num_tokens
    Array(6., dtype=float32)
  """
  _check_routing(probs, experts, num_experts)
  experts = routing.expert_ids("experts", experts, num_experts)
  counts = jnp.bincount(experts.reshape(-1), length=num_experts)
  prob_sums = jnp.sum(
    probs.astype(jnp.float32).reshape(-1, num_experts), axis=0
  )
  num_tokens = jnp.float32(probs.size // num_experts)
  return LBLPieces(counts.astype(jnp.float32), prob_sums, num_tokens)


def _axis_size(axis_name):
  """Size of the (tuple of) bound mesh axes; ValueError if one is unbound."""
  try:
    return jax.lax.psum(1, axis_name)
  except NameError as e:
    raise ValueError(
      f"`axis_name` {axis_name!r} is not bound: call the global-scope loss "
      "inside `jax.shard_map` (or a `vmap` with that axis_name) over the "
      "data-parallel mesh axes."
    ) from e


def load_balancing_loss_from_pieces(
  pieces: LBLPieces, *, axis_name=None, expert_counts=None
):
  """The LBL of the union of `pieces` (summed over its leading axes).

  Local `p` from the local pieces, `f` from counts summed over the leading
  axes and, if `axis_name` is given, over those mesh axes. With `axis_name`
  the result is this device's share: its mean over the devices of
  `axis_name` equals the one-device loss of the union of all devices' tokens,
  value and gradient (docs/moe.md derives it), also for unequal token counts.

  Args:
    pieces: `LBLPieces`, e.g. of M microbatches stacked to `[M, num_experts]`.
    axis_name: mesh axis name (or tuple) to count `f` over, inside
      `shard_map`; None counts locally.
    expert_counts: optional `[..., num_experts]` counts that replace
      `pieces.expert_counts` for `f` (summed and psum'ed the same way), e.g. a
      running buffer in a sequential gradient-accumulation loop.

  Returns:
    Scalar float32 loss (1.0 for a uniform router; 0.0 if no slot is
    counted, e.g. every expert id was out of range under `jit`).

  Raises:
    ValueError: `axis_name` is not bound.

  Example:
    >>> r = route(jnp.zeros((2, 3, 4)), top_k=2)
    >>> p = load_balancing_pieces(r.probs, r.experts, num_experts=4)
    >>> load_balancing_loss_from_pieces(p)  # uniform probs: exactly 1
    Array(1., dtype=float32)
  """
  num_experts = pieces.prob_sums.shape[-1]
  if expert_counts is None:
    expert_counts = pieces.expert_counts
  counts = jnp.sum(expert_counts.reshape(-1, num_experts), axis=0)
  prob_sums = jnp.sum(pieces.prob_sums.reshape(-1, num_experts), axis=0)
  num_tokens = jnp.sum(pieces.num_tokens)
  if axis_name is None:
    p = prob_sums / num_tokens
  else:
    num_devices = _axis_size(axis_name)
    counts = jax.lax.psum(counts, axis_name)
    p = prob_sums * (num_devices / jax.lax.psum(num_tokens, axis_name))
  # No slot counted (every id out of range, under jit): f = 0, not 0 / 0.
  f = jax.lax.stop_gradient(counts / jnp.maximum(jnp.sum(counts), 1.0))
  return num_experts * jnp.sum(f * p)


def load_balancing_loss(
  probs, experts, *, num_experts: int, scope: str = "micro", axis_name=None
):
  """Load-balancing loss `num_experts * sum_i f_i p_i` at the given scope.

  * "sequence": `f`, `p` per sequence, the loss averaged over sequences.
  * "micro": `f`, `p` over the local batch (this device / microbatch).
  * "global": `f` counted over every device of `axis_name` (inside
    `shard_map`), `p` local: the mean over devices of the result equals the
    loss of the whole global batch on one device, value and gradient.

  For M pipeline / accumulation microbatches in one differentiated function,
  stack their `load_balancing_pieces` and call
  `load_balancing_loss_from_pieces` once (exact global loss).

  Args:
    probs: `[batch, seq, ..., num_experts]` router probabilities.
    experts: `[batch, seq, ..., top_k]` chosen expert ids in
      `[0, num_experts)`. Under `jit` the ids cannot be checked: those
      outside are not counted in `f` (a finite loss, 0 if none is valid).
    num_experts: number of experts.
    scope: "sequence", "micro" or "global".
    axis_name: mesh axis name or tuple of names; required by, and only
      allowed with, `scope="global"`.

  Returns:
    Scalar float32 loss.

  Raises:
    ValueError: shapes disagree, a concrete expert id is outside
      `[0, num_experts)`, `scope` is unknown, or `axis_name` is missing /
      unbound for "global" or given for another scope.

  Example:
    >>> r = route(jnp.zeros((2, 3, 4)), top_k=1)
    >>> load_balancing_loss(r.probs, r.experts, num_experts=4, scope="micro")
    Array(1., dtype=float32)
  """
  _checks.check_choice("scope", scope, SCOPES)
  if scope == "global" and axis_name is None:
    raise ValueError(
      "`scope='global'` needs `axis_name`: the mesh axes "
      "(inside shard_map) over which to count expert load."
    )
  if scope != "global" and axis_name is not None:
    raise ValueError(
      f"`axis_name` is only used by scope='global', got "
      f"scope={scope!r} with axis_name={axis_name!r}."
    )
  _check_routing(probs, experts, num_experts)
  experts = routing.expert_ids("experts", experts, num_experts)
  if scope == "sequence":
    per_sequence = functools.partial(
      load_balancing_pieces, num_experts=num_experts
    )
    pieces = jax.vmap(per_sequence)(probs[:, None], experts[:, None])
    return jnp.mean(jax.vmap(load_balancing_loss_from_pieces)(pieces))
  pieces = load_balancing_pieces(probs, experts, num_experts=num_experts)
  return load_balancing_loss_from_pieces(pieces, axis_name=axis_name)


def load_stats(expert_counts, *, kept=None, axis_name=None) -> LoadStats:
  """Expert load statistics for logging.

  Args:
    expert_counts: `[..., num_experts]` routing slots per expert (e.g.
      `LBLPieces.expert_counts`), summed over leading axes.
    kept: optional bool `[..., top_k]` mask of routing slots that were not
      dropped by capacity; None means dropless.
    axis_name: optional mesh axes to sum the counts over (global stats).

  Returns:
    `LoadStats`.

  Example:
    >>> load_stats(jnp.array([3., 1.])).max_over_mean
    Array(1.5, dtype=float32)
  """
  num_experts = expert_counts.shape[-1]
  counts = jnp.sum(
    expert_counts.reshape(-1, num_experts).astype(jnp.float32), axis=0
  )
  if kept is None:
    dropped = jnp.float32(0)
  else:
    dropped = jnp.sum(1 - kept.astype(jnp.float32))
  if axis_name is not None:
    counts, dropped = jax.lax.psum((counts, dropped), axis_name)
  counts = jax.lax.stop_gradient(counts)
  total = jnp.sum(counts)
  return LoadStats(
    expert_load=counts / total,
    max_over_mean=jnp.max(counts) / jnp.mean(counts),
    dropped_fraction=dropped / total,
  )
