"""Trains a language model: the main job of lightning_jax.

  python -m tools.train          # tiny-hybrid on the embedded corpus
  python -m tools.train --model=moe-hybrid --steps=2000 --batch_size=32 \
      --override=d_model=256,num_layers=8 --workdir=/tmp/moe
  JAX_NUM_CPU_DEVICES=8 python -m tools.train --mesh=data=2,fsdp=2,tensor=2

Writes `<workdir>/config.json`, `<workdir>/checkpoints/` (resumed from
automatically) and `<workdir>/metrics.jsonl`; `python -m tools.plot
--workdir=...` draws the loss curve. Rerunning on a workdir resumes it: flags
not given take the workdir's values (`config.json`), and changing one that
changes what is trained is refused unless --allow_config_change (--steps may
grow). SIGTERM saves at the next step boundary and exits with status 0.
Flags are checked before anything compiles: a bad one prints one `error:`
line and exits with status 2. docs/training.md lists every flag.
"""

from absl import app
from absl import flags
import jax

from lightning_jax import models
from lightning_jax import parallel
from lightning_jax import training
from tools import cli

_MODEL = flags.DEFINE_string(
  "model", "tiny-hybrid", "Model preset (models.preset_names())."
)
_OVERRIDE = flags.DEFINE_multi_string(
  "override",
  [],
  "Preset fields to override, `field=value[,field=value...]`, e.g. "
  "`--override=d_model=128,num_layers=4`; repeatable. A comma followed by "
  "text without `=` continues the previous value (lists).",
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Run directory (checkpoints, metrics.jsonl); default "
  "/tmp/lightning_jax/<model>. An existing run there is resumed.",
)
_STEPS = flags.DEFINE_integer("steps", 200, "Optimiser steps of the run.")
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", 16, "Global batch size (sequences per step)."
)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
_WARMUP_STEPS = flags.DEFINE_integer(
  "warmup_steps", None, "Linear warmup steps; default min(100, steps / 10)."
)
_WEIGHT_DECAY = flags.DEFINE_float(
  "weight_decay", 0.1, "AdamW decoupled weight decay (>= 2-D weights)."
)
_CLIP_NORM = flags.DEFINE_float(
  "clip_norm", 1.0, "Global gradient-norm clip; 0 disables."
)
_OPTIMIZER = flags.DEFINE_enum(
  "optimizer",
  "adamw",
  list(training.OPTIMIZERS),
  "adamw, galore (Adam on low-rank gradient projections), or co2 (local "
  "AdamW steps on each data replica, a stale outer step every "
  "--co2_local_steps).",
)
_GALORE_RANK = flags.DEFINE_integer(
  "galore_rank", None, "GaLore projection rank; default 32."
)
_GALORE_UPDATE_GAP = flags.DEFINE_integer(
  "galore_update_gap", None, "GaLore: steps between SVDs; default 200."
)
_GALORE_SCALE = flags.DEFINE_float(
  "galore_scale", None, "GaLore: scale of the projected updates; default 0.25."
)
_CO2_LOCAL_STEPS = flags.DEFINE_integer(
  "co2_local_steps", None, "CO2: local steps per round (tau); default 4."
)
_CO2_OUTER_LR = flags.DEFINE_float(
  "co2_outer_lr", None, "CO2: outer learning rate (eta); default 1."
)
_CO2_OUTER_MOMENTUM = flags.DEFINE_float(
  "co2_outer_momentum", None, "CO2: outer momentum (beta) in [0, 1); default 0."
)
_CO2_GAP_PENALTY = flags.DEFINE_float(
  "co2_gap_penalty",
  None,
  "CO2: staleness-gap penalty lambda (m += delta / lambda); default 1.",
)
_CO2_CLIP = flags.DEFINE_float(
  "co2_clip",
  None,
  "CO2: clip the outer momentum to [-phi, phi]; 0 (default) disables.",
)
_CO2_STALENESS = flags.DEFINE_integer(
  "co2_staleness",
  None,
  "CO2: 1 (default) applies each round's average one round later, its "
  "all-reduce overlapping the next round; 0 at once.",
)
_LBL_COEF = flags.DEFINE_float(
  "lbl_coef", 0.01, "Weight of each MoE layer's load-balancing loss."
)
_Z_COEF = flags.DEFINE_float(
  "z_coef", 1e-3, "Weight of each MoE layer's router z-loss."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of params, steps and data.")
_DATA = flags.DEFINE_string(
  "data",
  "corpus",
  "'corpus' (embedded, byte-level), 'mqar' (synthetic "
  "associative recall), or a path: text file, directory of text files, "
  ".npy token array or tensorstore zarr directory.",
)
_MESH = flags.DEFINE_string(
  "mesh",
  "",
  "Mesh, e.g. 'data=2,fsdp=2,tensor=2' (axes data, fsdp, "
  "tensor, expert, pipe, seq); default: every device on 'data'.",
)
_MICROBATCHES = flags.DEFINE_integer(
  "microbatches",
  1,
  "Gradient-accumulation steps when the mesh has pipe == "
  "1; pipeline microbatches when pipe > 1.",
)
_PIPELINE_SCHEDULE = flags.DEFINE_enum(
  "pipeline_schedule",
  "gpipe",
  ["gpipe", "circular", "1f1b"],
  "Pipeline schedule when the mesh has pipe > 1 (docs/pipeline.md).",
)
_PIPELINE_REPEATS = flags.DEFINE_integer(
  "pipeline_repeats", 1, "Virtual stages per pipe device (circular: >= 2)."
)
_CHECKPOINT_EVERY = flags.DEFINE_integer(
  "checkpoint_every", 100, "Save every N steps and at the end; 0 disables."
)
_CHECKPOINT_DIR = flags.DEFINE_string(
  "checkpoint_dir",
  None,
  "Checkpoint directory: a path or a tensorstore URL (gs://bucket/run/); "
  "default <workdir>/checkpoints.",
)
_METRICS_DIR = flags.DEFINE_string(
  "metrics_dir",
  None,
  "Directory of metrics.jsonl: a path or a tensorstore URL; default <workdir>.",
)
_KEEP_CHECKPOINTS = flags.DEFINE_integer(
  "keep_checkpoints", 3, "Complete checkpoints to keep."
)
_LOG_EVERY = flags.DEFINE_integer(
  "log_every", 10, "Write metrics every N steps (and at the first and last)."
)
_EVAL_EVERY = flags.DEFINE_integer(
  "eval_every",
  100,
  "Evaluate on the validation split every N steps and at the last; 0 disables.",
)
_EVAL_BATCHES = flags.DEFINE_integer(
  "eval_batches", 4, "Validation batches per evaluation."
)
_PROFILE_STEPS = flags.DEFINE_string(
  "profile_steps",
  None,
  "START,COUNT: trace steps START..START+COUNT-1 with jax.profiler into "
  "<workdir>/profile (TensorBoard's profile plugin, Perfetto).",
)
_PEAK_TFLOPS = flags.DEFINE_float(
  "peak_tflops",
  None,
  "Peak TFLOP/s of one device, for the mfu metric; default from the "
  "device kind (GPUs, TPUs), none on CPU.",
)
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
  "compilation_cache_dir",
  None,
  "Persistent XLA compilation cache: a rerun of the same program loads it "
  "instead of compiling.",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume a workdir with training flags changed from its config.json.",
)
_TENSORBOARD = flags.DEFINE_bool(
  "tensorboard",
  False,
  "Also write TensorBoard scalars to <workdir>/"
  "tensorboard (pip install -e '.[tensorboard]').",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Processes of a multi-process run."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index in a multi-process run."
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Join a multi-process run with the cluster's "
  "auto-detected settings (TPU pods, Slurm, Open MPI): no need for the "
  "three flags above.",
)

