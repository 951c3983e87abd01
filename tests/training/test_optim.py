"""AdamW + warmup/cosine schedule + clipping, and the microbatch split."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lightning_jax import training
from lightning_jax.parallel import pipeline


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
  cfg = training.OptimConfig(
    lr=1.0, total_steps=10, warmup_steps=4, min_lr_ratio=0.1
  )
  lr = training.learning_rate(cfg)
  np.testing.assert_allclose([lr(s) for s in (0, 2, 4)], [0.0, 0.5, 1.0])
  np.testing.assert_allclose(lr(7), 0.1 + 0.9 * 0.5, rtol=1e-6)  # halfway
  np.testing.assert_allclose(lr(10), 0.1, rtol=1e-6)


def test_weight_decay_only_on_matrices_and_clipping_by_global_norm():
  cfg = training.OptimConfig(
    lr=0.5, total_steps=4, warmup_steps=0, weight_decay=0.1, clip_norm=1.0
  )
  opt = training.make_optimizer(cfg)
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zero, opt.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.5 * 0.1 * np.ones((2, 2)))
  np.testing.assert_array_equal(updates["scale"], np.zeros(2))
  # Clipping: a huge gradient gives the same update as its unit-norm version.
  grad = {"w": jnp.full((2, 2), 1e6), "scale": jnp.zeros((2,))}
  unit = jax.tree.map(lambda g: g / optax.tree.norm(grad), grad)
  big, _ = opt.update(grad, opt.init(params), params)
  small, _ = opt.update(unit, opt.init(params), params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), big, small
  )


def test_pipeline_stacked_params_decay_like_the_layers():
  """The `[repeats, stages]` axes do not make vectors decay."""
  opt = training.make_optimizer(
    training.OptimConfig(
      lr=0.5, total_steps=4, warmup_steps=0, weight_decay=0.1
    )
  )
  layer = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  params = {"embed": jnp.ones((3, 2)), "layers": (layer,) * 4}

  def update(params):
    zero = jax.tree.map(jnp.zeros_like, params)
    return opt.update(zero, opt.init(params), params)[0]

  stack = lambda tree: pipeline.to_pipeline_params(tree, 2, repeats=2)
  jax.tree.map(
    np.testing.assert_array_equal, update(stack(params)), stack(update(params))
  )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(warmup_steps=20, total_steps=10), "warmup_steps"),
    (dict(lr=0.0), "lr"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio"),
    (dict(clip_norm=-1.0), "clip_norm"),
    (dict(optimizer="sgd"), r"`optimizer` must be one of adamw, galore"),
    (
      dict(galore=training.GaLoreConfig(rank=4)),
      r"GaLore options \(--galore_\*\) need --optimizer=galore, got "
      r"--optimizer=adamw",
    ),
  ],
)
def test_bad_optim_config_names_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    training.OptimConfig(**kwargs)
