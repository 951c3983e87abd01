"""GLU MLP layer against its formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import layers

CFG = layers.MLPConfig(d_model=8, d_ff=16)
_init_mlp = jax.jit(layers.init_mlp, static_argnums=1)
X = jnp.asarray(
  np.random.default_rng(1).standard_normal((2, 3, 8)), jnp.float32
)


def _reference(params, x, act):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  return (act(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_mlp_matches_formula(activation):
  cfg = layers.MLPConfig(d_model=8, d_ff=16, activation=activation)
  params = _init_mlp(jax.random.key(0), CFG)  # same shapes
  x = X
  act = {
    "silu": lambda h: h / (1 + np.exp(-h)),
    "gelu": lambda h: (
      0.5
      * h
      * (
        1
        + np.tanh(  # tanh approximation
          np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)
        )
      )
    ),
    "relu": lambda h: np.maximum(h, 0),
  }[activation]
  np.testing.assert_allclose(
    layers.mlp(params, x, cfg), _reference(params, x, act), rtol=1e-5, atol=1e-5
  )


def test_mlp_bf16_keeps_dtype_and_is_close():
  params = _init_mlp(jax.random.key(0), CFG)
  x = X
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  y = layers.mlp(bf16, x.astype(jnp.bfloat16), CFG)
  assert y.dtype == jnp.bfloat16
  # bf16 inputs and hidden: ~3 significant digits.
  np.testing.assert_allclose(
    np.asarray(y, np.float32), layers.mlp(params, x, CFG), rtol=5e-2, atol=5e-2
  )


def test_init_shapes_and_scale():
  params = _init_mlp(jax.random.key(0), layers.MLPConfig(64, 256))
  assert params["w_gate"].shape == params["w_up"].shape == (64, 256)
  assert params["w_down"].shape == (256, 64)
  np.testing.assert_allclose(np.std(params["w_gate"]), 64**-0.5, rtol=0.1)


def test_bad_input():
  params = _init_mlp(jax.random.key(0), CFG)
  with pytest.raises(ValueError, match="x_BxTxD"):
    layers.mlp(params, jnp.ones((3, 8)), CFG)
  with pytest.raises(ValueError, match="x_BxTxD"):
    layers.mlp(params, jnp.ones((2, 3, 4)), CFG)
  with pytest.raises(ValueError, match="activation"):
    layers.MLPConfig(8, 16, activation="tanh")
  with pytest.raises(ValueError, match="d_ff"):
    layers.MLPConfig(8, 0)
