"""CO2 (training.co2): its limits (one replica, tau = 1), the stale outer
step against a NumPy reference, momentum clipping, mesh layouts, exact
resume mid-round, and the flags' checks."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lightning_jax import models
from lightning_jax import parallel
from lightning_jax import training
from lightning_jax.training import co2

TARGETS = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 2.0], [0.0, 4.0]])


def _quadratic_grad_fn(params, batch, rng):
  """Loss 0.5 |w - x|^2 averaged over the batch rows."""
  del rng
  diff = params["w"][None] - batch
  loss = 0.5 * jnp.mean(jnp.sum(diff**2, -1))
  return (loss, {"loss": loss}), {"w": jnp.mean(diff, 0)}


def _mesh(spec: str, devices: int):
  axes = parallel.parse_mesh_spec(spec)
  return jax.sharding.Mesh(
    np.array(jax.devices()[:devices]).reshape(tuple(axes.values())),
    tuple(axes),
  )


def _co2_run(cfg, inner, mesh, grad_fn, params, batches, state=None):
  """The states after each batch of a jitted CO2 step."""
  replicas = mesh.shape[co2.DATA]
  if state is None:
    state = co2.init_co2_state(params, inner, jax.random.key(1), cfg, replicas)
  step = jax.jit(
    co2.make_co2_train_step(inner, lambda s: 0.0, grad_fn, cfg, mesh)
  )
  states = []
  for batch in batches:
    state, _ = step(state, jnp.asarray(batch))
    states.append(state)
  return states


def _plain_run(inner, grad_fn, params, batches):
  state = training.init_train_state(params, inner, jax.random.key(1))
  step = jax.jit(training.make_train_step(inner, lambda s: 0.0, grad_fn))
  out = []
  for batch in batches:
    state, _ = step(state, jnp.asarray(batch))
    out.append(state)
  return out


@pytest.mark.parametrize("tau", [1, 3])
def test_one_replica_without_outer_momentum_is_plain_training(tau):
  cfg = training.CO2Config(local_steps=tau, staleness=0)
  inner = optax.adamw(0.1)
  params = {"w": jnp.zeros(2)}
  batches = [TARGETS[i : i + 2] for i in range(3)] * 2
  got = _co2_run(
    cfg, inner, _mesh("data=1", 1), _quadratic_grad_fn, params, batches
  )
  want = _plain_run(inner, _quadratic_grad_fn, params, batches)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g.params["w"][0], w.params["w"], atol=1e-6)


def test_tau_one_with_sgd_is_synchronous_data_parallel():
  cfg = training.CO2Config(local_steps=1, staleness=0)
  inner = optax.sgd(0.3)
  params = {"w": jnp.array([0.5, -0.5])}
  batches = [TARGETS + i for i in range(4)]
  got = _co2_run(
    cfg, inner, _mesh("data=4", 4), _quadratic_grad_fn, params, batches
  )
  want = _plain_run(inner, _quadratic_grad_fn, params, batches)
  for g, w in zip(got, want, strict=True):
    for replica in g.params["w"]:
      np.testing.assert_allclose(replica, w.params["w"], atol=1e-6)


def _reference(params, batches, *, tau, replicas, gamma, cfg):
  """CO2 with inner SGD on the quadratic, written out in NumPy: the outer
  step at the end of round t uses the replica mean of round t - staleness."""
  anchor = np.asarray(params, np.float64)
  theta = np.repeat(anchor[None], replicas, 0)
  momentum = np.zeros_like(anchor)
  deltas = []  # delta_t = a_t - mean_i theta^i_t
  for step, batch in enumerate(batches):
    rows = np.split(np.asarray(batch), replicas)
    means = np.stack([r.mean(0) for r in rows])
    theta = theta - gamma * (theta - means)
    if (step + 1) % tau:
      continue
    deltas.append(anchor - theta.mean(0))
    stale = len(deltas) - 1 - cfg.staleness
    delta = deltas[stale] if stale >= 0 else np.zeros_like(anchor)
    momentum = cfg.outer_momentum * momentum + delta / cfg.gap_penalty
    if cfg.clip:
      momentum = np.clip(momentum, -cfg.clip, cfg.clip)
    anchor = anchor - cfg.outer_lr * momentum
    theta = np.repeat(anchor[None], replicas, 0)
  return theta, anchor, momentum


@pytest.mark.parametrize("staleness", [0, 1])
@pytest.mark.parametrize("clip", [0.0, 0.3])
def test_outer_step_matches_the_numpy_reference(staleness, clip):
  cfg = training.CO2Config(
    local_steps=2,
    outer_lr=0.7,
    outer_momentum=0.5,
    gap_penalty=1.6,
    clip=clip,
    staleness=staleness,
  )
  batches = [TARGETS * (1 + 0.1 * i) for i in range(8)]
  params = [0.5, -0.5]
  states = _co2_run(
    cfg,
    optax.sgd(0.4),
    _mesh("data=2", 2),
    _quadratic_grad_fn,
    {"w": jnp.asarray(params)},
    batches,
  )
  for n in range(1, len(batches) + 1):
    theta, anchor, momentum = _reference(
      params, batches[:n], tau=2, replicas=2, gamma=0.4, cfg=cfg
    )
    state = states[n - 1]
    np.testing.assert_allclose(state.params["w"], theta, rtol=1e-5)
    np.testing.assert_allclose(state.opt_state.anchor["w"], anchor, rtol=1e-5)
    np.testing.assert_allclose(
      state.opt_state.momentum["w"], momentum, rtol=1e-5, atol=1e-7
    )
    if clip:
      assert np.all(np.abs(state.opt_state.momentum["w"]) <= clip)


def test_staleness_one_uses_the_previous_round_mean():
  """Hand-computed: tau = 1, SGD with lr 1 moves each replica to its target,
  so delta_t = a_t - mean(targets_t); beta = 0, eta = 1."""
  cfg = training.CO2Config(local_steps=1, staleness=1)
  batches = [TARGETS[:2], TARGETS[2:], TARGETS[:2]]
  states = _co2_run(
    cfg,
    optax.sgd(1.0),
    _mesh("data=2", 2),
    _quadratic_grad_fn,
    {"w": jnp.zeros(2)},
    batches,
  )
  # Round 0: nothing in flight, a_1 = a_0 = 0.
  np.testing.assert_array_equal(states[0].opt_state.anchor["w"], [0.0, 0.0])
  # Round 1 applies round 0's delta: a_2 = 0 - (0 - mean(T0, T1)).
  np.testing.assert_allclose(states[1].opt_state.anchor["w"], [2.0, -0.75])
  # Round 2 applies round 1's delta, taken from a_1 = 0: a_3 = a_2 +
  # mean(T2, T3).
  np.testing.assert_allclose(states[2].opt_state.anchor["w"], [1.5, 2.25])


MODEL = models.get_preset(
  "transformer", d_model=16, num_layers=1, num_heads=4, head_dim=4, d_ff=32
)


def _train(workdir, mesh, steps, checkpoint_every=0):
  """`training.train` with CO2 (tau = 2) on the tiny transformer; the
  schedule is that of a 5-step run."""
  co2_cfg = training.CO2Config(local_steps=2, outer_momentum=0.5, clip=0.1)
  return training.train(
    training.TrainConfig(
      model=MODEL,
      workdir=str(workdir),
      steps=steps,
      batch_size=8,
      seq_len=16,
      mesh=mesh,
      checkpoint_every=checkpoint_every,
      log_every=1,
      optim=training.OptimConfig(
        lr=1e-2, total_steps=5, warmup_steps=0, optimizer="co2", co2=co2_cfg
      ),
    )
  )


def test_loop_mesh_layouts_agree_and_resume_mid_round_is_exact(tmp_path):
  """fsdp or tensor inside each of the 2 replicas give the same curve
  (fsdp and tensor together abort XLA's partitioner, docs/training.md
  "CO2"); resumed from its checkpoint of step 3 (mid-round), a run ends
  bitwise where it did uninterrupted."""
  straight = _train(tmp_path / "a", "data=2,fsdp=4", 5, checkpoint_every=3)
  other = _train(tmp_path / "b", "data=2,tensor=4", 3)
  np.testing.assert_allclose(
    [r["loss"] for r in other.history],
    [r["loss"] for r in straight.history[:3]],
    rtol=1e-5,
  )
  manager = training.CheckpointManager(tmp_path / "a" / "checkpoints")
  assert manager.all_steps() == [3, 5]
  shutil.rmtree(manager.step_path(5))
  resumed = _train(tmp_path / "a", "data=2,fsdp=4", 5, checkpoint_every=3)
  assert [r["step"] for r in resumed.history] == [4, 5]
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(resumed.state),
    jax.device_get(straight.state),
  )
  params, _, _ = training.load_model(tmp_path / "a")
  jax.tree.map(
    np.testing.assert_allclose,
    params,
    jax.device_get(co2.replica_mean(straight.state.params)),
  )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(local_steps=0), "--co2_local_steps"),
    (dict(outer_momentum=1.0), "--co2_outer_momentum"),
    (dict(outer_momentum=-0.1), "--co2_outer_momentum"),
    (dict(outer_lr=0.0), "--co2_outer_lr"),
    (dict(gap_penalty=0.0), "--co2_gap_penalty"),
    (dict(gap_penalty=float("inf")), "--co2_gap_penalty"),
    (dict(clip=-1.0), "--co2_clip"),
    (dict(staleness=2), "--co2_staleness"),
  ],
)
def test_bad_co2_options_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    training.CO2Config(**kwargs)


def test_co2_with_a_pipe_axis_is_refused(tmp_path):
  config = training.TrainConfig(
    model=MODEL,
    workdir=str(tmp_path),
    mesh="data=4,pipe=2",
    microbatches=2,
    optim=training.OptimConfig(optimizer="co2"),
  )
  with pytest.raises(ValueError, match="--optimizer=co2 trains without a pipe"):
    training.validate(config, num_devices=8)
  # XLA aborts (a process crash) on this layout: refused before compiling.
  both = dataclasses.replace(config, mesh="data=2,fsdp=2,tensor=2")
  with pytest.raises(ValueError, match="on fsdp or tensor, not both"):
    training.validate(both, num_devices=8)


def test_co2_options_need_the_co2_optimizer():
  with pytest.raises(ValueError, match="--optimizer=co2"):
    training.OptimConfig(optimizer="galore", co2=training.CO2Config())
  assert training.OptimConfig(optimizer="co2").co2 == training.CO2Config()
