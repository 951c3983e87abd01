"""Fine-tuning a trained model with `training.train`: adapters and export.

`lora_adapter` turns a base model's params into a `training.Adapter`: the
loop trains `{"base": frozen base, "lora": adapters}` (QLoRA: the base as
`NF4Tensor`s), with the optimiser state for the adapters only, and
checkpoints, resumes, evaluates and logs like any training run.
`mask_adapter` trains MaskLLM's 2:4 mask logits over the frozen dense base
(`{"base": W, "mask": logits}`), annealed over the run's steps; the model
it evaluates and exports is the hard (argmax) 2:4 one. `full_adapter` is
full fine-tuning through the same path: every param trains, starting from
the base's.
`export` writes the merged params as a checkpoint that `training.load_model`
(and so `tools/generate.py`) reads.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp

from lightning_jax import models
from lightning_jax import parallel
from lightning_jax import training
from lightning_jax.adapt import frozen
from lightning_jax.adapt import lora
from lightning_jax.adapt import maskllm
from lightning_jax.adapt import paths
from lightning_jax.adapt import qlora


def lora_adapter(
  base, cfg: lora.LoraConfig, model_cfg, *, quantize: bool = False
) -> training.Adapter:
  """The `training.Adapter` of LoRA (or QLoRA) over `base`.

  Args:
    base: the base model's params (`models.init` layout), e.g. from
      `training.load_model`.
    cfg: the `LoraConfig`.
    model_cfg: the base's `models.ModelConfig` (its compute dtype is the
      dtype NF4 weights are dequantised to).
    quantize: store the frozen base as NF4 with double quantisation
      (`qlora.quantize` of the mixer and MLP matrices).

  Returns:
    An `Adapter` whose params are `{"base": ..., "lora": ...}`.

  Raises:
    ValueError: a target pattern matches no matrix (listing them).
  """
  dtype = models.compute_dtype(model_cfg)
  fixed = qlora.quantize(base) if quantize else base
  paths.match(base, cfg.targets, "--lora_targets")  # fails before compiling

  def init(key):
    return {frozen.BASE: fixed, lora.LORA: lora.init(key, base, cfg)}

  def to_model(params):
    return lora.apply(params[frozen.BASE], params[lora.LORA], cfg, dtype=dtype)

  return training.Adapter(
    init=init,
    to_model=to_model,
    grad_fn=lambda grad_fn, step: lora.lora_grad_fn(grad_fn, cfg, dtype=dtype),
    optimizer=lora.freeze_base,
    shardings=qlora.shardings,
    metadata={
      "method": "qlora" if quantize else "lora",
      "rank": cfg.rank,
      "alpha": cfg.alpha,
      "targets": list(cfg.targets),
    },
  )


def mask_adapter(base, cfg: maskllm.MaskConfig) -> training.Adapter:
  """The `training.Adapter` of MaskLLM 2:4 masks over the dense `base`.

  Args:
    base: the base model's params (`models.init` layout).
    cfg: the `MaskConfig`; its `total_steps` should be the run's steps
      (the schedules anneal over them).

  Returns:
    An `Adapter` whose params are `{"base": W, "mask": logits}` (logits
    initialised with the magnitude prior, `maskllm.init`), trained through
    `maskllm.mask_grad_fn` at the state's step; `to_model` is the hard 2:4
    model (`maskllm.apply` without rng): evaluation and export see the
    pruned weights.

  Raises:
    ValueError: bad targets (`maskllm.targets`, named `--mask_targets`).
  """
  maskllm.targets(base, cfg, "--mask_targets")  # fails before compiling
  return training.Adapter(
    init=lambda key: {
      frozen.BASE: base,
      maskllm.MASK: maskllm.init(key, base, cfg),
    },
    to_model=lambda p: maskllm.apply(p[frozen.BASE], p[maskllm.MASK], cfg),
    grad_fn=lambda grad_fn, step: maskllm.mask_grad_fn(grad_fn, cfg, step),
    optimizer=maskllm.freeze_base,
    shardings=maskllm.shardings,
    metadata={"method": "mask24", **dataclasses.asdict(cfg)},
  )


def full_adapter(base) -> training.Adapter:
  """The `training.Adapter` of full fine-tuning: the base's params train."""
  identity = lambda x: x  # noqa: E731
  return training.Adapter(
    init=lambda key: base,
    to_model=identity,
    grad_fn=lambda grad_fn, step: grad_fn,
    optimizer=identity,
    shardings=parallel.param_shardings,
    metadata={"method": "full"},
  )


def export(directory: str, params, model_cfg, step: int) -> None:
  """Writes `params` (the merged model) as a loadable run directory.

  `directory/checkpoints/step_<step>` holds `{"params": params, "step":
  step}` with the model config in its metadata: `training.load_model
  (directory)` and `tools/generate.py --workdir=directory` read it.
  """
  params = jax.tree.map(jnp.asarray, params)
  manager = training.CheckpointManager(
    os.path.join(directory, training.CHECKPOINT_DIR), keep=1
  )
  manager.save(
    step,
    {"params": params, "step": step},
    {"model_config": model_cfg.to_dict()},
  )