_FLAG_NAMES = (
  "model",
  "override",
  "workdir",
  "steps",
  "batch_size",
  "seq_len",
  "lr",
  "warmup_steps",
  "weight_decay",
  "clip_norm",
  "optimizer",
  "galore_rank",
  "galore_update_gap",
  "galore_scale",
  "co2_local_steps",
  "co2_outer_lr",
  "co2_outer_momentum",
  "co2_gap_penalty",
  "co2_clip",
  "co2_staleness",
  "lbl_coef",
  "z_coef",
  "seed",
  "data",
  "mesh",
  "microbatches",
  "pipeline_schedule",
  "pipeline_repeats",
  "checkpoint_every",
  "checkpoint_dir",
  "metrics_dir",
  "keep_checkpoints",
  "log_every",
  "eval_every",
  "eval_batches",
  "profile_steps",
  "peak_tflops",
  "compilation_cache_dir",
  "tensorboard",
  "coordinator_address",
  "num_processes",
  "process_id",
  "distributed",
)
# What a rerun on a workdir takes from its config.json when not given, and
# which of those change what is trained (refused unless
# --allow_config_change; --steps may grow).
RESUMED = frozenset(_FLAG_NAMES) - {
  "workdir",
  "profile_steps",
  "coordinator_address",
  "num_processes",
  "process_id",
  "distributed",
}
FROZEN = frozenset(
  {
    "model",
    "override",
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "warmup_steps",
    "weight_decay",
    "clip_norm",
    "optimizer",
    "galore_rank",
    "galore_update_gap",
    "galore_scale",
    "co2_local_steps",
    "co2_outer_lr",
    "co2_outer_momentum",
    "co2_gap_penalty",
    "co2_clip",
    "co2_staleness",
    "lbl_coef",
    "z_coef",
    "seed",
    "data",
  }
)


