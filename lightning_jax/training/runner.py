"""How a train step runs on a mesh: one `StepRunner`, chosen once.

`make_runner(config, mesh)` picks the variant from the mesh and the config:

* "sequential": the whole batch in one `jax.value_and_grad`;
* "accumulation": `microbatches` > 1 on one stage (`training.step`'s
  rematerialised scan over microbatches);
* a pipeline schedule ("gpipe", "circular", "1f1b") when the mesh's pipe
  axis has more than one device (`parallel.pipeline`), with params stacked
  into stages;
* "co2" for `--optimizer=co2` (`training.co2`): params and inner optimiser
  state stacked on a leading `[replicas]` axis over the mesh's `data` axis.

The loop only reads the runner's fields: the `grad_fn` of the step, the
param layout it trains on (`to_layout` / `from_layout` between the
`models.init` layout and the runner's), how its state is made, sharded,
stepped and checkpointed (the `models.init` layout for every runner but
"co2", whose replicas differ mid-round), and a JSON record for checkpoint
metadata and logs. Building a runner validates the config against the mesh;
an `AbstractMesh` of the flag's axes is enough, so flags are checked before
any device is touched.
"""

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import jax

from lightning_jax.parallel import mesh as mesh_lib
from lightning_jax.parallel import pipeline
from lightning_jax.parallel import sharding as sharding_lib
from lightning_jax.training import co2 as co2_lib
from lightning_jax.training import optim as optim_lib
from lightning_jax.training import state as state_lib
from lightning_jax.training import step as step_lib

SEQUENTIAL = "sequential"
ACCUMULATION = "accumulation"
CO2 = optim_lib.CO2


class StepRunner(NamedTuple):
  """How a train step runs on one mesh.

  Attributes:
    kind: "sequential", "accumulation", the pipeline schedule or "co2".
    grad_fn: `(params, batch, rng) -> ((loss, metrics), grads)` over params
      in this runner's layout (`training.make_train_step`'s hook).
    to_layout: params in the `models.init` layout -> this runner's layout.
    from_layout: this runner's layout -> the `models.init` layout (for
      "co2" the replicas' mean, which evaluation runs).
    metadata: JSON-serialisable record of the runner (kind, microbatches,
      for pipelines stages and repeats, for "co2" replicas and options).
    init_state: `(params, optimizer, key) -> TrainState` in this runner's
      layout, from params in the `models.init` layout.
    to_checkpoint: the train state -> the tree checkpoints hold.
    from_checkpoint: the inverse of `to_checkpoint`.
    state_shardings: `(abstract state, mesh) -> NamedSharding tree` of the
      runner's state.
    make_step: `(optimizer, schedule, grad_fn) -> train_step`
      (`training.make_train_step`'s signature).
  """

  kind: str
  grad_fn: step_lib.GradFn
  to_layout: Callable[[dict], dict]
  from_layout: Callable[[dict], dict]
  metadata: dict
  init_state: Callable
  to_checkpoint: Callable
  from_checkpoint: Callable
  state_shardings: Callable
  make_step: Callable


def _identity(params):
  return params


def _param_layout_runner(kind, grad_fn, to_layout, from_layout, metadata):
  """A runner whose state is `init_train_state`'s with its params (and their
  optimiser twins) in its layout; checkpoints hold the `models.init` one."""

  def init_state(params, optimizer, key):
    return relayout_state(
      to_layout, state_lib.init_train_state(params, optimizer, key)
    )

  return StepRunner(
    kind=kind,
    grad_fn=grad_fn,
    to_layout=to_layout,
    from_layout=from_layout,
    metadata=metadata,
    init_state=init_state,
    to_checkpoint=functools.partial(relayout_state, from_layout),
    from_checkpoint=functools.partial(relayout_state, to_layout),
    state_shardings=sharding_lib.param_shardings,
    make_step=step_lib.make_train_step,
  )


def _local_runner(config) -> StepRunner:
  """Sequential or gradient accumulation: every layer on every device."""
  k = config.microbatches
  kind = ACCUMULATION if k > 1 else SEQUENTIAL
  return _param_layout_runner(
    kind=kind,
    grad_fn=step_lib.default_grad_fn(config.model, config.loss, k),
    to_layout=_identity,
    from_layout=_identity,
    metadata={"kind": kind, "microbatches": k},
  )


