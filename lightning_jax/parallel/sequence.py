"""Sequence parallelism for linear recurrences on global arrays.

The `sp_*` ops (one all-gather of affine state maps, see
`lightning_jax.ops.sequence_parallel` and docs/parallel.md) run inside
`jax.shard_map` on local chunks; `sequence_parallel(sp_fn, mesh)` wraps one
for global arrays and a mesh. The model's layers call the same ops by
themselves when the traced mesh has a `seq` axis.
"""

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax.ops.sequence_parallel import sp_delta_rule
from lightning_jax.ops.sequence_parallel import sp_gated_linear_attention
from lightning_jax.ops.sequence_parallel import sp_linear_attention
from lightning_jax.parallel import mesh as mesh_lib

__all__ = (
  "sequence_parallel",
  "sp_delta_rule",
  "sp_gated_linear_attention",
  "sp_linear_attention",
)

P = jax.sharding.PartitionSpec


def sequence_parallel(
  sp_fn: Callable,
  mesh: jax.sharding.Mesh,
  *,
  axis_name: str = mesh_lib.SEQ,
  batch_axes: tuple[str, ...] = (),
) -> Callable:
  """Wraps an `sp_*` function to take global arrays and a mesh.

  Arrays with a sequence dim (`[batch, seq, ...]`: q, k, v, beta, gates)
  are split over `axis_name` (batch over `batch_axes`), `[heads]` decays and
  the initial state's non-batch dims are replicated; outputs come back as
  global arrays (`o` split like q, the final state like the initial state).

  Args:
    sp_fn: `sp_linear_attention`, `sp_gated_linear_attention` or
      `sp_delta_rule`.
    mesh: a mesh with axis `axis_name` (and `batch_axes`).
    axis_name: the sequence axis.
    batch_axes: mesh axes that split the batch.

  Returns:
    `fn(*arrays, initial_state=None, output_final_state=False, **static)`
    with the signature of the matching `ops` function (static keywords:
    `scale`, `chunk_size`).

  Raises:
    ValueError: naming `axis_name` / `batch_axes` if not in the mesh, `q` if
      its sequence length is not divisible by the axis size, or an array
      passed by keyword.

  Example:
    >>> mesh = make_mesh("seq=8")
    >>> fn = sequence_parallel(sp_linear_attention, mesh)
    >>> fn(q, k, v, log_decay)  # q: [B, 8 * n, H, Dk]
  """
  for name in (axis_name, *batch_axes):
    if name not in mesh.axis_names:
      raise ValueError(
        f"`axis_name` / `batch_axes` must be axes of the mesh "
        f"{dict(mesh.shape)}, got {name!r}."
      )
  batch = tuple(batch_axes) or None

  def spec(x):
    if np.ndim(x) >= 3:
      return P(batch, axis_name)
    return P()

  def run(*arrays, initial_state=None, output_final_state=False, **static):
    unknown = set(static) - {"scale", "chunk_size"}
    if unknown:
      raise ValueError(
        f"Pass arrays positionally; keywords must be among "
        f"['scale', 'chunk_size'], got {sorted(unknown)}."
      )
    t, n = np.shape(arrays[0])[1], mesh.shape[axis_name]
    if t % n:
      raise ValueError(
        f"`q` sequence length {t} must be divisible by the "
        f"{axis_name!r} axis size {n}."
      )
    local = functools.partial(
      sp_fn, axis_name=axis_name, output_final_state=True, **static
    )
    # The final state is the same on every device of the axis (each composes
    # all P summaries), but vma typing marks an all_gather's output varying.
    o, final = jax.shard_map(
      lambda arrays, s0: local(*arrays, initial_state=s0),
      mesh=mesh,
      in_specs=(tuple(spec(x) for x in arrays), P(batch)),
      out_specs=(P(batch, axis_name), P(batch)),
      check_vma=False,
    )(arrays, _zero_state(arrays, initial_state))
    return (o, final) if output_final_state else o

  return run


def _zero_state(arrays, initial_state):
  if initial_state is not None:
    return initial_state
  q, _, v = arrays[:3]
  b, _, h, dk = np.shape(q)
  return jnp.zeros((b, h, dk, np.shape(v)[-1]), jnp.float32)
