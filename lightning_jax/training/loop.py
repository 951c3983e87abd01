"""The training loop: mesh, init or restore, steps, metrics, checkpoints.

`train(config)` is what `tools/train.py` runs. Flow per step `t`: read batch
`t` on the host (a pure function of the seed and the data position), dispatch
the jitted step, then fetch step t-1's metrics (the device already has step t
queued, so logging never stalls it). Every `checkpoint_every` steps the state
is copied to the host and saved once the next step's loss and gradient
(computed from its params) are finite, the run's last state once its params
are: a checkpoint never holds params whose loss is NaN or Inf.

How the step runs on the mesh (sequential, gradient accumulation or a
pipeline schedule) is one `training.runner.StepRunner`, chosen once;
checkpoints hold the state in the `models.init` param layout whichever runner
wrote it, so a run resumes on any mesh.
"""

import contextlib
import dataclasses
import fcntl
import math
import os
import socket
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import models
from lightning_jax import parallel
from lightning_jax.parallel import mesh as mesh_lib
from lightning_jax.parallel import pipeline
from lightning_jax.training import checkpoint
from lightning_jax.training import data as data_lib
from lightning_jax.training import loss as loss_lib
from lightning_jax.training import metrics as metrics_lib
from lightning_jax.training import optim as optim_lib
from lightning_jax.training import runner as runner_lib
from lightning_jax.training import state as state_lib
from lightning_jax.training import step as step_lib

CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "run.lock"


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm of a step is NaN or Inf."""


class WorkdirError(RuntimeError):
  """The workdir is in use by another run, or cannot be written."""


@contextlib.contextmanager
def lock_workdir(workdir: str):
  """Holds `<workdir>/run.lock` exclusively while the block runs.

  An advisory `flock`, released by the kernel when the holder exits (also on
  kill -9), so a dead run never leaves a stale lock. The file names the
  holder (`host pid`).

  Raises:
    WorkdirError: another run holds the lock, or the workdir cannot be
      created or written (found before anything compiles).
  """
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir!r} cannot be written: {e}") from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
      raise WorkdirError(
        f"--workdir={workdir!r} is in use by another run "
        f"({holder or 'unknown holder'}); wait for it or use another "
        "--workdir."
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run.

  Attributes:
    model: the `models.ModelConfig`; its `vocab_size` must cover the data's.
    workdir: run directory: `checkpoints/`, `metrics.jsonl`.
    steps: optimiser steps of the whole run (a resumed run continues to it).
    batch_size: global batch size (sequences per step, all processes).
    seq_len: tokens per sequence.
    seed: seed of the parameters, the per-step randomness and the data order.
    data: dataset spec (`training.data.make_dataset`): "corpus", "mqar" or
      a path.
    mesh: mesh spec, e.g. "data=2,fsdp=2,tensor=2" (`parallel.make_mesh`);
      "" puts every device on `data`.
    microbatches: gradient-accumulation steps when the mesh has pipe == 1,
      the number of pipeline microbatches otherwise (`training.runner`).
    pipeline_schedule: "gpipe", "circular" or "1f1b" (mesh pipe > 1).
    pipeline_repeats: virtual stages per pipe device ("circular" needs >= 2).
    checkpoint_every: save every this many steps and at the end; 0 disables.
    keep_checkpoints: complete checkpoints to keep.
    log_every: write metrics every this many steps (and at steps 1 and last).
    optim: `OptimConfig`.
    loss: `LossConfig`.
    tensorboard: also write TensorBoard scalars (needs tensorboardX).
    flags: JSON-serialisable record of how the run was launched, saved in
      the checkpoint metadata.
  """

  model: Any
  workdir: str
  steps: int = 600
  batch_size: int = 16
  seq_len: int = 128
  seed: int = 0
  data: str = "corpus"
  mesh: str = ""
  microbatches: int = 1
  pipeline_schedule: str = "gpipe"
  pipeline_repeats: int = 1
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  log_every: int = 10
  optim: optim_lib.OptimConfig = optim_lib.OptimConfig()
  loss: loss_lib.LossConfig = loss_lib.LossConfig()
  tensorboard: bool = False
  flags: dict = dataclasses.field(default_factory=dict)


