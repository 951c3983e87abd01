"""The training loop: mesh, init or restore, steps, metrics, checkpoints.

`train(config)` is what `tools/train.py` runs. Flow per step `t`: read batch
`t` on the host (a pure function of the seed and the data position), dispatch
the jitted step, then fetch step t-1's metrics (the device already has step t
queued, so logging never stalls it). Every `checkpoint_every` steps the state
is copied to the host and saved once the next step's loss and gradient
(computed from its params) are finite, the run's last state once its params
are: a checkpoint never holds params whose loss is NaN or Inf.

How the step runs on the mesh (sequential, gradient accumulation, a
pipeline schedule or CO2) is one `training.runner.StepRunner`, chosen once;
checkpoints hold the state in the `models.init` param layout whichever runner
wrote it, so a run resumes on any mesh; CO2's hold its replica-stacked state
(the replicas differ mid-round), so it resumes on the same data size.

Around the steps: the step is compiled ahead of time (its compile time is
logged once, as `compile_s` of the first row, and left out of `step_time`);
every `eval_every` steps and at the last step the params are evaluated on
the validation split (`eval/loss`, `eval/perplexity`, `eval/accuracy` in that
step's row); `profile_steps` wraps steps in a `jax.profiler` trace; SIGTERM
(or, multi-process, jax's preemption sync point) stops the run at the next
step boundary with a checkpoint (`TrainResult.preempted`).
"""

import dataclasses
import math
import os
import signal
import threading
import time
from typing import Any, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from lightning_jax import models
from lightning_jax import parallel
from lightning_jax.parallel import mesh as mesh_lib
from lightning_jax.parallel import pipeline
from lightning_jax.training import checkpoint
from lightning_jax.training import co2 as co2_lib
from lightning_jax.training import data as data_lib
from lightning_jax.training import loss as loss_lib
from lightning_jax.training import metrics as metrics_lib
from lightning_jax.training import optim as optim_lib
from lightning_jax.training import runner as runner_lib
from lightning_jax.training import state as state_lib
from lightning_jax.training import workdir as workdir_lib

CHECKPOINT_DIR = "checkpoints"
PROFILE_DIR = "profile"
# Dense bf16 peak TFLOP/s per device, for MFU (vendors' data sheets).
PEAK_TFLOPS = {
  "NVIDIA H100 80GB HBM3": 989.0,
  "NVIDIA H200": 989.0,
  "NVIDIA A100-SXM4-80GB": 312.0,
  "NVIDIA A100-SXM4-40GB": 312.0,
  "TPU v4": 275.0,
  "TPU v5 lite": 197.0,
  "TPU v5": 459.0,
  "TPU v6 lite": 918.0,
}


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm of a step is NaN or Inf."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run.

  Attributes:
    model: the `models.ModelConfig`; its `vocab_size` must cover the data's.
    workdir: run directory (local): `run.lock`, `config.json`,
      `checkpoints/`, `metrics.jsonl`.
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
      Saves are asynchronous: the state is copied to the host and written
      in the background while training goes on.
    checkpoint_dir: where checkpoints go: a local path or a tensorstore
      kvstore URL (`gs://bucket/run/ckpt/`); None: `<workdir>/checkpoints`.
    metrics_dir: where `metrics.jsonl` goes: a local path or a kvstore URL;
      None: the workdir.
    keep_checkpoints: complete checkpoints to keep.
    log_every: write metrics every this many steps (and at steps 1 and last).
    optim: `OptimConfig`.
    loss: `LossConfig`.
    eval_every: evaluate on the validation split every this many steps
      and at the last step; 0 disables.
    eval_batches: validation batches per evaluation (the same batches
      `0 .. eval_batches - 1` each time).
    profile_steps: `(first, count)`: trace steps `first .. first + count -
      1` with `jax.profiler` into `<workdir>/profile`; None: no trace.
    peak_tflops: peak TFLOP/s of one device, for `mfu`; None: from
      `PEAK_TFLOPS` by device kind, else no `mfu`.
    tensorboard: also write TensorBoard scalars and histograms (needs
      tensorboardX).
    flags: JSON-serialisable record of how the run was launched, saved in
      the checkpoint metadata and `config.json`.
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
  checkpoint_dir: str | None = None
  metrics_dir: str | None = None
  keep_checkpoints: int = 3
  log_every: int = 10
  optim: optim_lib.OptimConfig = optim_lib.OptimConfig()
  loss: loss_lib.LossConfig = loss_lib.LossConfig()
  eval_every: int = 0
  eval_batches: int = 4
  profile_steps: tuple[int, int] | None = None
  peak_tflops: float | None = None
  tensorboard: bool = False
  flags: dict = dataclasses.field(default_factory=dict)


