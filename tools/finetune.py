"""Fine-tunes a tools/train.py run with LoRA or QLoRA (docs/adapt.md).

  python -m tools.train --workdir=/tmp/base --steps=300
  python -m tools.finetune --base=/tmp/base --method=qlora --data=mqar \
      --steps=100 --workdir=/tmp/ft --export=/tmp/ft_merged
  python -m tools.generate --workdir=/tmp/ft_merged

The base run's latest checkpoint and model config are the frozen base; the
run trains adapters only and is a `training.train` run in every other way:
`<workdir>/{config.json, checkpoints/, metrics.jsonl}`, resumed when rerun
(the same rules as tools/train.py), evaluated every --eval_every steps.
`--export` writes the merged model (base + scaled adapter products, NF4
dequantised) as a run directory that tools/generate.py loads. A bad flag
prints one `error:` line and exits with status 2 before anything compiles.
"""

from absl import app
from absl import flags
import jax

from lightning_jax import adapt
from lightning_jax import training
from lightning_jax.adapt import finetune
from lightning_jax.adapt import lora
from tools import cli

_BASE = flags.DEFINE_string("base", None, "The tools/train.py run to adapt.")
_METHOD = flags.DEFINE_enum(
  "method",
  "lora",
  ["full", "lora", "qlora"],
  "Full fine-tuning, LoRA, or LoRA over an NF4 base.",
)
_LORA_RANK = flags.DEFINE_integer("lora_rank", 8, "Adapter rank r.")
_LORA_ALPHA = flags.DEFINE_float(
  "lora_alpha", 16.0, "The adapters' product is scaled by alpha / r."
)
_TARGETS = {
  "attention": adapt.ATTENTION,
  "mixer": adapt.MIXER,
  "mlp": adapt.MLP,
}
_LORA_TARGETS = flags.DEFINE_list(
  "lora_targets",
  ["attention", "mlp"],
  f"Matrices with adapters: {sorted(_TARGETS)} or regular expressions over "
  "leaf names (e.g. 'layers/0/mixer/wq').",
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "The fine-tuning run's directory."
)
_DATA = flags.DEFINE_string(
  "data", "corpus", "Data to fine-tune on (tools/train.py's --data)."
)
_STEPS = flags.DEFINE_integer("steps", 100, "Optimiser steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate of the adapters.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the adapters and the data.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh (no pipe axis).")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
  "checkpoint_every", 50, "Save every N steps and at the end; 0 disables."
)
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Metrics every N steps.")
_EVAL_EVERY = flags.DEFINE_integer(
  "eval_every", 50, "Validation every N steps and at the last; 0 disables."
)
_EXPORT = flags.DEFINE_string(
  "export", None, "Write the merged model here (a loadable run directory)."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  "allow_config_change", False, "Resume with changed training flags."
)

_FLAG_NAMES = (
  "base",
  "method",
  "lora_rank",
  "lora_alpha",
  "lora_targets",
  "workdir",
  "data",
  "steps",
  "batch_size",
  "seq_len",
  "lr",
  "seed",
  "mesh",
  "checkpoint_every",
  "log_every",
  "eval_every",
  "export",
)
_RESUMED = frozenset(_FLAG_NAMES) - {"workdir", "export"}
_FROZEN = frozenset(
  {
    "base",
    "method",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "data",
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "seed",
  }
)


def lora_config() -> lora.LoraConfig:
  """The `LoraConfig` of the flags."""
  targets = tuple(_TARGETS.get(t, t) for t in _LORA_TARGETS.value)
  return lora.LoraConfig(
    targets=targets, rank=_LORA_RANK.value, alpha=_LORA_ALPHA.value
  )


def build(base_params, model_cfg):
  """`(TrainConfig, Adapter)` of the flags; ValueError on a bad flag."""
  if _METHOD.value == "full":
    adapter = finetune.full_adapter(base_params)
  else:
    adapter = finetune.lora_adapter(
      base_params, lora_config(), model_cfg, quantize=_METHOD.value == "qlora"
    )
  config = training.TrainConfig(
    model=model_cfg,
    workdir=_WORKDIR.value,
    steps=_STEPS.value,
    batch_size=_BATCH_SIZE.value,
    seq_len=_SEQ_LEN.value,
    seed=_SEED.value,
    data=_DATA.value,
    mesh=_MESH.value,
    checkpoint_every=_CHECKPOINT_EVERY.value,
    log_every=_LOG_EVERY.value,
    eval_every=_EVAL_EVERY.value,
    optim=training.OptimConfig(
      lr=_LR.value,
      total_steps=_STEPS.value,
      warmup_steps=training.default_warmup_steps(_STEPS.value),
      weight_decay=0.0,
    ),
    flags={name: flags.FLAGS[name].value for name in _FLAG_NAMES},
  )
  training.validate(config, jax.device_count(), jax.process_count())
  return config, adapter


def _summary(state) -> str:
  """Trainable parameters and optimiser-state bytes of the final state."""
  params = state.params
  trainable = params if _METHOD.value == "full" else params[lora.LORA]
  count = sum(x.size for x in jax.tree.leaves(trainable))
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  return f"{count:,} trainable params, {opt_bytes:,} optimiser-state bytes"


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  try:
    if not _WORKDIR.value:
      raise ValueError("--workdir is required.")
    cli.resume_from_workdir(
      _WORKDIR.value,
      _RESUMED,
      _FROZEN,
      allow_change=_ALLOW_CONFIG_CHANGE.value,
    )
    if not _BASE.value:
      raise ValueError("--base (a tools/train.py run directory) is required.")
    try:
      base, model_cfg, base_step = training.load_model(_BASE.value)
    except training.CheckpointError as e:
      raise ValueError(f"--base={_BASE.value!r}: {e}") from None
    config, adapter = build(base, model_cfg)
  except ValueError as e:
    cli.fail(e)
  except training.WorkdirError as e:
    cli.fail(e)
  print(
    f"{_METHOD.value} on {_BASE.value} (step {base_step}), rank "
    f"{_LORA_RANK.value}, targets {','.join(_LORA_TARGETS.value)}: "
    f"{config.steps} steps on {config.data}, workdir {config.workdir}",
    flush=True,
  )
  try:
    result = training.train(config, adapter=adapter)
  except ValueError as e:
    cli.fail(e)
  except (training.NonFiniteLossError, training.WorkdirError) as e:
    cli.fail(e, 1)
  if result.history:
    last = result.history[-1]
    print(
      f"step {last['step']}: loss {last['loss']:.4f}; {_summary(result.state)}",
      flush=True,
    )
  if _EXPORT.value and not result.preempted:
    merged = adapter.to_model(result.state.params)
    finetune.export(_EXPORT.value, merged, model_cfg, int(result.state.step))
    print(f"merged model: {_EXPORT.value}", flush=True)


if __name__ == "__main__":
  app.run(main)
