"""MaskLLM: 2:4 candidates, groups along the input, prior, Gumbel-softmax,
annealing, frozen weights, dense embedding / output layer."""

import itertools
import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lightning_jax import adapt
from lightning_jax import models
from lightning_jax import parallel
from lightning_jax import training
from lightning_jax.adapt import maskllm
from lightning_jax.adapt import paths
from lightning_jax.adapt import qlora
from tests.adapt import adapt_testing

# One attention layer, untied output layer: `wq [32, 2, 16]`,
# `wo [2, 16, 32]`, `w_up [32, 64]`, `w_down [64, 32]`, `unembed [32, 64]`.
CFG = models.get_preset(
  "tiny-hybrid",
  pattern=("attention",),
  num_layers=1,
  d_model=32,
  num_heads=2,
  head_dim=16,
  d_ff=64,
  vocab_size=64,
  tie_embeddings=False,
)
MASK = adapt.MaskConfig(total_steps=4)


base = adapt_testing.base


def test_candidates_are_the_six_two_of_four_patterns():
  expected = {
    tuple(float(i in kept) for i in range(4))
    for kept in itertools.combinations(range(4), 2)
  }
  rows = {tuple(r) for r in maskllm.CANDIDATES.tolist()}
  assert maskllm.CANDIDATES.shape == (6, 4) and rows == expected