class TrainResult(NamedTuple):
  """What `train` returns.

  Attributes:
    state: the final `TrainState` (sharded over the mesh).
    history: the metric rows logged this run (written by process 0 only).
    preempted: the run stopped early on SIGTERM (or a preemption sync point)
      after saving its state; rerunning resumes it.
  """

  state: state_lib.TrainState
  history: list
  preempted: bool = False


class Adapter(NamedTuple):
  """Trains a transform of a base model instead of its params (`train`'s
  hook for LoRA, QLoRA and MaskLLM fine-tuning, `adapt`).

  Attributes:
    init: `key -> params`, the trained tree (e.g. `{"base": frozen base,
      "lora": adapters}`), built on the host and placed on the mesh.
    to_model: `params -> model params` in the `models.init` layout (the
      merge): evaluation runs the model on it.
    grad_fn: `(GradFn, step) -> GradFn`: the step's gradient over the
      trained tree from the model's (`training.make_train_step`'s hook);
      `step` is the state's optimiser step (a traced int), for transforms
      annealed over the run (MaskLLM's temperature).
    optimizer: `GradientTransformation -> GradientTransformation`, e.g.
      `adapt.freeze_base`.
    shardings: `(abstract params, mesh) -> NamedSharding tree` of the
      trained tree (e.g. `adapt.qlora.shardings` for NF4 leaves).
    metadata: JSON record saved in the checkpoints ("adapter").
  """

  init: Any
  to_model: Any
  grad_fn: Any
  optimizer: Any
  shardings: Any
  metadata: dict


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
  if config.eval_every < 0:
    raise ValueError(
      f"--eval_every must be >= 0 (0 disables), got {config.eval_every}."
    )
  if config.eval_every and config.eval_batches < 1:
    raise ValueError(f"--eval_batches must be >= 1, got {config.eval_batches}.")
  profile = config.profile_steps
  if profile is not None and (
    len(profile) != 2 or not all(isinstance(v, int) and v >= 1 for v in profile)
  ):
    raise ValueError(
      f"--profile_steps must be START,COUNT with positive integers, got "
      f"{profile!r}."
    )
  peak = config.peak_tflops
  if peak is not None and not (math.isfinite(peak) and peak > 0):
    raise ValueError(f"--peak_tflops must be finite and > 0, got {peak}.")
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
  config, optimizer, mesh, manager, runner: runner_lib.StepRunner, adapter
):
  """The sharded state: restored from the latest complete checkpoint, if any.

  A checkpoint holds `runner.to_checkpoint` of the state (the `models.init`
  param layout, or the adapter's tree; "co2"'s replica-stacked state); it is
  read in that layout and mapped back with `runner.from_checkpoint`.

  Returns:
    `(state, state_shardings)` in the runner's param layout; the shardings
    are `runner.state_shardings` (the partition rules,
    `parallel.param_shardings`: optimiser moments like their params), an
    adapter's params its `shardings`.
  """

  def init_runner_state(key):
    k_params, k_train = jax.random.split(key)
    if adapter is None:
      params = models.init(k_params, config.model)
    else:
      params = adapter.init(k_params)
    return runner.init_state(params, optimizer, k_train)

  def state_shardings(abstract, shard_params):
    if adapter is None:
      return shard_params(abstract, mesh)
    rest = shard_params(abstract._replace(params=None), mesh)
    return rest._replace(params=adapter.shardings(abstract.params, mesh))

  key = jax.random.key(config.seed)
  abstract_state = jax.eval_shape(init_runner_state, key)
  shardings = state_shardings(abstract_state, runner.state_shardings)
  if manager is None or manager.latest_step() is None:
    if adapter is None:  # every leaf created in its shards
      state = jax.jit(init_runner_state, out_shardings=shardings)(key)
      return state, shardings
    # A copy: the step donates the state, not the adapter's own arrays.
    state = jax.tree.map(jnp.copy, init_runner_state(key))
    state = jax.device_put(state, shardings)
    return state, shardings
  abstract_saved = jax.eval_shape(
    lambda k: runner.to_checkpoint(init_runner_state(k)), key
  )
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract_saved,
    state_shardings(abstract_saved, runner.state_shardings),
  )
  saved_state, metadata = manager.restore(None, target)
  state = jax.device_put(runner.from_checkpoint(saved_state), shardings)
  saved = metadata.get("model_config")
  if saved is not None and saved != config.model.to_dict():
    raise ValueError(
      f"--workdir={config.workdir!r} holds checkpoints of a different model "
      f"config; use a fresh --workdir. Saved: {saved}"
    )
  logging.info("Resumed %s from step %d.", config.workdir, int(state.step))
  return state, shardings