class TrainResult(NamedTuple):
  """What `train` returns.

  Attributes:
    state: the final `TrainState` (sharded over the mesh).
    history: the metric rows logged this run (written by process 0 only).
  """

  state: state_lib.TrainState
  history: list


def validate(
  config: TrainConfig, num_devices: int, process_count: int = 1
) -> dict:
  """Checks a run's shape arithmetic before anything is compiled.

  Args:
    config: the run.
    num_devices: devices over all processes (`jax.device_count()`).
    process_count: processes (`jax.process_count()`).

  Returns:
    The mesh axis sizes (`parallel.parse_mesh_spec`, filled in with every
    device on `data` when the spec is empty).

  Raises:
    ValueError: one line naming the flag and the expected value.
  """
  for name in ("steps", "batch_size", "seq_len", "microbatches", "log_every"):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"--{name} must be a positive integer, got {value!r}.")
  if config.checkpoint_every < 0:
    raise ValueError(
      f"--checkpoint_every must be >= 0 (0 disables), got "
      f"{config.checkpoint_every}."
    )
  if config.checkpoint_every and config.keep_checkpoints < 1:
    raise ValueError(
      f"--keep_checkpoints must be >= 1, got {config.keep_checkpoints}."
    )
  axes = parallel.parse_mesh_spec(config.mesh) if config.mesh else {}
  axes = axes or {mesh_lib.DATA: num_devices}
  size = math.prod(axes.values())
  if size != num_devices:
    raise ValueError(
      f"--mesh={config.mesh!r} multiplies to {size} devices, but there are "
      f"{num_devices} (set JAX_NUM_CPU_DEVICES for fake CPU devices)."
    )
  data_parallel = math.prod(
    axes.get(a, 1) for a in (mesh_lib.DATA, mesh_lib.FSDP, mesh_lib.EXPERT)
  )
  per_step = data_parallel * config.microbatches
  if config.batch_size % per_step:
    raise ValueError(
      f"--batch_size={config.batch_size} must be divisible by the "
      f"data-parallel size (data*fsdp*expert = {data_parallel}) x "
      f"--microbatches={config.microbatches} = {per_step}."
    )
  if config.batch_size % process_count:
    raise ValueError(
      f"--batch_size={config.batch_size} must be divisible by "
      f"the number of processes {process_count}."
    )
  seq = axes.get(mesh_lib.SEQ, 1)
  if config.seq_len % seq:
    raise ValueError(
      f"--seq_len={config.seq_len} must be divisible by the "
      f"mesh's {mesh_lib.SEQ} axis ({seq})."
    )
  runner_lib.make_runner(
    config, jax.sharding.AbstractMesh(tuple(axes.values()), tuple(axes))
  )
  return axes


def _init_or_restore(
  config, optimizer, mesh, manager, runner: runner_lib.StepRunner
):
  """The sharded state: restored from the latest complete checkpoint, if any.

  A checkpoint holds the state in the `models.init` param layout; it is read
  in that layout and mapped to the runner's (`runner_lib.relayout_state`).

  Returns:
    `(state, state_shardings)` in the runner's param layout; the shardings
    follow the partition rules (`parallel.param_shardings`), optimiser
    moments like their params.
  """

  def init_state(key):
    k_params, k_train = jax.random.split(key)
    params = models.init(k_params, config.model)
    return state_lib.init_train_state(params, optimizer, k_train)

  def init_runner_state(key):
    return runner_lib.relayout_state(runner.to_layout, init_state(key))

  key = jax.random.key(config.seed)
  shardings = parallel.param_shardings(
    jax.eval_shape(init_runner_state, key), mesh
  )
  if manager is None or manager.latest_step() is None:
    return parallel.init_sharded(init_runner_state, key, mesh), shardings
  abstract_state = jax.eval_shape(init_state, key)
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract_state,
    parallel.param_shardings(abstract_state, mesh),
  )
  saved_state, metadata = manager.restore(None, target)
  state = jax.device_put(
    runner_lib.relayout_state(runner.to_layout, saved_state), shardings
  )
  saved = metadata.get("model_config")
  if saved is not None and saved != config.model.to_dict():
    raise ValueError(
      f"--workdir={config.workdir!r} holds checkpoints of a different model "
      f"config; use a fresh --workdir. Saved: {saved}"
    )
  logging.info("Resumed %s from step %d.", config.workdir, int(state.step))
  return state, shardings


