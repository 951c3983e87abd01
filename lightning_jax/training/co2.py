"""CO2: local updates on each data replica, a stale outer step every tau.

Sun et al., 2024, "CO2: Efficient Distributed Training with Full
Communication-Computation Overlap" (ICLR), arXiv 2401.16265. Each replica of
the mesh's `data` axis keeps its own params `theta^i` and inner optimiser
state and takes `tau` local steps on its shard of the batch; at the end of
round t, with `a_t` the params every replica started the round from:

  delta_t = a_t - mean_i(theta^i_t)                 (one all-reduce)
  m       <- clip(beta * m + delta_s / lambda, -phi, phi)  (s = t - staleness)
  a_{t+1} = a_t - eta * m,   theta^i <- a_{t+1}.

Staleness 1 (CO2): round t's all-reduce is issued in the first step of round
t + 1 and its result is applied at the end of round t + 1, so it overlaps
that round's forward and backward passes; `delta_{-1} = 0`. Staleness 0 is
the synchronous outer step (DiLoCo-like). lambda is the staleness-gap
penalty, a constant as in the authors' code (docs/training.md, "CO2").

The replica-local parts of the state (params, inner optimiser state, the
in-flight delta) are stacked on a leading `[replicas]` axis sharded over
`data`; the step runs under `jax.shard_map` over `data` (the other mesh axes
stay automatic), so every collective of the local steps stays inside a
replica and the outer all-reduce is the only one over `data`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lightning_jax.parallel import mesh as mesh_lib
from lightning_jax.parallel import sharding as sharding_lib
from lightning_jax.training import step as step_lib
from lightning_jax.training import state as state_lib
from lightning_jax.training.state import TrainState

P = jax.sharding.PartitionSpec
DATA = mesh_lib.DATA


class CO2State(NamedTuple):
  """The optimiser state of a CO2 `TrainState` (its `opt_state`).

  Attributes:
    inner: the inner optimiser's state, every leaf `[replicas, ...]`.
    anchor: a_t, the params every replica started this round from
      (`models.init` layout, replicated over `data`).
    momentum: m, the outer momentum (like `anchor`).
    in_flight: staleness 1: `[replicas, ...]` params-shaped, each replica's
      `a - theta^i` of the last round until the first step of a round
      replaces it by its replica mean; None for staleness 0.
  """

  inner: Any
  anchor: Any
  momentum: Any
  in_flight: Any


def stack_replicas(tree, replicas: int):
  """Every leaf `[...]` of `tree` repeated to `[replicas, ...]`."""
  return jax.tree.map(
    lambda x: jnp.broadcast_to(x, (replicas, *jnp.shape(x))), tree
  )


def replica_mean(params):
  """The replicas' mean of `[replicas, ...]` params: the model they make."""
  return jax.tree.map(lambda x: x.mean(0), params)


def init_co2_state(
  params, inner: optax.GradientTransformation, key, cfg, replicas: int
) -> TrainState:
  """A fresh CO2 `TrainState`: every replica at `params`, m = 0.

  Args:
    params: model parameters (`models.init` layout).
    inner: the inner optimiser (`training.make_optimizer`: AdamW).
    key: typed PRNG key of the per-step randomness.
    cfg: the `CO2Config`.
    replicas: the mesh's `data` size.

  Returns:
    `TrainState` whose `params` are `[replicas, ...]` and whose `opt_state`
    is a `CO2State`.

  Example:
    >>> state = init_co2_state({"w": jnp.ones(3)}, optax.sgd(0.1),
    ...                        jax.random.key(0), CO2Config(), replicas=2)
    >>> state.params["w"].shape
    (2, 3)
  """
  zeros = jax.tree.map(jnp.zeros_like, params)
  return TrainState(
    params=stack_replicas(params, replicas),
    opt_state=CO2State(
      inner=stack_replicas(inner.init(params), replicas),
      anchor=params,
      momentum=zeros,
      in_flight=stack_replicas(zeros, replicas) if cfg.staleness else None,
    ),
    step=jnp.zeros((), jnp.int32),
    rng=jax.random.key_data(key),
    data_position=jnp.zeros((), jnp.int32),
  )