def checkpoint_dir(config: TrainConfig) -> str:
  """The run's checkpoint directory or URL."""
  return config.checkpoint_dir or os.path.join(config.workdir, CHECKPOINT_DIR)


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


def train(
  config: TrainConfig,
  *,
  dataset: data_lib.Dataset | None = None,
  eval_dataset: data_lib.Dataset | None = None,
  adapter: Adapter | None = None,
) -> TrainResult:
  """Runs (or resumes) training to `config.steps`.

  Args:
    config: the run; validated with `validate` first.
    dataset: where the training batches come from (`training.data.Dataset`:
      `vocab_size` and `batch(step)` of this process's rows); default
      `make_dataset(config.data)`.
    eval_dataset: the validation batches (the same protocol) when
      `config.eval_every` > 0; default the validation split of
      `config.data`, required with a custom `dataset`.
    adapter: train a transform of a base model (`Adapter`: LoRA, QLoRA,
      MaskLLM) instead of `models.init` params; needs a mesh without
      `pipe`.

  Returns:
    `TrainResult` with the final state and the metric rows written.

  Raises:
    ValueError: invalid configuration or dataset (before anything
      compiles).
    NonFiniteLossError: a step's loss or gradient norm is NaN / Inf; the
      offending state is not saved.
    WorkdirError: another run holds `config.workdir`, or it cannot be
      written.

  Example:
    >>> class Zeros:  # any object with this protocol
    ...   vocab_size = 256
    ...   def batch(self, step):
    ...     x = np.zeros((8, 64), np.int32)
    ...     return {"inputs": x, "targets": x, "mask": np.ones((8, 64))}
    >>> train(config, dataset=Zeros(), eval_dataset=Zeros())
  """
  axes = validate(config, jax.device_count(), jax.process_count())
  if adapter is not None and axes.get(mesh_lib.PIPE, 1) > 1:
    raise ValueError(
      f"--mesh={config.mesh!r}: adapters train without a pipe axis."
    )
  if adapter is not None and config.optim.optimizer == optim_lib.CO2:
    raise ValueError(f"--optimizer={optim_lib.CO2}: adapters train without it.")
  dataset, eval_dataset = _datasets(config, dataset, eval_dataset)
  if jax.process_index() != 0:  # process 0 holds the lock for the run
    return _train(config, dataset, eval_dataset, adapter)
  with workdir_lib.lock_workdir(config.workdir):
    workdir_lib.write_run_config(config)
    return _train(config, dataset, eval_dataset, adapter)


def _datasets(config: TrainConfig, dataset, eval_dataset):
  """The run's train and validation datasets, checked against the config."""
  local_batch = config.batch_size // jax.process_count()

  def make(split):
    return data_lib.make_dataset(
      config.data,
      seq_len=config.seq_len,
      global_batch_size=config.batch_size,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      split=split,
    )

  if dataset is None:
    dataset = make("train")
    if config.eval_every and eval_dataset is None:
      eval_dataset = make("validation")
  elif config.eval_every and eval_dataset is None:
    raise ValueError(
      "`eval_dataset` is required with a custom `dataset` when "
      f"eval_every={config.eval_every} (or set eval_every=0)."
    )
  checked = [("dataset", dataset)]
  if config.eval_every:
    checked.append(("eval_dataset", eval_dataset))
  for name, ds in checked:
    data_lib.check_dataset(ds, name, local_batch, config.seq_len)
    if ds.vocab_size > config.model.vocab_size:
      raise ValueError(
        f"--data={config.data!r} ({name}) has vocab_size {ds.vocab_size} > "
        f"the model's vocab_size {config.model.vocab_size}."
      )
  return dataset, eval_dataset


