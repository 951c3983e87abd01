"""Training a transform of frozen params: `{"base": frozen, key: trained}`.

LoRA (`lora`, key "lora") and MaskLLM (`maskllm`, key "mask") keep the
trained params beside the frozen base and build the model params with a
transform `(base, trained, rng) -> model params`. `freeze_base` gives the
optimiser state to the trained params only; `transform_grad_fn`
differentiates them only, through the VJP of the transform; `save` and
`load` keep the trained params alone as a small checkpoint with their config.
"""

from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp
import optax

from lightning_jax.training import checkpoint

BASE = "base"


def freeze_base(inner: optax.GradientTransformation, trainable: str):
  """`inner` on `params[trainable]`, `optax.set_to_zero` on `params["base"]`.

  An `optax.multi_transform`: the optimiser state exists for the trained
  params only (the base's entries are `optax.MaskedNode`), and the base gets
  zero updates, so it stays bitwise unchanged.

  Example:
    >>> opt = freeze_base(optax.adamw(1e-3), "lora")
    >>> state = opt.init({"base": base, "lora": adapters})
  """

  def labels(params):
    return {
      key: jax.tree.map(lambda _, key=key: key, params[key])
      for key in (BASE, trainable)
    }

  return optax.multi_transform(
    {trainable: inner, BASE: optax.set_to_zero()}, labels
  )


def transform_grad_fn(grad_fn, transform: Callable, trainable: str):
  """A `training` grad_fn over `{"base", trainable}` from one over model
  params.

  The model params are `transform(base, params[trainable], fold_in(rng,
  1))`; the gradient of the trained params is the VJP of `transform` applied
  to `grad_fn`'s gradient of the model params. The base gets zeros
  (`freeze_base` ignores them), so integer leaves (NF4) need no derivative.

  Args:
    grad_fn: `(params, batch, rng) -> ((loss, metrics), grads)`, e.g.
      `training.default_grad_fn(...)`.
    transform: `(base, trained, rng) -> model params`.
    trainable: the key of the trained params.

  Returns:
    A grad_fn of the same signature for `training.make_train_step`.
  """

  def transformed(params, batch, rng):
    model_params, vjp = jax.vjp(
      lambda t: transform(params[BASE], t, jax.random.fold_in(rng, 1)),
      params[trainable],
    )
    (loss, metrics), grads = grad_fn(model_params, batch, rng)
    (trained_grads,) = vjp(grads)
    base_grads = jax.tree.map(jnp.zeros_like, params[BASE])
    return (loss, metrics), {BASE: base_grads, trainable: trained_grads}

  return transformed


def save(manager: checkpoint.CheckpointManager, step: int, trained, cfg, key):
  """Saves `trained` alone as checkpoint `step`, the dataclass `cfg` in its
  metadata under `key` (e.g. "lora").

  Returns:
    The committed step directory.
  """
  return manager.save(step, trained, metadata={key: dataclasses.asdict(cfg)})


def load(
  manager: checkpoint.CheckpointManager,
  cfg_type: type,
  key: str,
  step: int | None = None,
  target=None,
):
  """`(trained, cfg_type(**saved config))` of a checkpoint `save` wrote.

  Args:
    manager: where `save` wrote.
    cfg_type: the config dataclass (e.g. `lora.LoraConfig`).
    key: its metadata key, as given to `save`.
    step: the step, or None for the latest complete one.
    target: abstract trained params with shardings to restore onto (None:
      the saved tree, as jax arrays on the default device).

  Raises:
    ValueError: the checkpoint has no config under `key`.
  """
  trained, metadata = manager.restore(step, target)
  if key not in metadata:
    raise ValueError(
      f"checkpoint {manager.directory} step {step} holds no {key!r} config."
    )
  if target is None:
    trained = jax.tree.map(jnp.asarray, trained)
  return trained, cfg_type(**metadata[key])
