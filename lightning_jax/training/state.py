"""The train state: one pytree holding everything a step reads and writes."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrainState(NamedTuple):
  """Everything needed to continue a run exactly; a pytree (NamedTuple).

  Attributes:
    params: model parameters (nested dicts of arrays).
    opt_state: the optax state of `params`.
    step: shape=(), dtype=int32, completed optimiser steps.
    rng: `[2]` uint32 raw key data (`jax.random.key_data`), split each step;
      raw data so that checkpoints hold a plain array.
    data_position: shape=(), dtype=int32, index of the next batch to read
      (`dataset.batch(data_position)`).
  """

  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array
  data_position: jax.Array


def init_train_state(
  params, optimizer: optax.GradientTransformation, key
) -> TrainState:
  """A fresh `TrainState` at step 0 for `params`.

  Args:
    params: model parameters.
    optimizer: the optax transformation whose state to create.
    key: typed PRNG key of the per-step randomness (use a key independent of
      the one that initialised `params`).

  Returns:
    `TrainState` with `step = data_position = 0`.

  Example:
    >>> state = init_train_state({"w": jnp.ones((2, 2))}, optax.sgd(0.1),
    ...                          jax.random.key(0))
    >>> int(state.step), state.rng.shape
    (0, (2,))
  """
  return TrainState(
    params=params,
    opt_state=optimizer.init(params),
    step=jnp.zeros((), jnp.int32),
    rng=jax.random.key_data(key),
    data_position=jnp.zeros((), jnp.int32),
  )


def next_state(state: TrainState, params, opt_state, key) -> TrainState:
  """`state` one step on: new params, optimiser state and PRNG key (typed),
  step and data position advanced by one."""
  return TrainState(
    params=params,
    opt_state=opt_state,
    step=state.step + 1,
    rng=jax.random.key_data(key),
    data_position=state.data_position + 1,
  )
