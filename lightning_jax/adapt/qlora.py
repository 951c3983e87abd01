"""QLoRA (Dettmers et al., 2023, arXiv 2305.14314): a frozen NF4 base.

`quantize(params, patterns)` stores the matched weights as `NF4Tensor`s
(NF4 codes + double-quantised absmax); `lora.apply` dequantises them in the
compute dtype inside the step and adds the adapters. `shardings` places an
NF4 leaf like the dense weight it replaces: `packed` (the weight's shape,
trailing dims folded, usually the last halved) and `absmax_codes` (blocks
along the trailing dims) take the weight's PartitionSpec on the dims they
keep; the folded dim keeps the spec of its first dim when the others are
unsplit and the sizes divide (otherwise it is replicated); the 256-block
scales and the offset (1 float per 16384 weights at block 64) are
replicated.
"""

import jax
import jax.numpy as jnp

from lightning_jax.adapt import nf4
from lightning_jax.adapt import paths
from lightning_jax.parallel import mesh as mesh_lib
from lightning_jax.parallel import sharding

P = jax.sharding.PartitionSpec


def quantize(params, patterns=(paths.MIXER, paths.MLP), block_size: int = 64):
  """`params` with the leaves matched by `patterns` as `NF4Tensor`s.

  Args:
    params: dense params (float).
    patterns: regular expressions over leaf names (`paths`); the default
      quantises every mixer projection and MLP / expert matrix, and keeps
      embeddings, norms, routers and per-head vectors dense (as QLoRA keeps
      everything but the linear layers).
    block_size: NF4 block.

  Raises:
    ValueError: a pattern that matches no matrix, or a leaf whose size the
      block does not divide (naming it).
  """
  chosen = set(paths.match(params, patterns, "patterns"))

  def one(path, leaf):
    name = paths.path_name(path)
    if name not in chosen:
      return leaf
    try:
      return nf4.to_nf4(leaf, block_size)
    except ValueError as err:
      raise ValueError(f"leaf {name!r}: {err}") from err

  return jax.tree_util.tree_map_with_path(one, params)


def dequantize(params, dtype=jnp.float32):
  """`params` with every `NF4Tensor` leaf dense in `dtype`."""
  return jax.tree.map(
    lambda x: nf4.from_nf4(x, dtype) if paths.is_nf4(x) else x,
    params,
    is_leaf=paths.is_nf4,
  )


def _folded_spec(spec, shape, divisor: int, sizes: dict) -> P:
  """The spec of `folded_shape(shape, divisor)` given the weight's spec."""
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  folded = nf4.folded_shape(shape, divisor)
  keep = len(folded) - 1
  last = paths.merged_axes(entries[keep:], folded[keep], sizes)
  return P(*entries[:keep], last)


def shardings(params, mesh, *, stage_axis: int = sharding.STAGE_AXIS):
  """`NamedSharding`s of a params tree that may hold `NF4Tensor`s.

  Dense leaves follow `parallel.param_shardings`; an `NF4Tensor` follows
  the rule of the weight it stores (module docstring).
  """
  sizes = mesh_lib.mesh_axis_sizes(mesh)
  named = lambda spec: jax.sharding.NamedSharding(mesh, spec)  # noqa: E731

  def one(path, leaf):
    names = sharding.path_names(path)
    shape = paths.shape_of(leaf)
    spec = sharding.plan_leaf(names, shape, sizes, stage_axis).spec
    if not paths.is_nf4(leaf):
      return named(spec)
    return nf4.NF4Tensor(
      packed=named(_folded_spec(spec, shape, 2, sizes)),
      absmax_codes=named(_folded_spec(spec, shape, leaf.block_size, sizes)),
      absmax_scales=named(P()),
      absmax_offset=named(P()),
      shape=leaf.shape,
    )

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=paths.is_nf4)