class _StopSignal:
  """Asks the loop to stop at a step boundary on SIGTERM (preemption).

  One process: a SIGTERM handler sets a flag (installed from the main thread
  only; the previous handler comes back on exit). Several processes must
  stop at the same step: jax's preemption sync point decides, when the
  distributed runtime runs its preemption service; otherwise SIGTERM keeps
  its default action.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if (
      jax.process_count() == 1
      and threading.current_thread() is threading.main_thread()
    ):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving and stopping at the next step boundary.")
    self.requested = True

  def due(self, step: int) -> bool:
    """Whether the run stops after `step` (call at every step)."""
    if jax.process_count() == 1:
      return self.requested
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption service: SIGTERM ends the process
      return False


def _peak_flops(config: TrainConfig) -> float | None:
  """FLOP/s of all devices together, or None when the peak is unknown."""
  per_device = config.peak_tflops
  if per_device is None:
    per_device = PEAK_TFLOPS.get(jax.devices()[0].device_kind)
  if per_device is None:
    logging.info(
      "Peak FLOP/s of %r unknown: no mfu (set --peak_tflops).",
      jax.devices()[0].device_kind,
    )
    return None
  return per_device * 1e12 * jax.device_count()


def _make_step(runner, optimizer, optim: optim_lib.OptimConfig, adapter):
  """The runner's train step; with an adapter, over its gradient at the
  state's step (`Adapter.grad_fn`)."""
  schedule = optim_lib.learning_rate(optim)
  if adapter is None:
    return runner.make_step(optimizer, schedule, runner.grad_fn)

  def train_step(state, batch):
    grad_fn = adapter.grad_fn(runner.grad_fn, state.step)
    return runner.make_step(optimizer, schedule, grad_fn)(state, batch)

  return train_step


def _eval_step(config: TrainConfig, to_model, state_shardings, batch_sharding):
  """Jitted `(params, batch) -> sums` of one validation batch; `to_model`
  maps the trained params to the `models.init` layout."""

  def sums(params, batch):
    params = to_model(params)
    logits, _ = models.forward(params, batch["inputs"], config.model)
    hits, count = data_lib.masked_hits(logits, batch)
    ce = models.masked_ce_sum(logits, batch["targets"], batch["mask"])
    return {"ce_sum": ce, "num_targets": count, "hits": hits}

  return jax.jit(
    parallel.traced_on(batch_sharding.mesh, sums),
    in_shardings=(state_shardings.params, batch_sharding),
    out_shardings=jax.sharding.NamedSharding(
      batch_sharding.mesh, jax.sharding.PartitionSpec()
    ),
  )


def _evaluate(eval_step, params, batches) -> dict:
  """`eval/loss`, `eval/perplexity`, `eval/accuracy` over `batches`."""
  totals = [eval_step(params, b) for b in batches]
  host = metrics_lib.fetch(jax.tree.map(lambda *x: sum(x), *totals))
  count = max(host["num_targets"], 1.0)
  loss = host["ce_sum"] / count
  return {
    "eval/loss": loss,
    "eval/perplexity": math.exp(min(loss, 700.0)),
    "eval/accuracy": host["hits"] / count,
  }


