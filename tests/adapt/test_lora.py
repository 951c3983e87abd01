"""LoRA: step 0 == base, merged == two-path, frozen base, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lightning_jax import adapt
from lightning_jax import models
from lightning_jax import training
from lightning_jax.adapt import lora
from lightning_jax.adapt import qlora
from lightning_jax.parallel import pipeline
from tests.adapt import adapt_testing

# One attention layer with top-2-of-4 experts: projections `[D, H, Dh]`,
# `[H, Dh, D]` and expert-stacked `[E, D, F]` targets.
CFG = models.get_preset(
  "moe-hybrid",
  pattern=("attention",),
  d_model=64,
  num_layers=1,
  num_heads=2,
  num_experts=4,
  moe_d_ff=64,
  vocab_size=64,
)
LORA = adapt.LoraConfig(rank=4, alpha=8.0)


base = adapt_testing.base


def test_step_zero_equals_base(base):
  adapters = lora.init(jax.random.key(1), base, LORA)
  assert any("experts" in n for n in adapters)
  assert any(n.endswith("mixer/wo") for n in adapters)
  tokens = adapt_testing.batch(CFG)["inputs"]
  forward = jax.jit(lambda p: models.forward(p, tokens, CFG)[0])
  merged = jax.jit(lambda b, a: lora.apply(b, a, LORA))(base, adapters)
  np.testing.assert_array_equal(forward(merged), forward(base))


def test_merged_equals_two_path_product_and_unmerge_inverts(base):
  """For every target viewed as matrices `[*batch, in, out]`:
  `x W' == x W + (alpha / r) (x A) B` (fp32), and unmerge(merge) == W."""
  adapters = adapt_testing.random_b(lora.init(jax.random.key(1), base, LORA))
  shapes = dict(adapt.paths.leaf_names(base))

  @jax.jit
  def products(base, adapters):
    merged = lora.apply(base, adapters, LORA)
    weights = {
      adapt.paths.path_name(p): (w, m)
      for (p, w), m in zip(
        jax.tree_util.tree_leaves_with_path(base),
        jax.tree.leaves(merged),
        strict=True,
      )
    }
    out = {}
    for name, ad in adapters.items():
      shape = shapes[name]
      view = adapt.matrix_view(name, shape)
      batch = shape[: view.batch]
      fan_in = int(np.prod(shape[view.batch : view.batch + view.fan_in]))
      w, m = (x.reshape(batch + (fan_in, -1)) for x in weights[name])
      a = ad["a"].reshape(batch + (fan_in, -1))
      b = ad["b"].reshape(batch + (LORA.rank, -1))
      x = jax.random.normal(jax.random.key(2), batch + (3, fan_in))
      out[name] = (x @ m, x @ w + LORA.scale * ((x @ a) @ b))
    return out, lora.unmerge(merged, adapters, LORA)

  pairs, back = products(base, adapters)
  for merged_product, two_path in pairs.values():
    np.testing.assert_allclose(merged_product, two_path, rtol=1e-5, atol=1e-5)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(base), strict=True):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_matrix_views_of_model_and_stacked_leaves():
  view = adapt.matrix_view
  assert view("layers/0/mixer/wq", (64, 2, 32)) == (0, 1)
  assert view("layers/0/mixer/wo", (2, 32, 64)) == (0, 2)
  assert view("layers/0/ffn/experts/w_down", (4, 64, 64)) == (1, 1)
  assert view("stages/0/ffn/experts/w_up", (1, 2, 4, 64, 64)) == (3, 1)
  assert view("stages/0/mixer/wo", (1, 2, 2, 32, 64)) == (2, 2)
  assert view("custom/w", (3, 5, 7)) == (1, 1)


def test_pipeline_stacked_leaves_get_one_adapter_per_matrix(base):
  """A stage-stacked `[repeats, stages, experts, D, F]` leaf (as
  `pipeline.stack_stages` builds): slice `[r, s]` gets the delta of its own
  adapter, as that layer's leaf would."""
  w_up = base["layers"][0]["ffn"]["experts"]["w_up"]
  w = jnp.stack([w_up, -w_up]).reshape((1, 2) + w_up.shape)
  stacked = {pipeline.STAGES_KEY: ({"ffn": {"experts": {"w_up": w}}},)}
  cfg = adapt.LoraConfig(targets=(adapt.MLP,), rank=4, alpha=8.0)
  adapters = adapt_testing.random_b(lora.init(jax.random.key(1), stacked, cfg))
  name = "stages/0/ffn/experts/w_up"
  assert adapters[name]["a"].shape == (1, 2, 4, 64, 4)
  full = lora.delta(adapters[name], name, w.shape, LORA.scale)
  for s in range(2):
    one = jax.tree.map(lambda x, s=s: x[0, s], adapters[name])
    np.testing.assert_allclose(
      full[0, s],
      lora.delta(one, "layers/0/ffn/experts/w_up", w.shape[2:], LORA.scale),
      rtol=1e-6,
    )


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_train_steps_change_only_the_adapters(base, kind):
  """A few AdamW steps through `training.make_train_step`: the base is
  bitwise unchanged, the optimiser holds state for the adapters only."""
  frozen = qlora.quantize(base) if kind == "nf4" else base
  cfg = adapt.LoraConfig(rank=4, alpha=8.0, dropout=0.1)
  params = {"base": frozen, "lora": lora.init(jax.random.key(1), base, cfg)}
  opt = lora.freeze_base(optax.adamw(1e-2))
  grad_fn = lora.lora_grad_fn(
    training.default_grad_fn(CFG, training.LossConfig()), cfg
  )
  step = jax.jit(training.make_train_step(opt, lambda s: 1e-2, grad_fn))
  state = training.init_train_state(params, opt, jax.random.key(2))
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moments == 2 * sum(x.size for x in jax.tree.leaves(params["lora"]))
  losses = []
  for i in range(2):
    state, metrics = step(state, adapt_testing.batch(CFG, i))
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all()
  for x, y in zip(
    jax.tree.leaves(state.params["base"]), jax.tree.leaves(frozen), strict=True
  ):
    np.testing.assert_array_equal(x, y)
  for ad in state.params["lora"].values():
    assert float(jnp.abs(ad["b"]).max()) > 0