def model_config(preset: str, overrides: dict[str, str], vocab_size: int):
  """The preset's `ModelConfig` with `overrides` (strings) applied; the
  vocabulary follows the data unless overridden."""
  overrides = {"vocab_size": str(vocab_size), **overrides}
  return training.apply_overrides(models.get_preset(preset), overrides)


def _data_vocab_size() -> int:
  """Vocabulary of --data (checked before any compile)."""
  return training.data.make_dataset(
    _DATA.value,
    seq_len=_SEQ_LEN.value,
    global_batch_size=_BATCH_SIZE.value,
    seed=_SEED.value,
  ).vocab_size


def _workdir() -> str:
  return _WORKDIR.value or f"/tmp/lightning_jax/{_MODEL.value}"


def _profile_steps() -> tuple[int, int] | None:
  """--profile_steps as (start, count)."""
  if _PROFILE_STEPS.value is None:
    return None
  try:
    start, count = (int(v) for v in _PROFILE_STEPS.value.split(","))
  except ValueError:
    raise ValueError(
      f"--profile_steps must be START,COUNT, got {_PROFILE_STEPS.value!r}."
    ) from None
  return start, count


def _options(optimizer: str, config_cls, fields):
  """`config_cls` of the given flags when --optimizer=`optimizer` or one of
  them is given (`OptimConfig` refuses the latter with another optimizer);
  flags left unset take `config_cls`'s defaults. `fields`: (field, flag)."""
  given = {
    field: flag.value for field, flag in fields if flag.value is not None
  }
  if not given and _OPTIMIZER.value != optimizer:
    return None
  return config_cls(**given)


def _galore_config() -> training.GaLoreConfig | None:
  """GaLore's config of the --galore_* flags (`_options`)."""
  return _options(
    "galore",
    training.GaLoreConfig,
    (
      ("rank", _GALORE_RANK),
      ("update_gap", _GALORE_UPDATE_GAP),
      ("scale", _GALORE_SCALE),
    ),
  )


def _co2_config() -> training.CO2Config | None:
  """CO2's config of the --co2_* flags (`_options`)."""
  return _options(
    "co2",
    training.CO2Config,
    (
      ("local_steps", _CO2_LOCAL_STEPS),
      ("outer_lr", _CO2_OUTER_LR),
      ("outer_momentum", _CO2_OUTER_MOMENTUM),
      ("gap_penalty", _CO2_GAP_PENALTY),
      ("clip", _CO2_CLIP),
      ("staleness", _CO2_STALENESS),
    ),
  )