def _train(config: TrainConfig, dataset, eval_dataset, adapter) -> TrainResult:
  """`train` of a validated config (under the workdir lock on process 0)."""
  mesh = parallel.make_mesh(config.mesh or None)
  optimizer = optim_lib.make_optimizer(config.optim)
  if adapter is not None:
    optimizer = adapter.optimizer(optimizer)
  manager = None
  if config.checkpoint_every:
    directory = checkpoint_dir(config)
    if jax.process_index() == 0 and "://" not in directory:
      workdir_lib.check_writable(directory, "--checkpoint_dir")  # not later
    manager = checkpoint.CheckpointManager(
      directory, keep=config.keep_checkpoints
    )
  runner = runner_lib.make_runner(config, mesh)
  logging.info("Step runner: %s", runner.metadata)
  state, shardings = _init_or_restore(
    config, optimizer, mesh, manager, runner, adapter
  )
  to_model = runner.from_layout if adapter is None else adapter.to_model
  batch_sharding = parallel.batch_sharding(mesh)

  def device_batch(ds, position):
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding, x),
      ds.batch(position),
    )

  start = int(jax.device_get(state.step))
  position = int(jax.device_get(state.data_position))
  batch = device_batch(dataset, position)
  compile_start = time.perf_counter()
  train_step = (
    parallel.shard_step(
      _make_step(runner, optimizer, config.optim, adapter),
      mesh,
      shardings,
      batch_sharding,
    )
    .lower(state, batch)
    .compile()
  )
  compile_s = time.perf_counter() - compile_start
  flops_per_token = models.flops_per_token(config.model, config.seq_len)
  logging.info(
    "Compiled the train step in %.1f s; %.3g model FLOPs per token.",
    compile_s,
    flops_per_token,
  )
  first_row = {
    "compile_s": compile_s,
    "flops_per_token": flops_per_token,
    **metrics_lib.compiled_memory(train_step),
  }
  eval_step = eval_batches = None
  if config.eval_every:
    eval_step = _eval_step(config, to_model, shardings, batch_sharding)
    eval_batches = [
      device_batch(eval_dataset, i) for i in range(config.eval_batches)
    ]

  last_checkpoint = start if manager is not None and start else None
  writer = metrics_lib.MetricWriter(
    config.metrics_dir or config.workdir,
    total_steps=config.steps,
    tokens_per_step=config.batch_size * config.seq_len,
    start_step=start,
    flops_per_token=flops_per_token,
    peak_flops=_peak_flops(config),
    tensorboard=config.tensorboard,
  )
  history = []

  def paused(fn, *args):
    """Runs `fn(*args)`, leaving its time out of the interval's step_time."""
    begin = time.perf_counter()
    try:
      return fn(*args)
    finally:
      writer.exclude(time.perf_counter() - begin)

  def finish(step, device_metrics, extra):
    """Fetches a dispatched step's metrics, checks them, logs when due."""
    nonlocal first_row, saved
    logged = (
      step % config.log_every == 0
      or step in (start + 1, config.steps)
      or bool(extra)
    )
    if logged:
      values = metrics_lib.fetch(device_metrics)
    else:
      values = metrics_lib.fetch(
        {k: device_metrics[k] for k in ("loss", "grad_norm")}
      )
    _check_finite(step, values, last_checkpoint)
    if logged:
      row = {**values, **extra, **first_row, **saved}
      history.append(writer.write(step, row))
      first_row = saved = {}

  metadata = {
    "model_config": config.model.to_dict(),
    "flags": config.flags,
    "runner": runner.metadata,
  }
  if adapter is not None:
    metadata["adapter"] = adapter.metadata
  pending = None  # (step, device metrics, eval values) not yet checked
  to_save = None  # (step, host snapshot, data position) awaiting its check
  saved = {}  # the last save's figures, for the next metrics row

  def save_checked(step_checked):
    """Saves the snapshot once `step_checked` (its successor) is finite."""
    nonlocal to_save, last_checkpoint, saved
    if to_save is not None and to_save[0] == step_checked - 1:
      step, snap, at = to_save
      begin = time.perf_counter()
      paused(manager.save_async, step, snap, dict(metadata, data_position=at))
      saved = {"checkpoint/stall_s": time.perf_counter() - begin}
      if manager.last_save is not None:  # the previous save, committed
        saved["checkpoint/write_s"] = manager.last_save.write_s
      last_checkpoint, to_save = step, None

  profile = config.profile_steps
  profile_stop = profile and profile[0] + profile[1] - 1
  tracing = False
  preempted = False
  try:
    with _StopSignal() as stop:
      for step in range(start + 1, config.steps + 1):
        if profile and step == profile[0]:
          jax.profiler.start_trace(os.path.join(config.workdir, PROFILE_DIR))
          tracing = True
        state, device_metrics = train_step(state, batch)
        position += 1
        if tracing and step == profile_stop:
          paused(jax.block_until_ready, device_metrics)
          paused(jax.profiler.stop_trace)
          tracing = False
        if pending is not None:
          finish(*pending)
          save_checked(pending[0])
        preempted = stop.due(step) and step < config.steps
        last = step == config.steps or preempted
        extra = {}
        if eval_step is not None and (
          step % config.eval_every == 0 or step == config.steps
        ):
          extra = paused(_evaluate, eval_step, state.params, eval_batches)
        pending = (step, device_metrics, extra)
        if manager is not None and (
          step % config.checkpoint_every == 0 or last
        ):
          # The state after `step` is saved once step + 1 (its loss and
          # gradient) is finite; the last one once its params are finite.
          finish(*pending)
          save_checked(step)
          pending = None
          to_save = (
            step,
            paused(
              checkpoint.snapshot,
              runner.to_checkpoint(state),
            ),
            position,
          )
        if preempted:
          logging.warning("Preempted: stopping after step %d.", step)
          break
        batch = device_batch(dataset, position)
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
    if tracing:
      jax.profiler.stop_trace()
    writer.close()
    if manager is not None:
      manager.close()  # the last save commits before `train` returns
  return TrainResult(state=state, history=history, preempted=preempted)


