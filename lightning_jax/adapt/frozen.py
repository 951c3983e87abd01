"""Training a transform of frozen params: `{"base": frozen, key: trained}`.

LoRA (`lora`, key "lora") and MaskLLM (`maskllm`, key "mask") keep the
trained params beside the frozen base and build the model params with a
transform `(base, trained, rng) -> model params`. `freeze_base` gives the
optimiser state to the trained params only; `transform_grad_fn`
differentiates them only, through the VJP of the transform.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

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
