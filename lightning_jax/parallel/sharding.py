"""Partition rules: the one place that says how every parameter is sharded.

A parameter is recognised by the names on its pytree path (dict keys and
attribute names, list indices skipped). `param_rules()` (each registered
token mixer's rules, then `PARAM_RULES`) gives each kind a logical name per
dim, `LOGICAL_AXES` maps logical names to mesh axes, and
`fsdp` then shards the largest remaining dim:

  * `tensor` splits heads (attention `wq/wk/wv: [D, H, Dh]`, `wo: [H, Dh, D]`,
    the per-head projections, gates, convs and constants of the other
    mixers, as their records say), the FFN width (`w_gate/w_up: [D, F]`,
    `w_down: [F, D]`) and the vocabulary (`embed: [V, D]`, `unembed: [D, V]`);
  * `expert` splits the leading expert axis of MoE expert weights `[E, ...]`;
  * `pipe` splits the stage axis of stage-stacked parameters (any leaf under
    a `"stages"` key, stage axis `stage_axis` among its leading stacked dims,
    default 1: the pipeline's `[repeats, stages, layers_per_stage, ...]`);
  * `fsdp` shards the largest dim not split otherwise, when divisible, for
    leaves of (unstacked) rank >= 2; vectors and scalars stay replicated.

A dim whose size is not divisible by its mesh axis is replicated, and the
summary says so. Because rules match path suffixes, they apply unchanged to
any pytree that holds the params inside it: optimiser moments, a TrainState.
Data, seq and unknown leaves are never split except by fsdp.
"""

from collections.abc import Callable
import dataclasses
import functools

import jax
import numpy as np

from lightning_jax.layers import mixers
from lightning_jax.parallel import mesh as mesh_lib

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding

# Logical dim name -> the mesh axis that splits it.
LOGICAL_AXES = {
  "heads": mesh_lib.TENSOR,
  "ffn": mesh_lib.TENSOR,
  "vocab": mesh_lib.TENSOR,
  "experts": mesh_lib.EXPERT,
  "stage": mesh_lib.PIPE,
}

# (path suffix, logical name of each trailing dim); the first match wins.
# Token-mixer params come first: each registered mixer's own rules
# (`layers.mixers.Mixer.rules`), matched under its "mixer" key.
PARAM_RULES = (
  (("experts", "w_gate"), ("experts", "embed", "ffn")),  # [E, D, F]
  (("experts", "w_up"), ("experts", "embed", "ffn")),  # [E, D, F]
  (("experts", "w_down"), ("experts", "ffn", "embed")),  # [E, F, D]
  (("w_gate",), ("embed", "ffn")),  # [D, F]
  (("w_up",), ("embed", "ffn")),  # [D, F]
  (("w_down",), ("ffn", "embed")),  # [F, D]
  (("router",), ("embed", None)),  # [D, E]: routing stays whole
  (("embed",), ("vocab", "embed")),  # [V, D]
  (("unembed",), ("embed", "vocab")),  # [D, V]
  (("scale",), (None,)),  # norm scales [D]: replicated
)
MIXER_KEY = "mixer"


def param_rules() -> tuple:
  """The rules of every registered mixer (prefixed by `MIXER_KEY`), then
  `PARAM_RULES`."""
  mixer_rules = tuple(
    ((MIXER_KEY,) + suffix, logical)
    for kind in mixers.kinds()
    for suffix, logical in mixers.get(kind).rules
  )
  return mixer_rules + PARAM_RULES


