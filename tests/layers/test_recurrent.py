"""Recurrent mixers: chunked == recurrent (outputs and gradients), carried
state == one call, shapes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import layers
from lightning_jax import ops
from tests.ops import recurrence_testing as rt

KINDS = layers.recurrent_kinds()


def _setup(kind, conv_size, impl="chunked"):
  cfg = layers.RecurrentConfig(
    kind, 16, 2, 4, value_dim=6, conv_size=conv_size, chunk_size=4, impl=impl
  )
  params = layers.init_recurrent(jax.random.key(0), cfg, layer=1, num_layers=3)
  x = jax.random.normal(jax.random.key(1), (2, 11, 16))
  return cfg, params, x


def test_chunked_matches_recurrent_outputs_and_grads():
  # The ops' tests cover every kernel; this covers the layer's gates, conv
  # and norms around one (the ops' twins differ, so the glue must agree).
  cfg, params, x = _setup("gated_deltanet", conv_size=4)
  ref_cfg = layers.RecurrentConfig(**{**cfg.__dict__, "impl": "recurrent"})

  def loss(c):
    def f(p, x):
      y, state = layers.recurrent_layer(p, x, c)
      return jnp.sum(jnp.sin(y)) + jnp.sum(state.ssm**2)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  rt.assert_trees_close(
    loss(cfg)(params, x),
    loss(ref_cfg)(params, x),
    rt.FP32_TOL,
    "chunked vs recurrent",
  )


@pytest.mark.parametrize("kind", KINDS)
def test_carried_state_equals_one_call(kind):
  cfg, params, x = _setup(kind, conv_size=3)
  layer = jax.jit(layers.recurrent_layer, static_argnums=2)
  y, state = layer(params, x, cfg)
  y1, s1 = layer(params, x[:, :6], cfg)
  y2, s2 = layer(params, x[:, 6:], cfg, s1)
  np.testing.assert_allclose(
    jnp.concatenate([y1, y2], 1), y, rtol=1e-5, atol=1e-5
  )
  rt.assert_trees_close(s2, state, dict(rtol=1e-5, atol=1e-5), "carried state")
  # Token by token with the reference scan, as a decoder runs it.
  ref_cfg = layers.RecurrentConfig(**{**cfg.__dict__, "impl": "recurrent"})
  step = jax.jit(lambda s, xt: layers.recurrent_layer(params, xt, ref_cfg, s))
  s, ys = layers.init_recurrent_state(cfg, 2), []
  for t in range(x.shape[1]):
    yt, s = step(s, x[:, t : t + 1])
    ys.append(yt)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), y, rtol=1e-5, atol=1e-5)


def test_short_conv_is_causal_convolution():
  w = jnp.arange(1.0, 4.0)[:, None, None]  # [3, 1, 1]
  x = jnp.arange(1.0, 6.0)[None, :, None, None]  # [1, 5, 1, 1]
  y, tail = layers.short_conv(w, x, jnp.zeros((1, 2, 1, 1)))
  # y_t = 1 x_{t-2} + 2 x_{t-1} + 3 x_t
  np.testing.assert_allclose(y[0, :, 0, 0], [3, 8, 14, 20, 26])
  np.testing.assert_allclose(tail[0, :, 0, 0], [4, 5])


def _conv_reference(w_KxHxC, x_BxTxHxC, tail_BxKm1xHxC):
  """The same convolution as one `lax.conv_general_dilated` (depthwise)."""
  k, h, c = w_KxHxC.shape
  padded = jnp.concatenate([tail_BxKm1xHxC, x_BxTxHxC], 1)
  b, n = padded.shape[:2]
  y = jax.lax.conv_general_dilated(
    padded.reshape(b, n, h * c),
    w_KxHxC.reshape(k, 1, h * c),
    window_strides=(1,),
    padding="VALID",
    dimension_numbers=("NWC", "WIO", "NWC"),
    feature_group_count=h * c,
  )
  return y.reshape(b, n - k + 1, h, c), padded[:, n - k + 1 :]


@pytest.mark.parametrize("seq", [1, 2, 7])
def test_short_conv_gradients_match_a_depthwise_conv(seq):
  """The hand-written backward == autodiff of `lax.conv_general_dilated`,
  also when T < K - 1 (the new tail reaches into the old one)."""
  keys = jax.random.split(jax.random.key(seq), 5)
  w = rt.normal(keys[0], (4, 2, 3))
  x = rt.normal(keys[1], (2, seq, 2, 3))
  tail = rt.normal(keys[2], (2, 3, 2, 3))
  cot = (rt.normal(keys[3], x.shape), rt.normal(keys[4], tail.shape))

  def grads(fn):
    def loss(*args):
      y, new_tail = fn(*args)
      return jnp.sum(y * cot[0]) + jnp.sum(new_tail * cot[1])

    return fn(w, x, tail), jax.grad(loss, argnums=(0, 1, 2))(w, x, tail)

  rt.assert_trees_close(
    grads(layers.short_conv), grads(_conv_reference), rt.FP32_TOL, "conv"
  )


def test_per_layer_constants_take_no_gradient():
  cfg, params, x = _setup("lightning", 0)
  grads = jax.jit(
    jax.grad(lambda p: jnp.sum(layers.recurrent_layer(p, x, cfg)[0]))
  )(params)
  np.testing.assert_array_equal(grads["log_decay"], 0.0)
  np.testing.assert_allclose(params["log_decay"], ops.tnl_log_decay(1, 3, 2))


def test_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="kind"):
    layers.RecurrentConfig("mamba", 16, 2, 4)
  with pytest.raises(ValueError, match="conv_size"):
    layers.RecurrentConfig("deltanet", 16, 2, 4, conv_size=1)
  cfg, params, _ = _setup("deltanet", 4)
  with pytest.raises(ValueError, match="x_BxTxD"):
    layers.recurrent_layer(params, jnp.ones((2, 3, 8)), cfg)