def build_config() -> training.TrainConfig:
  """The `TrainConfig` of the flags, validated; ValueError on a bad flag."""
  for name, flag in (
    ("steps", _STEPS),
    ("batch_size", _BATCH_SIZE),
    ("seq_len", _SEQ_LEN),
  ):
    if flag.value < 1:
      raise ValueError(f"--{name} must be >= 1, got {flag.value}.")
  model = model_config(
    _MODEL.value, training.parse_overrides(_OVERRIDE.value), _data_vocab_size()
  )
  warmup = _WARMUP_STEPS.value
  if warmup is None:  # recorded, so that a resume with more steps keeps it
    warmup = flags.FLAGS.warmup_steps = training.default_warmup_steps(
      _STEPS.value
    )
  config = training.TrainConfig(
    model=model,
    workdir=_workdir(),
    steps=_STEPS.value,
    batch_size=_BATCH_SIZE.value,
    seq_len=_SEQ_LEN.value,
    seed=_SEED.value,
    data=_DATA.value,
    mesh=_MESH.value,
    microbatches=_MICROBATCHES.value,
    pipeline_schedule=_PIPELINE_SCHEDULE.value,
    pipeline_repeats=_PIPELINE_REPEATS.value,
    checkpoint_every=_CHECKPOINT_EVERY.value,
    checkpoint_dir=_CHECKPOINT_DIR.value,
    metrics_dir=_METRICS_DIR.value,
    keep_checkpoints=_KEEP_CHECKPOINTS.value,
    log_every=_LOG_EVERY.value,
    optim=training.OptimConfig(
      lr=_LR.value,
      total_steps=_STEPS.value,
      warmup_steps=warmup,
      weight_decay=_WEIGHT_DECAY.value,
      clip_norm=_CLIP_NORM.value,
      optimizer=_OPTIMIZER.value,
      galore=_galore_config(),
      co2=_co2_config(),
    ),
    loss=training.LossConfig(lbl_coef=_LBL_COEF.value, z_coef=_Z_COEF.value),
    eval_every=_EVAL_EVERY.value,
    eval_batches=_EVAL_BATCHES.value,
    profile_steps=_profile_steps(),
    peak_tflops=_PEAK_TFLOPS.value,
    tensorboard=_TENSORBOARD.value,
    flags={name: flags.FLAGS[name].value for name in _FLAG_NAMES},
  )
  training.validate(config, jax.device_count(), jax.process_count())
  return config


def _initialize_distributed() -> None:
  """Joins a multi-process run when asked to (before any device use)."""
  explicit = (
    _COORDINATOR_ADDRESS.value,
    _NUM_PROCESSES.value,
    _PROCESS_ID.value,
  )
  if _DISTRIBUTED.value or any(v is not None for v in explicit):
    parallel.initialize_distributed(*explicit)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  _initialize_distributed()
  if _COMPILATION_CACHE_DIR.value:
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE_DIR.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    cli.resume_from_workdir(
      _workdir(),
      RESUMED,
      FROZEN,
      allow_change=_ALLOW_CONFIG_CHANGE.value,
    )
    config = build_config()
  except ValueError as e:
    cli.fail(e)
  except training.WorkdirError as e:
    cli.fail(e)
  if jax.process_index() == 0:
    mesh = parallel.make_mesh(config.mesh or None)
    print(
      f"training {_MODEL.value}{''.join(f' {o}' for o in _OVERRIDE.value)}"
      f" ({models.num_params(config.model):,} params) on {config.data}: "
      f"{config.steps} steps x {config.batch_size} x {config.seq_len} "
      f"tokens, mesh {dict(mesh.shape)}, workdir {config.workdir}",
      flush=True,
    )
  try:
    result = training.train(config)
  except ValueError as e:  # a configuration error, found before compiling
    cli.fail(e)
  except (training.NonFiniteLossError, training.WorkdirError) as e:
    cli.fail(e, 1)
  if jax.process_index() == 0 and result.preempted:
    saved = (
      f"the state is saved in {config.workdir}; rerun to resume"
      if config.checkpoint_every
      else "nothing saved (--checkpoint_every=0)"
    )
    print(
      f"preempted after step {int(result.state.step)}: {saved}.", flush=True
    )
  elif jax.process_index() == 0 and result.history:
    last = result.history[-1]
    print(
      f"step {last['step']}: loss {last['loss']:.4f} (first logged "
      f"{result.history[0]['loss']:.4f}). Metrics: {config.workdir}/"
      f"metrics.jsonl; loss curve: python -m tools.plot "
      f"--workdir={config.workdir}",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
