"""The train step: `(state, batch) -> (state, metrics)`, pure and jittable.

Gradients come from a `grad_fn(params, batch, rng) -> ((loss, metrics),
grads)` hook: by default `jax.value_and_grad` of the microbatched
`training.loss_fn`; a pipeline schedule
(`parallel.pipeline.pipeline_grad_fn`) plugs in its own with the same
signature.

Gradient accumulation over `k` microbatches (`microbatched_loss`)
differentiates one `lax.scan` over the microbatches whose body is rematerialised
(`jax.checkpoint`): the forward keeps only each microbatch's inputs, the
backward recomputes one microbatch at a time, so activation memory is that of
one microbatch. Because the whole step is one differentiated function, the
"global" load-balancing loss counts expert load over all `k` microbatches
(docs/moe.md, "Sequential gradient accumulation cannot be exact for free"): the
price is one extra forward pass per microbatch, the same as a pre-pass.
"""

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp
import optax

from lightning_jax.parallel.pipeline import split_microbatches
from lightning_jax.training import loss as loss_lib
from lightning_jax.training import state as state_lib
from lightning_jax.training.state import TrainState

GradFn = Callable  # (params, batch, rng) -> ((loss, metrics), grads)


def microbatched_loss(
  params,
  batch,
  rng,
  model_cfg,
  loss_cfg: loss_lib.LossConfig,
  *,
  num_microbatches: int = 1,
):
  """`loss_fn` of the whole batch, computed `num_microbatches` rows at a time.

  Args:
    params: model parameters.
    batch: dict of `[batch, seq]` arrays (see `training.loss_fn`).
    rng: typed PRNG key, split over microbatches.
    model_cfg: the `models.ModelConfig`.
    loss_cfg: `LossConfig`.
    num_microbatches: k; must divide the batch.

  Returns:
    `(loss, metrics)`, equal to `loss_fn` of the whole batch for "sequence"
    and "global" LBL scopes (up to float reassociation); "micro" is by
    definition per microbatch.
  """
  if num_microbatches == 1:
    return loss_lib.loss_fn(params, batch, rng, model_cfg, loss_cfg)
  micro = split_microbatches(batch, num_microbatches)
  rngs = jax.random.split(rng, num_microbatches)

  @jax.checkpoint
  def one(params, mb, r):
    return loss_lib.loss_stats(params, mb, r, model_cfg)

  _, stats = jax.lax.scan(
    lambda c, xs: (c, one(params, *xs)), None, (micro, rngs)
  )
  return loss_lib.loss_from_stats(stats, model_cfg, loss_cfg)


def default_grad_fn(
  model_cfg, loss_cfg: loss_lib.LossConfig, num_microbatches: int = 1
) -> GradFn:
  """`jax.value_and_grad` of `microbatched_loss` (the pipe == 1 `grad_fn`)."""
  return jax.value_and_grad(
    functools.partial(
      microbatched_loss,
      model_cfg=model_cfg,
      loss_cfg=loss_cfg,
      num_microbatches=num_microbatches,
    ),
    has_aux=True,
  )


def make_train_step(
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_fn: GradFn,
):
  """The pure train step for `optimizer` and `grad_fn`.

  Args:
    optimizer: optax transformation (`training.make_optimizer`).
    schedule: its learning-rate schedule, reported as `lr`.
    grad_fn: `(params, batch, rng) -> ((loss, metrics), grads)`.

  Returns:
    `train_step(state, batch) -> (state, metrics)`: one optimiser step;
    `metrics` holds the `grad_fn` metrics plus `grad_norm` (before clipping)
    and `lr` (used by this step). Jit it with `parallel.shard_step`.

  Example:
    >>> step = make_train_step(opt, sched, default_grad_fn(cfg, LossConfig()))
    >>> state, metrics = step(state, batch)
  """

  def train_step(state: TrainState, batch):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    (_, metrics), grads = grad_fn(state.params, batch, step_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(
      metrics,
      grad_norm=optax.tree.norm(grads),
      lr=jnp.asarray(schedule(state.step), jnp.float32),
    )
    return state_lib.next_state(state, params, opt_state, rng), metrics

  return train_step
