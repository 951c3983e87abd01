"""Fine-tunes a tools/train.py run: full, LoRA, QLoRA or MaskLLM 2:4
(docs/adapt.md).

  python -m tools.train --workdir=/tmp/base --steps=300
  python -m tools.finetune --base=/tmp/base --method=qlora --data=mqar \
      --steps=100 --workdir=/tmp/ft --export=/tmp/ft_merged
  python -m tools.finetune --base=/tmp/base --method=mask24 --lr=5e-4 \
      --steps=200 --workdir=/tmp/ft24 --export=/tmp/ft24_sparse
  python -m tools.generate --workdir=/tmp/ft_merged

The base run's latest checkpoint and model config are the base; the run
trains all of it (full), adapters over it frozen (lora, qlora) or 2:4 mask
logits over it frozen (mask24), and is a `training.train` run in every
other way: `<workdir>/{config.json, checkpoints/, metrics.jsonl}`, resumed
when rerun (the same rules as tools/train.py), evaluated every
--eval_every steps (mask24: the hard 2:4 model). `--export` writes the
merged model (base + scaled adapter products, NF4 dequantised) or the
pruned one (2 of every 4 weights kept in the masked matrices) as a run
directory that tools/generate.py loads. A bad flag prints one `error:` line
and exits with status 2 before anything compiles.
"""

from absl import app
from absl import flags
import jax

from lightning_jax import adapt
from lightning_jax import training
from lightning_jax.adapt import finetune
from lightning_jax.adapt import frozen
from lightning_jax.adapt import lora
from lightning_jax.adapt import maskllm
from tools import cli

_BASE = flags.DEFINE_string("base", None, "The tools/train.py run to adapt.")
_METHOD = flags.DEFINE_enum(
  "method",
  "lora",
  ["full", "lora", "qlora", "mask24"],
  "Full fine-tuning, LoRA, LoRA over an NF4 base, or MaskLLM 2:4 masks.",
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
_MASK_TARGETS = flags.DEFINE_list(
  "mask_targets",
  ["attention", "mlp"],
  "mask24: matrices pruned to 2:4, as --lora_targets (not the embedding "
  "or the output layer).",
)
_MASK_TEMPERATURE = flags.DEFINE_list(
  "mask_temperature",
  ["4", "0.05"],
  "mask24: Gumbel-softmax temperature START,END, linear over --steps.",
)
_MASK_LOGIT_SCALE = flags.DEFINE_list(
  "mask_logit_scale",
  ["100", "500"],
  "mask24: logit scale START,END, linear over --steps.",
)
_MASK_PRIOR_STRENGTH = flags.DEFINE_float(
  "mask_prior_strength",
  3.0,
  "mask24: strength of the magnitude 2:4 prior in the initial logits.",
)
_MASK_WEIGHT_REG = flags.DEFINE_float(
  "mask_weight_reg",
  1e-5,
  "mask24: sparse weight regulariser at step 0, decaying to 0.",
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
  "export",
  None,
  "Write the merged (LoRA) or pruned (mask24) model here (a loadable run "
  "directory).",
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
  "mask_targets",
  "mask_temperature",
  "mask_logit_scale",
  "mask_prior_strength",
  "mask_weight_reg",
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
    "mask_targets",
    "mask_temperature",
    "mask_logit_scale",
    "mask_prior_strength",
    "mask_weight_reg",
    "data",
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "seed",
  }
)


def _config(make, fields: dict):
  """`make(**values)` of `fields` `{field: (flag, value)}`; its ValueError
  names the flag instead of the field."""
  try:
    return make(**{field: value for field, (_, value) in fields.items()})
  except ValueError as e:
    message = str(e)
    for field, (flag, _) in fields.items():
      message = message.replace(f"`{field}`", f"--{flag}")
    raise ValueError(message) from None


def _targets(flag) -> tuple[str, ...]:
  return tuple(_TARGETS.get(t, t) for t in flag.value)


def lora_config() -> lora.LoraConfig:
  """The `LoraConfig` of the flags."""
  return _config(
    lora.LoraConfig,
    {
      "targets": ("lora_targets", _targets(_LORA_TARGETS)),
      "rank": ("lora_rank", _LORA_RANK.value),
      "alpha": ("lora_alpha", _LORA_ALPHA.value),
    },
  )


def mask_config() -> maskllm.MaskConfig:
  """The `MaskConfig` of the flags, annealed over --steps."""

  def pair(flag):
    values = cli.parse_numbers(flag.name, flag.value, float, 0)
    if len(values) != 2 or 0 in values:
      raise ValueError(
        f"--{flag.name} must be START,END (two numbers > 0), got "
        f"{','.join(flag.value)!r}."
      )
    return tuple(values)

  return _config(
    maskllm.MaskConfig,
    {
      "total_steps": ("steps", _STEPS.value),
      "targets": ("mask_targets", _targets(_MASK_TARGETS)),
      "temperature": ("mask_temperature", pair(_MASK_TEMPERATURE)),
      "logit_scale": ("mask_logit_scale", pair(_MASK_LOGIT_SCALE)),
      "prior_strength": ("mask_prior_strength", _MASK_PRIOR_STRENGTH.value),
      "weight_reg": ("mask_weight_reg", _MASK_WEIGHT_REG.value),
    },
  )


_METHOD_FLAGS = {
  "full": (),
  "lora": "lora_",
  "qlora": "lora_",
  "mask24": "mask_",
}


def method_config():
  """The `LoraConfig` or `MaskConfig` of the flags (None for full).

  Raises:
    ValueError: a `--lora_*` or `--mask_*` flag given to a method that does
      not use it.
  """
  method = _METHOD.value
  for name in _FLAG_NAMES:
    if (
      name.startswith(("lora_", "mask_"))
      and flags.FLAGS[name].present
      and not name.startswith(_METHOD_FLAGS[method])
    ):
      raise ValueError(f"--{name} is not used by --method={method}.")
  if method == "full":
    return None
  return mask_config() if method == "mask24" else lora_config()


def build(base_params, model_cfg, method_cfg):
  """`(TrainConfig, Adapter)` of the flags; ValueError on a bad flag."""
  method = _METHOD.value
  if method == "full":
    adapter = finetune.full_adapter(base_params)
  elif method == "mask24":
    adapter = finetune.mask_adapter(base_params, method_cfg)
  else:
    adapter = finetune.lora_adapter(
      base_params, method_cfg, model_cfg, quantize=method == "qlora"
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
  if _METHOD.value != "full":  # all but the frozen base
    params = {k: v for k, v in params.items() if k != frozen.BASE}
  trainable = params
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
    method_cfg = method_config()
    try:
      base, model_cfg, base_step = training.load_model(_BASE.value)
    except training.CheckpointError as e:
      raise ValueError(f"--base={_BASE.value!r}: {e}") from None
    config, adapter = build(base, model_cfg, method_cfg)
  except ValueError as e:
    cli.fail(e)
  except training.WorkdirError as e:
    cli.fail(e)
  print(
    f"{adapter.metadata} on {_BASE.value} (step {base_step}): "
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
    model = adapter.to_model(result.state.params)
    finetune.export(_EXPORT.value, model, model_cfg, int(result.state.step))
    print(f"exported model: {_EXPORT.value}", flush=True)


if __name__ == "__main__":
  app.run(main)