STAGES_KEY = "stages"
# Leaves under "stages" are `[repeats, stages, layers_per_stage, *param]`
# (`parallel.pipeline.stack_stages`): the stage dim is stacked dim 1.
STAGE_AXIS = 1


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How a leaf is split: its spec, the rule used, why dims stayed whole."""

  spec: P
  rule: str
  notes: tuple[str, ...]


def path_names(path) -> tuple[str, ...]:
  """The keys / attribute names of a pytree key path (indices as str)."""
  names = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      names.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      names.append(entry.name)
    elif isinstance(entry, jax.tree_util.SequenceKey):
      names.append(str(entry.idx))
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
      names.append(str(entry.key))
    else:
      names.append(str(entry))
  return tuple(names)


def match_rule(names: tuple[str, ...]):
  """`(rule name, logical name of each trailing dim)` of the first rule of
  `param_rules()` whose suffix ends `names` (indices skipped), or
  `(None, None)`.

  Example:
    >>> match_rule(("layers", "0", "mixer", "wo"))
    ('mixer/wo', ('heads', 'head_dim', 'embed'))
  """
  keys = tuple(n for n in names if not n.isdigit())
  for suffix, logical in param_rules():
    if keys[-len(suffix) :] == suffix:
      return "/".join(suffix), logical
  return None, None


def logical_names(path) -> tuple | None:
  """The logical name of each trailing dim of the leaf at `path` (a
  `jax.tree_util` key path), from the first matching rule; None if none.

  Example:
    >>> logical_names((jax.tree_util.DictKey("w_down"),))
    ('ffn', 'embed')
  """
  return match_rule(path_names(path))[1]


def plan_leaf(
  names: tuple[str, ...],
  shape: tuple[int, ...],
  axis_sizes: dict[str, int],
  stage_axis: int = STAGE_AXIS,
) -> LeafPlan:
  """The PartitionSpec of one leaf from its path names and shape.

  Args:
    names: `path_names` of the leaf.
    shape: its shape.
    axis_sizes: `{mesh axis: size}`.
    stage_axis: index, among the leading stacked dims of a leaf under
      `"stages"`, of the pipeline stage dim (default `STAGE_AXIS` = 1, the
      layout of `parallel.pipeline.stack_stages`).

  Returns:
    A `LeafPlan`.
  """
  rule, logical = match_rule(names)
  notes = []
  if logical is not None and len(logical) > len(shape):
    notes.append(f"rule {rule} expects rank >= {len(logical)}")
    rule, logical = None, None
  staged = STAGES_KEY in names
  if logical is not None:
    base_rank = len(logical)
  elif (
    staged
  ):  # unknown leaf: at least the dims up to the stage dim are stacked
    base_rank = max(len(shape) - stage_axis - 1, 0)
  else:
    base_rank = len(shape)
  stacked = [None] * (len(shape) - base_rank)
  if staged and stacked:
    if not 0 <= stage_axis < len(stacked):
      raise ValueError(
        f"`stage_axis` must index one of the {len(stacked)} "
        f"stacked dims of {'/'.join(names)} {shape}, got "
        f"{stage_axis}."
      )
    stacked[stage_axis] = "stage"
  logical = (*stacked, *(logical or (None,) * base_rank))

  spec, used = [None] * len(shape), set()
  for dim, name in enumerate(logical):
    axis = LOGICAL_AXES.get(name)
    size = axis_sizes.get(axis, 1)
    if size == 1 or axis in used:
      continue
    if shape[dim] % size:
      notes.append(
        f"{name}={shape[dim]} not divisible by {axis}={size}: replicated"
      )
      continue
    spec[dim] = axis
    used.add(axis)

  fsdp = axis_sizes.get(mesh_lib.FSDP, 1)
  if fsdp > 1 and base_rank >= 2:
    free = [d for d in range(len(stacked), len(shape)) if spec[d] is None]
    fits = [d for d in free if shape[d] % fsdp == 0]
    if fits:
      spec[max(fits, key=lambda d: (shape[d], -d))] = mesh_lib.FSDP
    else:
      notes.append(f"no dim divisible by fsdp={fsdp}: replicated")
  return LeafPlan(P(*spec), rule or "-", tuple(notes))


def _plans(tree, mesh, stage_axis):
  sizes = mesh_lib.mesh_axis_sizes(mesh)
  return jax.tree_util.tree_map_with_path(
    lambda path, x: plan_leaf(
      path_names(path), tuple(np.shape(x)), sizes, stage_axis
    ),
    tree,
  )


def param_partition_specs(
  tree, mesh: jax.sharding.Mesh, *, stage_axis: int = STAGE_AXIS
):
  """PartitionSpec of every leaf of `tree` (params, abstract params, opt state).

  Args:
    tree: a pytree of arrays or `jax.ShapeDtypeStruct`s.
    mesh: the mesh whose axes (and sizes) decide the split.
    stage_axis: see `plan_leaf`.

  Returns:
    A pytree of `PartitionSpec` with the structure of `tree`.

  Example:
    >>> mesh = make_mesh("fsdp=2,tensor=4")
    >>> param_partition_specs({"wq": jnp.zeros((64, 8, 16))}, mesh)
    {'wq': PartitionSpec('fsdp', 'tensor', None)}
  """
  return jax.tree.map(
    lambda plan: plan.spec,
    _plans(tree, mesh, stage_axis),
    is_leaf=lambda x: isinstance(x, LeafPlan),
  )


def param_shardings(
  tree, mesh: jax.sharding.Mesh, *, stage_axis: int = STAGE_AXIS
):
  """`NamedSharding` of every leaf of `tree`; see `param_partition_specs`."""
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec),
    param_partition_specs(tree, mesh, stage_axis=stage_axis),
    is_leaf=lambda x: isinstance(x, P),
  )


def init_sharded(
  init_fn: Callable,
  key: jax.Array,
  mesh: jax.sharding.Mesh,
  *,
  stage_axis: int = STAGE_AXIS,
):
  """Runs `init_fn(key)` with every output created directly in its shards.

  The output shapes come from `jax.eval_shape`, their shardings from the
  partition rules, and `jax.jit(init_fn, out_shardings=...)` then never
  materialises a whole parameter on one device.

  Args:
    init_fn: `init_fn(key) -> params` (e.g. `functools.partial(models.init,
      cfg=cfg)`).
    key: a PRNG key.
    mesh: the mesh.
    stage_axis: see `plan_leaf`.

  Returns:
    The params, each a global `jax.Array` sharded by the rules.
  """
  abstract = jax.eval_shape(init_fn, key)
  shardings = param_shardings(abstract, mesh, stage_axis=stage_axis)
  return jax.jit(init_fn, out_shardings=shardings)(key)


def batch_spec(mesh: jax.sharding.Mesh) -> P:
  """Spec of `[batch, seq]` arrays: batch over data/fsdp/expert, seq over seq.

  Every axis that does not split the batch of a parameter-sharded layer
  splits the batch: data and fsdp always, expert too (outside the experts
  it is one more data-parallel axis). Tensor and pipe see the whole batch.
  """
  batch = tuple(
    a
    for a in mesh.axis_names
    if a in (mesh_lib.DATA, mesh_lib.FSDP, mesh_lib.EXPERT)
  )
  seq = mesh_lib.SEQ if mesh_lib.SEQ in mesh.axis_names else None
  return P(batch or None, seq)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """`NamedSharding` for `[batch, seq]` arrays; see `batch_spec`."""
  return NamedSharding(mesh, batch_spec(mesh))


def sharding_summary(
  tree, mesh: jax.sharding.Mesh, *, stage_axis: int = STAGE_AXIS
) -> str:
  """A text table: path, shape, dtype, spec, bytes per device, notes.

  Leaves that already carry a `NamedSharding` (e.g. from `init_sharded`)
  show that sharding; others show what the rules would give.

  Args:
    tree: a pytree of arrays or `jax.ShapeDtypeStruct`s.
    mesh: the mesh.
    stage_axis: see `plan_leaf`.

  Returns:
    The table, one row per leaf, then totals (whole vs largest per device).
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  sizes = mesh_lib.mesh_axis_sizes(mesh)
  rows, total, per_device = [], 0, 0
  for path, leaf in flat:
    shape, dtype = tuple(np.shape(leaf)), getattr(leaf, "dtype", None)
    plan = plan_leaf(path_names(path), shape, sizes, stage_axis)
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
      sharding = NamedSharding(mesh, plan.spec)
    itemsize = getattr(dtype, "itemsize", 0)
    nbytes = int(np.prod(shape)) * itemsize
    shard = int(np.prod(sharding.shard_shape(shape))) * itemsize
    total, per_device = total + nbytes, per_device + shard
    rows.append(
      (
        "/".join(path_names(path)),
        str(shape),
        str(dtype),
        str(tuple(sharding.spec)),
        f"{shard:,}",
        plan.rule,
        "; ".join(plan.notes),
      )
    )
  header = ("path", "shape", "dtype", "spec", "bytes/device", "rule", "notes")
  widths = [max(len(r[i]) for r in (header, *rows)) for i in range(6)]
  fmt = lambda r: (
    "  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=True))
    + "  "
    + r[6]
  )
  mesh_text = ", ".join(f"{k}={v}" for k, v in sizes.items())
  lines = [
    f"mesh: {mesh_text}",
    fmt(header).rstrip(),
    *(fmt(r).rstrip() for r in rows),
  ]
  lines.append(
    f"total: {total:,} bytes; per device: {per_device:,} bytes "
    f"({per_device / max(total, 1):.1%})"
  )
  return "\n".join(lines)


