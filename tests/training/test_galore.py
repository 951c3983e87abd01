"""GaLore (training.galore): the paper's Algorithm 1 in NumPy, the projector
schedule, full rank == Adam, stacked matrices, and exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lightning_jax import models
from lightning_jax import parallel
from lightning_jax import training
from lightning_jax.parallel import pipeline


@pytest.fixture
def x64():
  """float64, so that rounding is told from a real difference."""
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def _grads(key, params, steps):
  """`steps` random gradient trees shaped like `params`."""
  keys = jax.random.split(key, steps)
  return [
    jax.tree.map(
      lambda p, k=k: jax.random.normal(
        jax.random.fold_in(k, p.size), p.shape, p.dtype
      ),
      params,
    )
    for k in keys
  ]


def _run(opt, params, grads, state=None):
  """The updates of each gradient in turn, and the final state."""
  state = opt.init(params) if state is None else state
  step = jax.jit(opt.update)
  out = []
  for g in grads:
    updates, state = step(g, state, params)
    out.append(updates)
  return out, state


def _algorithm1(grads, r, gap, alpha, lr, b1, b2, eps):
  """Zhao et al. (2024), Algorithm 1, line by line, for one W: [m, n].

  The algorithm is written for m <= n (left projector); for m > n it runs
  on the transposes (galore-torch's right projector). Each singular
  vector's sign, which the paper leaves open, is fixed as in
  `galore.canonical_signs`: largest-magnitude entry positive. It returns the
  change of W at each step: W_t + eta * G~_t with G_t = -grad.
  """
  m, n = grads[0].shape
  flip = m > n
  moment1 = moment2 = 0.0
  changes = []
  for t, grad in enumerate(grads):
    g = -(grad.T if flip else grad)
    if t % gap == 0:
      u, _, _ = np.linalg.svd(g, full_matrices=False)
      p = u[:, :r]
      p = p * np.sign(p[np.argmax(np.abs(p), axis=0), range(r)])
    rt = p.T @ g
    moment1 = b1 * moment1 + (1 - b1) * rt
    moment2 = b2 * moment2 + (1 - b2) * rt**2
    m_hat = moment1 / (1 - b1 ** (t + 1))
    v_hat = moment2 / (1 - b2 ** (t + 1))
    nt = m_hat / (np.sqrt(v_hat) + eps)
    change = lr * alpha * p @ nt
    changes.append(change.T if flip else change)
  return changes


def test_update_is_the_papers_algorithm_1_in_both_orientations(x64):
  """Wide [4, 9], tall [9, 4] and each of three stacked [5, 8] expert
  matrices against the NumPy transcription, over two projector refreshes."""
  params = {
    "wide": jnp.zeros((4, 9)),
    "tall": jnp.zeros((9, 4)),
    "experts": {"w_up": jnp.zeros((3, 5, 8))},
  }
  hp = dict(r=2, gap=3, alpha=0.25, lr=0.1, b1=0.9, b2=0.95, eps=1e-8)
  opt = optax.chain(
    training.scale_by_galore(
      optax.scale_by_adam(b1=hp["b1"], b2=hp["b2"], eps=hp["eps"]),
      rank=hp["r"],
      update_gap=hp["gap"],
      scale=hp["alpha"],
    ),
    optax.scale(-hp["lr"]),
  )
  grads = _grads(jax.random.key(0), params, 7)
  updates, _ = _run(opt, params, grads)
  for name in ("wide", "tall"):
    want = _algorithm1([np.asarray(g[name]) for g in grads], **hp)
    np.testing.assert_allclose(
      [u[name] for u in updates], want, rtol=1e-9, atol=1e-12, err_msg=name
    )
  for e in range(3):
    want = _algorithm1(
      [np.asarray(g["experts"]["w_up"][e]) for g in grads], **hp
    )
    got = [u["experts"]["w_up"][e] for u in updates]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_projector_changes_only_at_multiples_of_the_gap():
  params = {"w": jnp.zeros((6, 10))}
  opt = training.scale_by_galore(rank=2, update_gap=3)
  state = opt.init(params)
  update = jax.jit(opt.update)
  changed = []
  for t, g in enumerate(_grads(jax.random.key(1), params, 8)):
    _, new = update(g, state)
    changed.append(
      (t, not np.array_equal(new.projectors["w"], state.projectors["w"]))
    )
    state = new
  assert [t for t, c in changed if c] == [0, 3, 6]
  assert state.projectors["w"].shape == (6, 2)  # P on the smaller side
  assert state.inner_state.mu["w"].shape == (2, 10)


def test_full_rank_equals_the_inner_optimizer_exactly():
  """rank >= min(m, n) of every matrix: the whole optimiser (clip, Adam,
  decay, schedule) is bitwise AdamW's."""
  params = {
    "w": jnp.zeros((6, 10)),
    "experts": {"w_down": jnp.zeros((2, 8, 6))},
    "mixer": {"wq": jnp.zeros((6, 2, 4))},
    "scale": jnp.zeros((6,)),
  }
  optim = training.OptimConfig(total_steps=10, warmup_steps=2)
  adamw = training.make_optimizer(optim)
  galore = training.make_optimizer(
    training.OptimConfig(
      total_steps=10,
      warmup_steps=2,
      optimizer="galore",
      galore=training.GaLoreConfig(rank=6, update_gap=2),
    )
  )
  grads = _grads(jax.random.key(2), params, 4)
  want, _ = _run(adamw, params, grads)
  got, _ = _run(galore, params, grads)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_matrix_axes_of_a_preset_and_its_pipeline_stacking():
  """Attention maps are `embed x rest`, experts and pipeline stages are
  stacks of matrices, vectors and convolutions are left alone; GaLore on
  pipeline-stacked params updates each layer as unstacked."""
  cfg = models.get_preset(
    "moe-hybrid",
    d_model=16,
    num_layers=4,
    num_heads=2,
    head_dim=8,
    moe_d_ff=8,
    num_experts=2,
    chunk_size=8,
  )
  params = models.init(jax.random.key(0), cfg)
  axes = jax.tree_util.tree_map_with_path(training.matrix_axes, params)
  attention, deltanet = axes["layers"][1]["mixer"], axes["layers"][0]["mixer"]
  assert attention["wq"] == (0, 1) and attention["wo"] == (0, 2)
  assert deltanet["conv_q"] is None and axes["final_norm"]["scale"] is None
  assert axes["layers"][0]["ffn"]["experts"]["w_up"] == (1, 2)
  assert axes["embed"] == (0, 1)
  stacked = pipeline.to_pipeline_params(params, 2)
  axes = jax.tree_util.tree_map_with_path(training.matrix_axes, stacked)
  assert axes["stages"][0]["ffn"]["experts"]["w_up"] == (3, 4)
  assert axes["stages"][1]["mixer"]["wo"] == (2, 4)

  opt = training.scale_by_galore(rank=2, update_gap=2)
  grads = _grads(jax.random.key(1), params, 3)
  flat, _ = _run(opt, params, grads)
  stack = lambda tree: pipeline.to_pipeline_params(tree, 2)
  piped, _ = _run(opt, stack(params), [stack(g) for g in grads])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    piped,
    [stack(u) for u in flat],
  )
  # The state keeps the leaves' ranks, so the partition rules place it.
  mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "tensor", "pipe"))
  parallel.param_partition_specs(jax.eval_shape(opt.init, stack(params)), mesh)


