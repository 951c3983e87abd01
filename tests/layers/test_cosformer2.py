"""cosFormer2: the layer == a reference written from the paper's equations
in their relative form (outputs and gradients, fp32 tol 2e-5), chunked ==
recurrent, carried state == one call, errors name the argument. Decoding,
causality, sharding rules, pipelining and the preset are covered by the
tests that iterate every registered mixer."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import layers
from lightning_jax.layers import cosformer2
from tests import mixer_testing as mt

TOL = dict(rtol=2e-5, atol=2e-5)


def _reference(params, x_BxTxD, cfg):
  """o_t = sum_{s <= t} sum_j q_tj k_sj cos(theta_j (t - s)) v_s with
  q, k = SiLU(x W), as a masked T x T form; then SRMSNorm over all heads,
  the low-rank sigmoid gate and W_o."""
  batch, seq, _ = x_BxTxD.shape
  h, c = cfg.num_heads, cfg.head_dim
  q = jax.nn.silu(jnp.einsum("btd,dhc->bhtc", x_BxTxD, params["wq"]))
  k = jax.nn.silu(jnp.einsum("btd,dhc->bhtc", x_BxTxD, params["wk"]))
  v = jnp.einsum("btd,dhc->bhtc", x_BxTxD, params["wv"])
  theta = params["lrpe_theta"].reshape(h, c)
  t = jnp.arange(seq)
  dist = (t[:, None] - t[None, :]).astype(jnp.float32)  # [T, T]
  reweight = jnp.cos(theta[:, None, None, :] * dist[None, :, :, None])
  scores = jnp.einsum("bhtj,bhsj,htsj->bhts", q, k, reweight)
  scores = jnp.where(t[:, None] >= t[None, :], scores, 0.0)
  o = jnp.einsum("bhts,bhsc->bthc", scores, v).reshape(batch, seq, h * c)
  o = o * jax.lax.rsqrt(jnp.mean(o * o, -1, keepdims=True) + cfg.norm_eps)
  gate = jax.nn.sigmoid(
    x_BxTxD @ params["wg_down"] @ params["wg_up"].reshape(-1, h * c)
  )
  return (o * gate) @ params["wo"].reshape(h * c, -1)


@hypothesis.settings(max_examples=4, deadline=None)
@hypothesis.given(
  seed=st.integers(0, 2**16),
  heads=st.sampled_from([1, 2]),
  seq=st.sampled_from([1, 7]),
)
def test_layer_matches_the_relative_form_reference(seed, heads, seq):
  cfg = cosformer2.CosFormer2Config(8, heads, 4, gate_rank=3, chunk_size=4)
  params = cosformer2.init_cosformer2(jax.random.key(seed), cfg)
  # Frequencies of order 1, so the cos reweighting matters at T = 7.
  params["lrpe_theta"] = jax.random.uniform(
    jax.random.key(seed + 2), (heads * 4,), maxval=2.0
  )
  x = jax.random.normal(jax.random.key(seed + 1), (2, seq, 8))
  mt.assert_layer_matches_reference(
    lambda p, x: cosformer2.cosformer2_layer(p, x, cfg)[0],
    lambda p, x: _reference(p, x, cfg),
    params,
    x,
    TOL,
  )


def test_chunked_equals_recurrent_and_a_carried_state_equals_one_call():
  cfg = cosformer2.CosFormer2Config(8, 2, 4, chunk_size=4)
  ref = cosformer2.CosFormer2Config(8, 2, 4, impl="recurrent")
  params = cosformer2.init_cosformer2(jax.random.key(0), cfg)
  params["lrpe_theta"] = jnp.linspace(0.05, 1.5, 8)
  x = jax.random.normal(jax.random.key(1), (2, 11, 8))
  y, state = cosformer2.cosformer2_layer(params, x, cfg)
  np.testing.assert_allclose(
    cosformer2.cosformer2_layer(params, x, ref)[0], y, **TOL
  )
  y1, s1 = cosformer2.cosformer2_layer(params, x[:, :5], cfg)
  y2, s2 = cosformer2.cosformer2_layer(params, x[:, 5:], cfg, s1)
  np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), s2, state)
  np.testing.assert_array_equal(state.position, [11, 11])


def test_bad_config_and_input_name_the_argument():
  with pytest.raises(ValueError, match="num_heads"):
    cosformer2.CosFormer2Config(8, 0, 4)
  with pytest.raises(ValueError, match="gate_rank"):
    cosformer2.CosFormer2Config(8, 2, 4, gate_rank=0)
  with pytest.raises(ValueError, match="impl"):
    cosformer2.CosFormer2Config(8, 2, 4, impl="quadratic!")
  with pytest.raises(ValueError, match="lrpe_base"):
    cosformer2.CosFormer2Config(8, 2, 4, lrpe_base=1.0)
  cfg = cosformer2.CosFormer2Config(8, 2, 4)
  params = cosformer2.init_cosformer2(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match="x_BxTxD"):
    cosformer2.cosformer2_layer(params, jnp.ones((1, 3, 5)), cfg)
  bad = cosformer2.init_cosformer2_state(cfg, 2)._replace(
    ssm=jnp.zeros((2, 2, 4, 4))
  )
  with pytest.raises(ValueError, match="state.ssm"):
    cosformer2.cosformer2_layer(params, jnp.ones((2, 3, 8)), cfg, bad)
  assert "cosformer2" in layers.mixers.kinds()