def _pipeline_runner(config, mesh, stages: int) -> StepRunner:
  """A pipeline schedule over the mesh's pipe axis (stage-stacked params)."""
  repeats = config.pipeline_repeats
  if config.model.num_layers % (stages * repeats):
    raise ValueError(
      f"num_layers={config.model.num_layers} must be divisible by the "
      f"pipeline stages (mesh {mesh_lib.PIPE}={stages} x "
      f"--pipeline_repeats={repeats})."
    )
  try:
    grad_fn = pipeline.pipeline_grad_fn(
      config.model,
      config.loss,
      mesh,
      schedule=config.pipeline_schedule,
      num_microbatches=config.microbatches,
      repeats=repeats,
    )
  except ValueError as e:
    raise ValueError(f"--mesh={config.mesh!r} (pipeline): {e}") from None
  return _param_layout_runner(
    kind=config.pipeline_schedule,
    grad_fn=grad_fn,
    to_layout=functools.partial(
      pipeline.to_pipeline_params, num_stages=stages, repeats=repeats
    ),
    from_layout=pipeline.from_pipeline_params,
    metadata={
      "kind": config.pipeline_schedule,
      "microbatches": config.microbatches,
      "stages": stages,
      "repeats": repeats,
    },
  )


def _co2_runner(config, mesh) -> StepRunner:
  """CO2 (`training.co2`): replica-stacked params over the data axis."""
  cfg = config.optim.co2
  replicas = mesh_lib.axis_size(mesh, mesh_lib.DATA)
  return StepRunner(
    kind=CO2,
    grad_fn=step_lib.default_grad_fn(
      config.model, config.loss, config.microbatches
    ),
    to_layout=functools.partial(co2_lib.stack_replicas, replicas=replicas),
    from_layout=co2_lib.replica_mean,
    metadata={
      "kind": CO2,
      "microbatches": config.microbatches,
      "replicas": replicas,
      "local_steps": cfg.local_steps,
      "staleness": cfg.staleness,
    },
    init_state=functools.partial(
      co2_lib.init_co2_state, cfg=cfg, replicas=replicas
    ),
    to_checkpoint=_identity,
    from_checkpoint=_identity,
    state_shardings=co2_lib.state_shardings,
    make_step=functools.partial(
      co2_lib.make_co2_train_step, cfg=cfg, mesh=mesh
    ),
  )


def make_runner(config, mesh) -> StepRunner:
  """The `StepRunner` of a training run on `mesh`.

  Args:
    config: the `training.TrainConfig` (reads `model`, `loss`, `mesh`,
      `microbatches`, `pipeline_schedule`, `pipeline_repeats`).
    mesh: a `jax.sharding.Mesh`, or an `AbstractMesh` to validate only.

  Returns:
    "co2" for `--optimizer=co2`, a pipeline runner when the mesh's pipe
    axis has more than one device, else "accumulation" for `microbatches`
    > 1 and "sequential" otherwise.

  Raises:
    ValueError: the model's layers or blocks do not split into the
      pipeline's stages, or the schedule, microbatches and repeats disagree,
      or co2 with a pipe axis (one line naming the flags).

  Example:
    >>> runner = make_runner(config, parallel.make_mesh("data=4,pipe=2"))
    >>> runner.kind, runner.metadata["stages"]
    ('1f1b', 2)
  """
  stages = mesh_lib.axis_size(mesh, mesh_lib.PIPE)
  if config.optim.optimizer == CO2:
    if stages > 1:
      raise ValueError(
        f"--optimizer={CO2} trains without a pipe axis, got "
        f"--mesh={config.mesh!r}."
      )
    sharded = [
      a
      for a in (mesh_lib.FSDP, mesh_lib.TENSOR)
      if mesh_lib.axis_size(mesh, a) > 1
    ]
    if len(sharded) > 1:  # XLA's SPMD partitioner aborts on this layout
      raise ValueError(
        f"--optimizer={CO2} shards a replica on fsdp or tensor, not both; "
        f"got --mesh={config.mesh!r}."
      )
    return _co2_runner(config, mesh)
  if stages > 1:
    return _pipeline_runner(config, mesh, stages)
  return _local_runner(config)


def relayout_state(fn: Callable[[dict], dict], state):
  """A train state with `fn` applied to its params and their optimiser twins.

  Args:
    fn: a param layout map (`StepRunner.to_layout` or `from_layout`).
    state: a `TrainState`.

  Returns:
    `state` with `fn` applied to `state.params` and to every subtree of
    `state.opt_state` with the params' structure (e.g. Adam's moments);
    other leaves (step counts) are unchanged.
  """
  params_def = jax.tree.structure(state.params)

  def is_params(tree: Any) -> bool:
    return jax.tree.structure(tree) == params_def

  opt_state = jax.tree.map(
    lambda x: fn(x) if is_params(x) else x, state.opt_state, is_leaf=is_params
  )
  return state._replace(params=fn(state.params), opt_state=opt_state)