@pytest.mark.parametrize(
  "name, shape, matrix",
  [
    ("layers/0/mixer/wq", (32, 2, 16), (32, 32)),  # [D, H, Dh]: in D
    ("layers/0/mixer/wo", (2, 16, 32), (32, 32)),  # [H, Dh, D]: in H x Dh
    ("layers/0/ffn/w_down", (64, 32), (64, 32)),  # [F, D]: in F
    ("layers/0/ffn/experts/w_up", (3, 8, 12), (3, 8, 12)),  # [E, D, F]
  ],
)
def test_groups_run_along_the_input_dim(name, shape, matrix):
  """`groups[..., g, o, :] == W[..., 4g : 4g + 4, o]` of the `[*batch, in,
  out]` matrix view: the reduction dim of `x @ W`."""
  w = jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape)
  groups = maskllm.to_groups(w, name)
  mat = w.reshape(matrix)
  assert groups.shape == matrix[:-2] + (matrix[-2] // 4, matrix[-1], 4)
  for g, o in [(0, 0), (1, 5), (matrix[-2] // 4 - 1, matrix[-1] - 1)]:
    np.testing.assert_array_equal(
      groups[..., g, o, :], mat[..., 4 * g : 4 * g + 4, o]
    )
  np.testing.assert_array_equal(maskllm.from_groups(groups, name, shape), w)


def test_wq_and_wo_groups_in_their_own_layouts():
  wq = jax.random.normal(jax.random.key(0), (32, 2, 16))
  wo = jax.random.normal(jax.random.key(1), (2, 16, 32))
  # wq [D, H, Dh]: 4 consecutive d_model inputs of output (h, d).
  np.testing.assert_array_equal(
    maskllm.to_groups(wq, "layers/0/mixer/wq")[2, 1 * 16 + 3], wq[8:12, 1, 3]
  )
  # wo [H, Dh, D]: 4 consecutive head dims of head h, output e.
  np.testing.assert_array_equal(
    maskllm.to_groups(wo, "layers/0/mixer/wo")[(16 + 4) // 4, 7],
    wo[1, 4:8, 7],
  )


@st.composite
def leaves(draw):
  batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
  size_in = 4 * draw(st.integers(1, 6))
  out = draw(st.integers(1, 5))
  shape = batch + (size_in, out)
  seed = draw(st.integers(0, 2**16))
  return "custom/w", shape, seed


@hypothesis.settings(max_examples=6)
@hypothesis.given(leaves())
def test_hard_masks_keep_exactly_two_of_every_four(leaf):
  """Export (argmax) and magnitude masks: 0/1, exactly 2 ones per group of
  4 inputs; the exported weights have exactly 2 non-zeros per group."""
  name, shape, seed = leaf
  rng = np.random.default_rng(seed)
  params = {"custom": {"w": rng.normal(size=shape).astype(np.float32) + 3}}
  logits_shape = shape[:-2] + (shape[-2] // 4, shape[-1], 6)
  logits = {name: rng.normal(size=logits_shape).astype(np.float32)}
  cfg = adapt.MaskConfig(total_steps=1, targets=("custom/w",))

  @jax.jit
  def run(params, logits):
    sparse = maskllm.apply(params, logits, cfg)["custom"]["w"]
    exported = maskllm.masks(params, logits, cfg)[name]
    magnitude = maskllm.magnitude_masks(params, cfg)[name]
    return [maskllm.to_groups(x, name) for x in (exported, magnitude, sparse)]

  exported, magnitude, sparse = run(params, logits)
  for mask in (exported, magnitude):
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.sum(mask, -1), 2.0)
  np.testing.assert_array_equal(np.sum(sparse != 0, -1), 2)


def test_magnitude_mask_keeps_the_two_largest():
  w = jnp.array([[0.1, -3.0, 2.0, 0.5], [4.0, 1.0, -1.0, 0.0]]).T  # [4, 2]
  params = {"custom": {"w": w}}
  cfg = adapt.MaskConfig(total_steps=1, targets=("custom/w",))
  mask = maskllm.magnitude_masks(params, cfg)["custom/w"]
  np.testing.assert_array_equal(mask.T, [[0, 1, 1, 0], [1, 1, 0, 0]])


def _prior_case(size_in, size_out, strength):
  w = jax.random.normal(jax.random.key(3), (size_in, size_out))
  params = {"custom": {"w": w}}
  cfg = adapt.MaskConfig(
    total_steps=1, targets=("custom/w",), prior_strength=strength
  )
  init = jax.jit(maskllm.init, static_argnums=2)
  return params, cfg, init(jax.random.key(4), params, cfg)["custom/w"]


def test_prior_transfer_adds_strength_std_times_overlap_minus_one():
  """pi_k += alpha std(pi) (<CANDIDATES_k, M0> - 1): +alpha std on the
  prior's candidate, 0 on the four sharing one kept weight, -alpha std on
  its complement (the reference's `init_diff_mask_from_prior`)."""
  params, cfg, plain = _prior_case(64, 16, 0.0)
  _, _, prior = _prior_case(64, 16, 3.0)
  m0 = maskllm.to_groups(
    maskllm.magnitude_masks(params, cfg)["custom/w"], "custom/w"
  )
  overlap = m0 @ maskllm.CANDIDATES.T
  sigma = jnp.std(plain, ddof=1)
  np.testing.assert_allclose(
    prior - plain, 3.0 * sigma * (overlap - 1), rtol=1e-5, atol=1e-7
  )
  assert np.allclose(np.sort(overlap, -1), [0, 1, 1, 1, 1, 2])
  assert 0.009 < float(sigma) < 0.011  # init_std 0.01


def _normal_cdf(x):
  return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_strength3_prior_sets_the_step0_argmax_to_the_magnitude_mask():
  """With the paper's strength 3 the step-0 argmax is the magnitude mask
  wherever the N(0, std) init noise does not overturn the 3 std margin:
  P = int phi(z) Phi(z + 3)^4 Phi(z + 6) dz = 94.5% of groups (not all: the
  issue's "equal" holds in expectation); at strength 12, every group."""
  z = np.linspace(-10, 10, 4001)
  phi = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
  expected = np.trapezoid(phi * _normal_cdf(z + 3) ** 4 * _normal_cdf(z + 6), z)
  for strength, lo, hi in [
    (3.0, expected - 0.01, expected + 0.01),
    (12.0, 1, 1),
  ]:
    params, cfg, logits = _prior_case(256, 64, strength)  # 4096 groups
    m0 = maskllm.to_groups(
      maskllm.magnitude_masks(params, cfg)["custom/w"], "custom/w"
    )
    agree = np.mean(np.all(maskllm.hard_mask(logits) == m0, axis=-1))
    assert lo <= agree <= hi, (strength, agree, expected)


def test_soft_mask_tends_to_the_hard_mask_and_is_differentiable():
  logits = 0.01 * jax.random.normal(jax.random.key(0), (8, 5, 6))
  key = jax.random.key(1)
  noisy = 100.0 * logits + jax.random.gumbel(key, logits.shape)
  hard = maskllm.hard_mask(noisy)
  soft = jax.jit(maskllm.soft_mask)
  gaps = []
  for tau in (4.0, 1.0, 0.1, 1e-4):
    m = soft(logits, key, tau, 100.0)
    np.testing.assert_allclose(m.sum(-1), 2.0, rtol=1e-6)
    assert float(m.min()) >= 0 and float(m.max()) <= 1 + 1e-6
    gaps.append(float(jnp.abs(m - hard).mean()))
  assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.1
  assert gaps[-1] < 1e-6
  w = jax.random.normal(jax.random.key(2), (8, 5, 4))
  grad = jax.grad(lambda lg: jnp.sum(soft(lg, key, 4.0, 100.0) * w))(logits)
  assert np.isfinite(grad).all() and float(jnp.abs(grad).min()) > 0


def test_annealing_start_middle_end():
  cfg = adapt.MaskConfig(total_steps=10)
  for step, expected in [
    (0, (4.0, 100.0, 1e-5)),
    (5, (2.025, 300.0, 5e-6)),
    (10, (0.05, 500.0, 0.0)),
    (20, (0.05, 500.0, 0.0)),
  ]:
    np.testing.assert_allclose(
      maskllm.annealing(cfg, step), expected, rtol=1e-6, atol=1e-12
    )


def _train_step(opt, cfg=MASK):
  """The train step `training.train` runs for MaskLLM: `mask_grad_fn` at
  the state's step."""
  model_grad_fn = training.default_grad_fn(CFG, training.LossConfig())

  def train_step(state, batch):
    grad_fn = maskllm.mask_grad_fn(model_grad_fn, cfg, state.step)
    return training.make_train_step(opt, lambda s: 1e-2, grad_fn)(state, batch)

  return train_step


def test_train_steps_change_only_the_logits(base):
  """AdamW steps with `maskllm.mask_grad_fn` at the state's step: the
  weights are bitwise unchanged, the optimiser holds state for the logits
  only, the annealing values are the step's."""
  params = {"base": base, "mask": maskllm.init(jax.random.key(1), base, MASK)}
  opt = maskllm.freeze_base(optax.adamw(1e-2))
  step = jax.jit(_train_step(opt))
  state = training.init_train_state(params, opt, jax.random.key(2))
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moments == 2 * sum(x.size for x in jax.tree.leaves(params["mask"]))
  for i in range(2):
    state, metrics = step(state, adapt_testing.batch(CFG, i))
    assert np.isfinite(float(metrics["loss"]))
    assert float(metrics["sparse_weight_norm"]) > 0
  assert float(metrics["mask/temperature"]) == pytest.approx(4 - 3.95 / 4)
  for x, y in zip(
    jax.tree.leaves(state.params["base"]), jax.tree.leaves(base), strict=True
  ):
    np.testing.assert_array_equal(x, y)
  for name, pi in state.params["mask"].items():
    assert float(jnp.abs(pi - params["mask"][name]).max()) > 0, name


def test_sharded_logits_follow_their_weights_and_equal_one_device(base):
  """On data=2 x fsdp=2 x tensor=2 each logits leaf `[*batch, in / 4, out,
  6]` takes its weight's axes (`wq [D, H, Dh]` on (fsdp, tensor, -):
  `[D / 4, H Dh, 6]` on (fsdp, tensor, -)); the sharded loss and logits
  gradients equal one device's up to reassociation."""
  logits = maskllm.init(jax.random.key(1), base, MASK)
  params = {"base": base, "mask": logits}
  mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
  shardings = maskllm.shardings(params, mesh)
  specs = {n: tuple(s.spec) for n, s in shardings["mask"].items()}
  assert specs["layers/0/mixer/wq"] == ("fsdp", "tensor", None)
  assert specs["layers/0/mixer/wo"] == ("tensor", "fsdp", None)  # [H, Dh, D]
  assert specs["layers/0/ffn/w_down"] == ("tensor", "fsdp", None)  # [F, D]
  batch = adapt_testing.batch(CFG, rows=4)
  grad_fn = jax.jit(
    maskllm.mask_grad_fn(
      training.default_grad_fn(CFG, training.LossConfig()), MASK, 1
    )
  )
  rng = jax.random.key(3)
  (loss, _), grads = grad_fn(params, batch, rng)
  placed = jax.device_put(params, shardings)
  (loss_sharded, _), grads_sharded = grad_fn(
    placed, jax.device_put(batch, parallel.batch_sharding(mesh)), rng
  )
  np.testing.assert_allclose(loss_sharded, loss, rtol=1e-5)
  for name, g in grads["mask"].items():
    sharded = grads_sharded["mask"][name]
    np.testing.assert_allclose(sharded, g, rtol=1e-5, atol=1e-6, err_msg=name)
    assert sharded.sharding.is_equivalent_to(shardings["mask"][name], g.ndim)


def test_logits_save_and_load_onto_shardings(base, tmp_path):
  logits = maskllm.init(jax.random.key(1), base, MASK)
  manager = training.CheckpointManager(tmp_path / "mask")
  maskllm.save_logits(manager, 3, logits, MASK)
  mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
  shardings = maskllm.shardings({"base": base, "mask": logits}, mesh)["mask"]
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    logits,
    shardings,
  )
  loaded, cfg = maskllm.load_logits(manager, 3, target)
  assert cfg == MASK and set(loaded) == set(logits)
  for name, pi in logits.items():
    np.testing.assert_array_equal(loaded[name], pi)
    assert loaded[name].sharding == shardings[name]
  with pytest.raises(ValueError, match="holds no 'lora' config"):
    adapt.lora.load_adapters(manager)


def test_weight_regulariser_gradient():
  """The objective adds -lambda(t) sum ||W * m||^2 over the soft-masked
  targets; its logits gradient is that of the direct expression."""
  base = {"custom": {"w": jax.random.normal(jax.random.key(0), (16, 8))}}
  cfg = adapt.MaskConfig(total_steps=4, targets=("custom/w",))
  logits = maskllm.init(jax.random.key(1), base, cfg)
  rng = jax.random.key(5)

  def no_loss(model_params, batch, rng):
    del batch, rng
    return (0.0, {}), jax.tree.map(jnp.zeros_like, model_params)

  (loss, metrics), grads = jax.jit(maskllm.mask_grad_fn(no_loss, cfg, 1))(
    {"base": base, "mask": logits}, None, rng
  )

  def direct(lg):
    masked = maskllm.apply(
      base, lg, cfg, rng=jax.random.fold_in(rng, 1), step=1
    )
    return -0.75e-5 * maskllm.weight_norm(masked, ["custom/w"])

  value, expected = jax.value_and_grad(direct)(logits)
  np.testing.assert_allclose(loss, value, rtol=1e-5)
  np.testing.assert_allclose(
    metrics["sparse_weight_norm"], value / -0.75e-5, rtol=1e-5
  )
  np.testing.assert_allclose(
    grads["mask"]["custom/w"], expected["custom/w"], rtol=1e-4, atol=1e-12
  )
  assert float(jnp.abs(expected["custom/w"]).max()) > 0
  np.testing.assert_array_equal(grads["base"]["custom"]["w"], 0.0)


def test_embedding_and_output_layer_stay_dense(base):
  logits = maskllm.init(jax.random.key(1), base, MASK)
  names = set(logits)
  assert any(n.endswith("mixer/wo") for n in names)
  assert any(n.endswith("ffn/w_down") for n in names)
  sparse = maskllm.apply(base, logits, MASK)
  flat_base, flat_sparse = (
    paths.named_leaves(base),
    paths.named_leaves(sparse),
  )
  for name, w in flat_base.items():
    if name in names:
      zeros = np.sum(maskllm.to_groups(flat_sparse[name], name) == 0, -1)
      np.testing.assert_array_equal(zeros, 2)
    else:
      np.testing.assert_array_equal(flat_sparse[name], w)
  assert {"embed", "unembed"} <= set(flat_base) - names
  for pattern in ("embed", "unembed"):
    with pytest.raises(ValueError, match="stay dense"):
      maskllm.targets(base, adapt.MaskConfig(1, targets=(pattern,)))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(total_steps=0), "`total_steps` must be a positive"),
    (dict(temperature=(4.0, 0.0)), "`temperature` must be a .start, end."),
    (dict(logit_scale=(1e2,)), "`logit_scale` must be a .start, end."),
    (dict(prior_strength=-1.0), "`prior_strength` must be finite and >= 0"),
    (dict(weight_reg=math.nan), "`weight_reg` must be finite and >= 0"),
    (dict(init_std=0.0), "`init_std` must be finite and > 0"),
    (dict(targets="mixer/wq"), "`targets` must be a non-empty tuple"),
  ],
)
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    adapt.MaskConfig(**dict(dict(total_steps=10), **kwargs))


def test_bad_targets_and_logits(base):
  odd = {"custom": {"w": jnp.ones((6, 8))}}
  with pytest.raises(ValueError, match="input size 6 .* divisible by 4"):
    maskllm.init(jax.random.key(0), odd, adapt.MaskConfig(1, ("custom/w",)))
  with pytest.raises(ValueError, match="NF4 leaf"):
    maskllm.init(jax.random.key(0), qlora.quantize(base), MASK)
  with pytest.raises(ValueError, match="matches no leaf"):
    maskllm.init(jax.random.key(0), base, adapt.MaskConfig(1, ("nope",)))
  logits = maskllm.init(jax.random.key(0), base, MASK)
  name = next(iter(logits))
  with pytest.raises(ValueError, match=r"`logits\[.*\]` must have shape"):
    maskllm.apply(base, dict(logits, **{name: logits[name][..., :4]}), MASK)
  with pytest.raises(ValueError, match="not in the params"):
    maskllm.apply(base, {"nope/w": logits[name]}, MASK)
  with pytest.raises(ValueError, match="has no mask for target"):
    maskllm.init(jax.random.key(0), base, MASK, prior={})