def _kept(last_checkpoint) -> str:
  if last_checkpoint is None:
    return "no checkpoint was written"
  return f"the last good checkpoint (step {last_checkpoint}) is intact"


def _check_finite(step: int, values: dict, last_checkpoint) -> None:
  """Raises NonFiniteLossError if the loss or gradient norm is not finite."""
  for name in ("loss", "grad_norm"):
    if not math.isfinite(values[name]):
      raise NonFiniteLossError(
        f"{name} is {values[name]} at step {step}: training stopped; "
        f"{_kept(last_checkpoint)}."
      )


@jax.jit
def _params_finite(params):
  return jnp.all(
    jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
  )


def train(config: TrainConfig) -> TrainResult:
  """Runs (or resumes) training to `config.steps`.

  Args:
    config: the run; validated with `validate` first.

  Returns:
    `TrainResult` with the final state and the metric rows written.

  Raises:
    ValueError: invalid configuration (before anything compiles).
    NonFiniteLossError: a step's loss or gradient norm is NaN / Inf; the
      offending state is not saved.
    WorkdirError: another run holds `config.workdir`, or it cannot be
      written.
  """
  validate(config, jax.device_count(), jax.process_count())
  if jax.process_index() != 0:  # process 0 holds the lock for the run
    return _train(config)
  with lock_workdir(config.workdir):
    return _train(config)


def _train(config: TrainConfig) -> TrainResult:
  """`train` of a validated config (under the workdir lock on process 0)."""
  mesh = parallel.make_mesh(config.mesh or None)
  dataset = data_lib.make_dataset(
    config.data,
    seq_len=config.seq_len,
    global_batch_size=config.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  if dataset.vocab_size > config.model.vocab_size:
    raise ValueError(
      f"--data={config.data!r} has vocab_size "
      f"{dataset.vocab_size} > the model's vocab_size "
      f"{config.model.vocab_size}."
    )
  optimizer = optim_lib.make_optimizer(config.optim)
  manager = None
  if config.checkpoint_every:
    manager = checkpoint.CheckpointManager(
      os.path.join(config.workdir, CHECKPOINT_DIR), keep=config.keep_checkpoints
    )
  runner = runner_lib.make_runner(config, mesh)
  logging.info("Step runner: %s", runner.metadata)
  state, shardings = _init_or_restore(config, optimizer, mesh, manager, runner)
  batch_sharding = parallel.batch_sharding(mesh)
  train_step = parallel.shard_step(
    step_lib.make_train_step(
      optimizer, optim_lib.learning_rate(config.optim), runner.grad_fn
    ),
    mesh,
    shardings,
    batch_sharding,
  )

  start = int(jax.device_get(state.step))
  position = int(jax.device_get(state.data_position))
  last_checkpoint = start if manager is not None and start else None
  writer = metrics_lib.MetricWriter(
    config.workdir,
    total_steps=config.steps,
    tokens_per_step=config.batch_size * config.seq_len,
    start_step=start,
    tensorboard=config.tensorboard,
  )
  history = []

  def finish(step, device_metrics):
    """Fetches a dispatched step's metrics, checks them, logs when due."""
    logged = step % config.log_every == 0 or step in (start + 1, config.steps)
    if logged:
      values = metrics_lib.fetch(device_metrics)
    else:
      values = metrics_lib.fetch(
        {k: device_metrics[k] for k in ("loss", "grad_norm")}
      )
    _check_finite(step, values, last_checkpoint)
    if logged:
      history.append(writer.write(step, values))

  metadata = {
    "model_config": config.model.to_dict(),
    "flags": config.flags,
    "runner": runner.metadata,
  }
  pending = None  # (step, device metrics) dispatched, not yet checked
  to_save = None  # (step, host snapshot, data position) awaiting its check

  def save_checked(step_checked):
    """Saves the snapshot once `step_checked` (its successor) is finite."""
    nonlocal to_save, last_checkpoint
    if to_save is not None and to_save[0] == step_checked - 1:
      step, snap, at = to_save
      manager.save(step, snap, dict(metadata, data_position=at))
      last_checkpoint, to_save = step, None

  try:
    for step in range(start + 1, config.steps + 1):
      batch = jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding, x),
        dataset.batch(position),
      )
      position += 1
      state, device_metrics = train_step(state, batch)
      if pending is not None:
        finish(*pending)
        save_checked(pending[0])
      pending = (step, device_metrics)
      if manager is not None and (
        step % config.checkpoint_every == 0 or step == config.steps
      ):
        # The state after `step` is saved once step + 1 (its loss and
        # gradient) is finite; the last one once its params are finite.
        finish(*pending)
        save_checked(step)
        pending = None
        to_save = (
          step,
          checkpoint.snapshot(
            runner_lib.relayout_state(runner.from_layout, state)
          ),
          position,
        )
    if pending is not None:
      finish(*pending)
      save_checked(pending[0])
    if to_save is not None:
      if not bool(_params_finite(state.params)):
        raise NonFiniteLossError(
          f"the params after step {to_save[0]} are not finite: training "
          f"stopped; {_kept(last_checkpoint)}."
        )
      save_checked(to_save[0] + 1)
  finally:
    writer.close()
  return TrainResult(state=state, history=history)