def state_shardings(abstract_state: TrainState, mesh) -> TrainState:
  """`NamedSharding`s of a CO2 train state on `mesh`.

  The replica axis of the stacked parts is split over `data`, their other
  dims follow the partition rules of their unstacked shapes; the rest
  follows the rules (`parallel.param_shardings`).
  """

  def stacked(tree):
    specs = sharding_lib.param_partition_specs(
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree),
      mesh,
    )
    return jax.tree.map(
      lambda s: jax.sharding.NamedSharding(mesh, P(DATA, *s)),
      specs,
      is_leaf=lambda x: isinstance(x, P),
    )

  opt = abstract_state.opt_state
  rest = sharding_lib.param_shardings(
    abstract_state._replace(
      params=None, opt_state=opt._replace(inner=None, in_flight=None)
    ),
    mesh,
  )
  return rest._replace(
    params=stacked(abstract_state.params),
    opt_state=rest.opt_state._replace(
      inner=stacked(opt.inner), in_flight=stacked(opt.in_flight)
    ),
  )


def outer_step(cfg, anchor, momentum, delta):
  """`(a - eta * m, m)`, `m = clip(beta * m + delta / lambda, -phi, phi)`."""
  momentum = jax.tree.map(
    lambda m, d: cfg.outer_momentum * m + d / cfg.gap_penalty, momentum, delta
  )
  if cfg.clip:
    momentum = jax.tree.map(
      lambda m: jnp.clip(m, -cfg.clip, cfg.clip), momentum
    )
  anchor = jax.tree.map(lambda a, m: a - cfg.outer_lr * m, anchor, momentum)
  return anchor, momentum


def _unstack(tree):
  return jax.tree.map(lambda x: x[0], tree)


def _stack(tree):
  return jax.tree.map(lambda x: x[None], tree)


def make_co2_train_step(
  inner: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_fn: step_lib.GradFn,
  cfg,
  mesh,
):
  """The pure CO2 train step over `mesh`'s `data` replicas.

  Args:
    inner: the inner optimiser (AdamW; any optax transformation).
    schedule: its learning-rate schedule, reported as `lr`.
    grad_fn: `(params, batch, rng) -> ((loss, metrics), grads)` of one
      replica's shard of the batch.
    cfg: the `CO2Config`.
    mesh: the mesh; its `data` axis holds the replicas.

  Returns:
    `train_step(state, batch) -> (state, metrics)` on a state from
    `init_co2_state`: one local step on every replica, and the outer step
    when it ends a round. Every replica draws the step's randomness from
    the same key (so one replica is plain training). `metrics` are replica
    means of `grad_fn`'s, plus `grad_norm` (the replicas' mean, before
    clipping) and `lr`. Jit it with `parallel.shard_step` and
    `state_shardings`.
  """
  tau = cfg.local_steps

  def end_round(params, anchor, momentum, in_flight):
    if cfg.staleness:
      delta, in_flight = in_flight, jax.tree.map(jnp.subtract, anchor, params)
    else:
      mean = jax.lax.pmean(params, DATA)
      delta = jax.tree.map(jnp.subtract, anchor, mean)
    anchor, momentum = outer_step(cfg, anchor, momentum, delta)
    return anchor, anchor, momentum, in_flight

  def replica_step(params, opt_state, batch, step, rng):
    params, inner_state = _unstack(params), _unstack(opt_state.inner)
    in_flight = _unstack(opt_state.in_flight)
    (_, metrics), grads = grad_fn(params, batch, rng)
    updates, inner_state = inner.update(grads, inner_state, params)
    params = optax.apply_updates(params, updates)
    if cfg.staleness:  # the all-reduce of the last round's deltas
      in_flight = jax.lax.cond(
        step % tau == 0,
        lambda d: jax.lax.pmean(d, DATA),
        lambda d: d,
        in_flight,
      )
    params, anchor, momentum, in_flight = jax.lax.cond(
      (step + 1) % tau == 0,
      end_round,
      lambda *args: args,
      params,
      opt_state.anchor,
      opt_state.momentum,
      in_flight,
    )
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    metrics = jax.lax.pmean(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics), DATA
    )
    opt_state = CO2State(
      inner=_stack(inner_state),
      anchor=anchor,
      momentum=momentum,
      in_flight=_stack(in_flight),
    )
    return _stack(params), opt_state, metrics

  replicated, split = P(), P(DATA)
  opt_specs = CO2State(
    inner=split, anchor=replicated, momentum=replicated, in_flight=split
  )
  sharded_step = jax.shard_map(
    replica_step,
    mesh=mesh,
    in_specs=(split, opt_specs, split, replicated, replicated),
    out_specs=(split, opt_specs, replicated),
    axis_names={DATA},
    check_vma=False,
  )

  def train_step(state: TrainState, batch):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    params, opt_state, metrics = sharded_step(
      state.params,
      state.opt_state,
      batch,
      state.step,
      step_rng,
    )
    metrics = dict(metrics, lr=jnp.asarray(schedule(state.step), jnp.float32))
    return state_lib.next_state(state, params, opt_state, rng), metrics

  return train_step