def test_resume_across_a_projector_refresh_is_exact(tmp_path):
  """Checkpoint the state mid-gap (step 2 of gap 3), restore, continue
  across the refresh at step 3: bitwise the uninterrupted run."""
  params = {"w": jnp.zeros((6, 10)), "b": jnp.zeros((10,))}
  opt = training.scale_by_galore(rank=2, update_gap=3)
  grads = _grads(jax.random.key(3), params, 5)
  want, final = _run(opt, params, grads)
  _, mid = _run(opt, params, grads[:2])
  manager = training.CheckpointManager(str(tmp_path))
  manager.save(2, training.checkpoint.snapshot(mid))
  restored, _ = manager.restore(2, jax.eval_shape(opt.init, params))
  got, resumed = _run(opt, params, grads[2:], restored)
  jax.tree.map(np.testing.assert_array_equal, got, want[2:])
  jax.tree.map(np.testing.assert_array_equal, resumed, final)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(rank=0), r"`galore_rank` must be a positive integer, got 0"),
    (dict(rank=-3), r"`galore_rank` must be a positive integer, got -3"),
    (dict(update_gap=0), r"`galore_update_gap` must be a positive integer"),
    (dict(scale=0.0), r"`galore_scale` must be finite and > 0"),
  ],
)
def test_bad_galore_config_names_the_flag(kwargs, match):
  with pytest.raises(ValueError, match=match):
    training.GaLoreConfig(**kwargs)