def model_config_from_metadata(metadata: dict) -> models.ModelConfig:
  """The `ModelConfig` saved as a JSON dict (tuples stored as lists)."""
  saved = metadata.get("model_config")
  if not isinstance(saved, dict):
    raise ValueError(
      'The checkpoint metadata has no "model_config" dict; '
      "was it written by tools/train.py?"
    )
  return models.ModelConfig.from_dict(saved)


def load_model(workdir, step: int | None = None):
  """Params and config of a checkpoint written by the training loop.

  The saved tree is the train state; its "params" subtree is matched leaf by
  leaf (shapes checked) against `models.init`'s structure for the saved
  config; `train` saves them in that layout whatever its runner. A
  checkpoint whose metadata has a "pipeline" entry (`{"stages", "repeats"}`)
  holds stage-stacked params (`pipeline.to_pipeline_params`): they are
  matched in that layout and returned unstacked.

  Returns:
    `(params, cfg, step)`: params in the `models.init` layout.
  """
  manager = checkpoint.CheckpointManager(os.path.join(workdir, CHECKPOINT_DIR))
  tree, metadata = manager.restore(step, None)
  cfg = model_config_from_metadata(metadata)
  stacking = metadata.get("pipeline")

  def init(key):
    params = models.init(key, cfg)
    if stacking is None:
      return params
    return pipeline.to_pipeline_params(
      params, stacking["stages"], stacking["repeats"]
    )

  abstract = jax.eval_shape(init, jax.random.key(0))
  if not isinstance(tree, dict) or "params" not in tree:
    raise ValueError(f"The checkpoint in {workdir} holds no 'params' subtree.")
  leaves = jax.tree.leaves(tree["params"])
  want = jax.tree.leaves(abstract)
  if [np.shape(x) for x in leaves] != [x.shape for x in want]:
    raise ValueError(
      f"The params in {workdir} do not match the saved model_config."
    )
  params = jax.tree.unflatten(
    jax.tree.structure(abstract),
    [jnp.asarray(x, w.dtype) for x, w in zip(leaves, want, strict=True)],
  )
  if stacking is not None:
    params = pipeline.from_pipeline_params(params)
  return params, cfg, int(tree.get("step", -1))