def shard_step(
  step_fn: Callable,
  mesh: jax.sharding.Mesh,
  state_shardings,
  batch_shardings,
  *,
  donate: bool = True,
):
  """`jax.jit` of `step_fn(state, batch) -> (state, metrics)` over a mesh.

  The state keeps `state_shardings` in and out (so the step never reshards
  its carry and, with `donate`, updates buffers in place); the batch comes in
  with `batch_shardings` (a sharding or a pytree of them); metrics come out
  replicated. Inside, XLA's sharding propagation (Auto axes) inserts the
  collectives of data, fsdp, tensor and expert parallelism. The step is
  traced under the mesh (`traced_on`), so with a `seq` axis the layers run
  sequence / context parallel.

  Args:
    step_fn: `step_fn(state, batch) -> (new_state, metrics)`.
    mesh: the mesh.
    state_shardings: pytree of `NamedSharding` matching the state
      (e.g. `param_shardings(abstract_state, mesh)`).
    batch_shardings: a sharding (prefix) or pytree of them for the batch.
    donate: donate the input state's buffers.

  Returns:
    The jitted step.
  """
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    traced_on(mesh, step_fn),
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,) if donate else (),
  )


def traced_on(mesh: jax.sharding.Mesh, fn: Callable) -> Callable:
  """`fn` traced under `mesh` as the abstract mesh in context.

  Layers read it (`ops.sequence_axis`): with a `seq` axis of more than one
  device, recurrent mixers run sequence parallel and attention context
  parallel, instead of leaving the split sequence to XLA.

  Args:
    mesh: the mesh the jitted `fn` runs on.
    fn: the function to trace (e.g. a train or eval step).

  Returns:
    `fn` with the same signature.
  """

  @functools.wraps(fn)
  def run(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return run