def save_initial_state(config: TrainConfig, params) -> None:
  """Starts the run of `config` from `params` instead of `models.init`.

  Writes `<workdir>/config.json` and a step-0 checkpoint of the fresh train
  state (`models.init` layout, the optimiser state of `config.optim`), so
  that `train(config)` (tools/train.py on the workdir) resumes it: e.g. an
  upcycled model (tools/upcycle.py).

  Args:
    config: the run's `TrainConfig` (validated).
    params: float32 params in the `models.init` layout of `config.model`.

  Raises:
    ValueError: `params` do not match `config.model`.
    WorkdirError: the workdir already holds a run.
  """
  if workdir_lib.read_run_config(config.workdir) is not None:
    raise workdir_lib.WorkdirError(
      f"--workdir={config.workdir!r} already holds a run; use a fresh one."
    )
  want = jax.eval_shape(lambda: models.init(jax.random.key(0), config.model))
  if jax.tree.map(np.shape, params) != jax.tree.map(lambda x: x.shape, want):
    raise ValueError("`params` do not match `config.model`'s params.")
  optimizer = optim_lib.make_optimizer(config.optim)
  _, k_train = jax.random.split(jax.random.key(config.seed))
  state = state_lib.init_train_state(params, optimizer, k_train)
  os.makedirs(config.workdir, exist_ok=True)
  workdir_lib.write_run_config(config)
  manager = checkpoint.CheckpointManager(
    checkpoint_dir(config), keep=config.keep_checkpoints
  )
  manager.save(
    0,
    state,
    {
      "model_config": config.model.to_dict(),
      "flags": config.flags,
      "data_position": 0,
    },
  )
  manager.close()


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
  matched in that layout and returned unstacked; one whose "runner" is
  "co2" holds `[replicas, ...]` params, returned as the replicas' mean.

  The checkpoints are read from the run's `checkpoint_dir` (its
  `config.json`), by default `<workdir>/checkpoints`.

  Returns:
    `(params, cfg, step)`: params in the `models.init` layout.
  """
  record = workdir_lib.read_run_config(workdir) or {}
  directory = record.get("train", {}).get("checkpoint_dir")
  manager = checkpoint.CheckpointManager(
    directory or os.path.join(workdir, CHECKPOINT_DIR)
  )
  tree, metadata = manager.restore(step, None)
  cfg = model_config_from_metadata(metadata)
  stacking = metadata.get("pipeline")
  runner = metadata.get("runner", {})
  replicas = (
    runner.get("replicas") if runner.get("kind") == runner_lib.CO2 else None
  )

  def init(key):
    params = models.init(key, cfg)
    if replicas is not None:
      return co2_lib.stack_replicas(params, replicas)
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
  if replicas is not None:
    params = co2_lib.replica_mean(params)
  return params, cfg, int(tree.get("step", -1))