def test_adapters_save_and_load(base, tmp_path):
  adapters = adapt_testing.random_b(lora.init(jax.random.key(1), base, LORA))
  manager = training.CheckpointManager(tmp_path / "lora")
  lora.save_adapters(manager, 7, adapters, LORA)
  loaded, cfg = lora.load_adapters(manager)
  assert cfg == LORA and set(loaded) == set(adapters)
  for name, ad in adapters.items():
    np.testing.assert_array_equal(loaded[name]["a"], ad["a"])
    np.testing.assert_array_equal(loaded[name]["b"], ad["b"])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(targets=(r".*mixer/nope",)), "matches no leaf; leaves with >= 2"),
    (dict(targets=(r".*final_norm/scale",)), "is not a matrix"),
    (dict(targets=("(",)), "bad pattern"),
  ],
)
def test_bad_targets(base, kwargs, match):
  with pytest.raises(ValueError, match=match):
    lora.init(jax.random.key(0), base, adapt.LoraConfig(**kwargs))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(rank=0), "`rank` must be a positive"),
    (dict(alpha=-1.0), "`alpha` must be finite"),
    (dict(dropout=1.0), r"`dropout` must be in \[0, 1\)"),
    (dict(targets="mixer/wq"), "`targets` must be a non-empty tuple"),
  ],
)
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    adapt.LoraConfig(**kwargs)


def test_unknown_adapter_leaf(base):
  with pytest.raises(ValueError, match="not in the params"):
    lora.apply(base, {"nope/w": {}}, LORA)
