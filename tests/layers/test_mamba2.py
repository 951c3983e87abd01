"""Mamba-2: the layer == a step-by-step reference written from the paper's
equations (outputs and gradients, fp32 tol 2e-5), chunked == recurrent,
carried state == one call, errors name the argument. Decoding, causality,
sharding rules, pipelining and the preset are covered by the tests that
iterate every registered mixer."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import layers
from lightning_jax.layers import mamba2
from tests import mixer_testing as mt

TOL = dict(rtol=2e-5, atol=2e-5)


def _reference(params, x_BxTxD, cfg):
  """h_t = exp(dt_t A) h_{t-1} + B_t (x_t dt_t)^T, y_t = h_t^T C_t + D x_t,
  one token at a time, with its own conv, gate and norm."""
  batch, seq, _ = x_BxTxD.shape
  h, p, g, n = cfg.num_heads, cfg.head_dim, cfg.num_groups, cfg.state_dim
  proj = x_BxTxD @ params["in_proj"]
  z = proj[..., : cfg.d_inner]
  xbc = proj[..., cfg.d_inner : cfg.d_inner + cfg.conv_dim]
  dt = proj[..., cfg.d_inner + cfg.conv_dim :]
  w = params["conv1d"]["weight"]  # [K, C]
  k = w.shape[0]
  padded = jnp.pad(xbc, ((0, 0), (k - 1, 0), (0, 0)))
  conv = sum(w[j][None, None] * padded[:, j : j + seq] for j in range(k))
  xbc = jax.nn.silu(conv + params["conv1d"]["bias"][None, None])
  x = xbc[..., : cfg.d_inner].reshape(batch, seq, h, p)
  b = xbc[..., cfg.d_inner : cfg.d_inner + g * n].reshape(batch, seq, g, n)
  c = xbc[..., cfg.d_inner + g * n :].reshape(batch, seq, g, n)
  dt = jax.nn.softplus(dt + params["dt_bias"][None, None])
  a = -jnp.exp(params["A_log"])
  state = jnp.zeros((batch, h, n, p))
  ys = []
  for t in range(seq):
    group = jnp.arange(h) // (h // g)
    bt, ct = b[:, t][:, group], c[:, t][:, group]  # [B, H, N]
    decay = jnp.exp(dt[:, t] * a[None])[..., None, None]
    state = (
      decay * state
      + bt[..., None] * (x[:, t] * dt[:, t, :, None])[:, :, None, :]
    )
    ys.append(
      jnp.einsum("bhnp,bhn->bhp", state, ct)
      + params["D"][None, :, None] * x[:, t]
    )
  y = jnp.stack(ys, 1).reshape(batch, seq, cfg.d_inner) * jax.nn.silu(z)
  y = y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + cfg.norm_eps)
  return (y * params["norm"]["scale"][None, None]) @ params["out_proj"]


@hypothesis.settings(max_examples=4)
@hypothesis.given(
  seed=st.integers(0, 2**16),
  groups=st.sampled_from([1, 2]),
  seq=st.sampled_from([1, 6]),
)
def test_layer_matches_the_step_by_step_reference(seed, groups, seq):
  cfg = mamba2.Mamba2Config(
    8, 2, 3, state_dim=4, num_groups=groups, conv_size=3, chunk_size=4
  )
  params = mamba2.init_mamba2(jax.random.key(seed), cfg)
  params["conv1d"]["bias"] = 0.1 * jnp.ones_like(params["conv1d"]["bias"])
  x = jax.random.normal(jax.random.key(seed + 1), (2, seq, 8))
  mt.assert_layer_matches_reference(
    lambda p, x: mamba2.mamba2_layer(p, x, cfg)[0],
    lambda p, x: _reference(p, x, cfg),
    params,
    x,
    TOL,
  )


def test_chunked_equals_recurrent_and_a_carried_state_equals_one_call():
  cfg = mamba2.Mamba2Config(8, 2, 3, state_dim=4, conv_size=3, chunk_size=4)
  ref = mamba2.Mamba2Config(8, 2, 3, state_dim=4, conv_size=3, impl="recurrent")
  params = mamba2.init_mamba2(jax.random.key(0), cfg)
  x = jax.random.normal(jax.random.key(1), (2, 11, 8))
  y, state = mamba2.mamba2_layer(params, x, cfg)
  np.testing.assert_allclose(mamba2.mamba2_layer(params, x, ref)[0], y, **TOL)
  y1, s1 = mamba2.mamba2_layer(params, x[:, :5], cfg)
  y2, s2 = mamba2.mamba2_layer(params, x[:, 5:], cfg, s1)
  np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), s2, state)


def test_bad_config_and_input_name_the_argument():
  with pytest.raises(ValueError, match="num_groups"):
    mamba2.Mamba2Config(8, 3, 4, num_groups=2)
  with pytest.raises(ValueError, match="conv_size"):
    mamba2.Mamba2Config(8, 2, 4, conv_size=1)
  cfg = mamba2.Mamba2Config(8, 2, 4)
  with pytest.raises(ValueError, match="x_BxTxD"):
    mamba2.mamba2_layer(
      mamba2.init_mamba2(jax.random.key(0), cfg), jnp.ones((1, 3, 5)), cfg
    )
  assert "mamba2" in layers.mixers.kinds()
