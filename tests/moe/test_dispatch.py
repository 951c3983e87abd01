"""Dropless ragged == expert loop; capacity drops exactly the expected slots."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import moe

D, F, E = 8, 12, 4
# fp32: same products, different summation order; bf16: inputs rounded to
# bf16 and the hidden cast to bf16 before the down projection.
TOL = {
  jnp.float32: dict(rtol=1e-5, atol=1e-5),
  jnp.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def _problem(seed, num_tokens, top_k, dtype, skew=0.0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  x = jnp.asarray(normal(num_tokens, D), dtype)
  glu_weights = moe.GLUWeights(
    jnp.asarray(normal(E, D, F) / 3, dtype),
    jnp.asarray(normal(E, D, F) / 3, dtype),
    jnp.asarray(normal(E, F, D) / 4, dtype),
  )
  logits = normal(num_tokens, E)
  logits[:, 0] += skew
  r = moe.route(jnp.asarray(logits), top_k)
  cot = jnp.asarray(normal(num_tokens, D))
  return x, r, glu_weights, cot


@functools.partial(jax.jit, static_argnames=("impl",))
def _dropless_vjp(x, weights, experts, glu_weights, cot, impl):
  def f(x, weights, glu_weights):
    y = moe.dropless_moe(x, weights, experts, glu_weights, impl=impl)
    return jnp.sum(y.astype(jnp.float32) * cot), y

  (_, y), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
    x, weights, glu_weights
  )
  return y, grads


@pytest.mark.parametrize(
  "dtype,top_k", [(jnp.float32, 1), (jnp.float32, 2), (jnp.bfloat16, 2)]
)
@hypothesis.given(seed=st.integers(0, 2**16), skew=st.floats(0, 6))
def test_dropless_ragged_equals_expert_loop(dtype, top_k, seed, skew):
  x, r, w, cot = _problem(seed, 16, top_k, dtype, skew)
  out = _dropless_vjp(x, r.weights, r.experts, w, cot, "ragged")
  ref = _dropless_vjp(x, r.weights, r.experts, w, cot, "loop")
  assert out[0].dtype == dtype
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), **TOL[dtype]
    )


def _expected_kept(weights, experts, capacity, drop_policy):
  """Queue simulation: choice rank by choice rank, tokens in policy order."""
  num_tokens, top_k = experts.shape
  fill = np.zeros(E, int)
  kept = np.zeros(experts.shape, bool)
  for k in range(top_k):
    if drop_policy == "position":
      order = range(num_tokens)
    else:
      order = np.argsort(-weights[:, k], kind="stable")
    for n in order:
      e = experts[n, k]
      if fill[e] < capacity:
        kept[n, k] = True
        fill[e] += 1
  return kept


@functools.partial(jax.jit, static_argnames=("capacity_factor", "drop_policy"))
def _capacity_vjp(
  x, weights, experts, glu_weights, cot, capacity_factor, drop_policy
):
  def f(x, weights, glu_weights):
    y, kept = moe.capacity_moe(
      x,
      weights,
      experts,
      glu_weights,
      capacity_factor=capacity_factor,
      drop_policy=drop_policy,
    )
    return jnp.sum(y * cot), (y, kept)

  (_, (y, kept)), grads = jax.value_and_grad(
    f, argnums=(0, 1, 2), has_aux=True
  )(x, weights, glu_weights)
  return y, kept, grads


@pytest.mark.parametrize("drop_policy", moe.DROP_POLICIES)
@hypothesis.given(
  seed=st.integers(0, 2**16),
  capacity_factor=st.sampled_from((0.5, 1.5)),
  skew=st.floats(0, 3),
)
def test_capacity_drops_exactly_expected_slots(
  drop_policy, seed, capacity_factor, skew
):
  num_tokens, top_k = 16, 2
  x, r, w, cot = _problem(seed, num_tokens, top_k, jnp.float32, skew)
  y, kept, grads = _capacity_vjp(
    x, r.weights, r.experts, w, cot, capacity_factor, drop_policy
  )
  capacity = moe.expert_capacity(num_tokens, top_k, E, capacity_factor)
  expected = _expected_kept(
    np.asarray(r.weights), np.asarray(r.experts), capacity, drop_policy
  )
  np.testing.assert_array_equal(kept, expected)
  # Kept slots are computed as dropless ones; dropped slots contribute 0.
  masked = jnp.where(expected, r.weights, 0.0)
  y_ref, ref_grads = _dropless_vjp(x, masked, r.experts, w, cot, "loop")
  np.testing.assert_allclose(y, y_ref, **TOL[jnp.float32])
  # A dropped slot's router weight gets no gradient.
  ref_grads = (
    ref_grads[0],
    jnp.where(expected, ref_grads[1], 0.0),
    ref_grads[2],
  )
  for a, b in zip(
    jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True
  ):
    np.testing.assert_allclose(a, b, **TOL[jnp.float32])


def test_fully_dropped_token_outputs_zero():
  x, _, w, _ = _problem(0, 5, 1, jnp.float32)
  experts = jnp.zeros((5, 1), jnp.int32)  # all on expert 0; capacity 2
  y, kept = jax.jit(functools.partial(moe.capacity_moe, capacity_factor=1.6))(
    x, jnp.ones((5, 1)), experts, w
  )
  np.testing.assert_array_equal(kept[:, 0], [True, True, False, False, False])
  np.testing.assert_array_equal(y[2:], np.zeros((3, D)))
  assert np.all(np.abs(np.asarray(y[:2])) > 0)


@pytest.mark.parametrize("bad_id", [-1, E])
def test_out_of_range_expert_ids(bad_id):
  """Concrete: a ValueError naming `experts_NxK` and [0, E). Under jit: the
  slot gets a zero output and is not kept (never wraps to expert E - 1)."""
  x, r, w, _ = _problem(0, 6, 2, jnp.float32)
  experts = r.experts.at[0, 1].set(bad_id)
  with pytest.raises(ValueError, match=r"`experts_NxK`.*\[0, 4\)"):
    moe.dropless_moe(x, r.weights, experts, w)
  with pytest.raises(ValueError, match=r"`experts_NxK`.*\[0, 4\)"):
    moe.capacity_moe(x, r.weights, experts, w, capacity_factor=2.0)
  with pytest.raises(ValueError, match=r"`experts_NxK`.*\[0, 4\)"):
    moe.capacity_slots(r.weights, experts, num_experts=E, capacity=3)
  only_first = r.weights.at[0, 1].set(0.0)
  expected = jax.jit(moe.dropless_moe)(x, only_first, r.experts, w)
  for impl in ("ragged", "loop"):
    got = jax.jit(functools.partial(moe.dropless_moe, impl=impl))(
      x, r.weights, experts, w
    )
    np.testing.assert_allclose(got, expected, **TOL[jnp.float32])
  capacity = jax.jit(functools.partial(moe.capacity_moe, capacity_factor=4.0))
  y, kept = capacity(x, r.weights, experts, w)
  assert not kept[0, 1] and kept.sum() == kept.size - 1
  np.testing.assert_allclose(y, expected, **TOL[jnp.float32])


def test_expert_capacity():
  assert moe.expert_capacity(16, 2, 4, 1.0) == 8
  assert moe.expert_capacity(10, 2, 4, 1.25) == 7  # ceil(6.25)
  assert moe.expert_capacity(1, 1, 8, 0.1) == 1
  with pytest.raises(ValueError, match="capacity_factor"):
    moe.expert_capacity(16, 2, 4, 0.0)


def test_grouped_glu_equals_per_group_glu_and_pads_with_zeros():
  x, _, w, _ = _problem(1, 9, 1, jnp.float32)
  sizes = jnp.array([3, 0, 4, 1], jnp.int32)  # 8 rows, 1 padding row
  y = jax.jit(moe.grouped_glu)(x, sizes, w)
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  for e in range(E):
    rows = slice(bounds[e], bounds[e + 1])
    w_e = jax.tree.map(lambda a, e=e: a[e], w)
    np.testing.assert_allclose(
      y[rows], jax.jit(moe.glu)(x[rows], w_e), rtol=1e-5, atol=1e-6
    )
  np.testing.assert_array_equal(y[8:], np.zeros((1, D)))


def test_bad_input():
  x, r, w, _ = _problem(0, 6, 2, jnp.float32)
  with pytest.raises(ValueError, match="x_NxD"):
    moe.dropless_moe(x[None], r.weights, r.experts, w)
  with pytest.raises(ValueError, match="experts_NxK"):
    moe.dropless_moe(x, r.weights, r.experts[:, :1], w)
  with pytest.raises(ValueError, match="weights_NxK"):
    moe.dropless_moe(x[:5], r.weights, r.experts, w)
  with pytest.raises(ValueError, match="d_model"):
    moe.dropless_moe(x[:, :4], r.weights, r.experts, w)
  with pytest.raises(ValueError, match="w_down"):
    moe.dropless_moe(x, r.weights, r.experts, w._replace(w_down=w.w_up))
  with pytest.raises(ValueError, match="impl"):
    moe.dropless_moe(x, r.weights, r.experts, w, impl="dense")
  with pytest.raises(ValueError, match="single-device"):
    moe.dropless_moe(
      x, r.weights, r.experts, w, impl="loop", expert_axis="expert"
    )
  with pytest.raises(ValueError, match="activation"):
    moe.dropless_moe(x, r.weights, r.experts, w, activation="tanh")
  with pytest.raises(ValueError, match="drop_policy"):
    moe.capacity_moe(
      x, r.weights, r.experts, w, capacity_factor=1.0, drop_policy="random"
    )
  with pytest.raises(ValueError, match="not bound"):
    moe.capacity_moe(
      x, r.weights, r.experts, w, capacity_factor=1.0, expert_axis="expert"
    )
