"""Property tests: delta_rule (DeltaNet / Gated DeltaNet) and its UT inverse.

chunked == recurrent (outputs, final states, gradients w.r.t. q, k, v, beta,
log_decay and the initial state); tolerances in recurrence_testing. Keys are
L2-normalised as DeltaNet layers do (the recurrence is contractive then).
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import ops
from tests.ops import recurrence_testing as rt


@st.composite
def cases(draw):
  return dict(
    batch=draw(st.sampled_from([1, 2])),
    seq=draw(st.integers(1, 40)),
    heads=draw(st.sampled_from([1, 3])),
    dk=draw(st.sampled_from([4, 8])),
    dv=draw(st.sampled_from([3, 8])),
    chunk=draw(st.sampled_from([2, 4, 5, 8, 16, 32])),
    with_state=draw(st.booleans()),
    gated=draw(st.booleans()),
    seed=draw(st.integers(0, 2**16)),
  )


def make_inputs(case, dtype=jnp.float32):
  b, t, h, dk, dv = (case[n] for n in ("batch", "seq", "heads", "dk", "dv"))
  ks = jax.random.split(jax.random.key(case["seed"]), 6)
  q = rt.normal(ks[0], (b, t, h, dk), dtype)
  k = rt.unit_norm(rt.normal(ks[1], (b, t, h, dk))).astype(dtype)
  v = rt.normal(ks[2], (b, t, h, dv), dtype)
  beta = jax.nn.sigmoid(rt.normal(ks[3], (b, t, h)))
  gate = (
    jax.nn.log_sigmoid(2 * rt.normal(ks[4], (b, t, h)) + 2)
    if case["gated"]
    else None
  )
  s0 = rt.normal(ks[5], (b, h, dk, dv)) if case["with_state"] else None
  return q, k, v, beta, gate, s0


@functools.cache
def op_fn(impl, chunk):
  """`(q, k, v, beta, gate, s0) -> (o, state)`, one object per config."""

  def call(q, k, v, beta, gate, s0):
    return ops.delta_rule(
      q,
      k,
      v,
      beta,
      gate,
      initial_state=s0,
      impl=impl,
      chunk_size=chunk,
      output_final_state=True,
    )

  return jax.jit(call)


def run(impl, chunk, *inputs):
  q, _, v, _, _, _ = inputs
  b, t, h, dk = q.shape
  keys = jax.random.split(jax.random.key(7), 2)
  cot = (
    rt.normal(keys[0], (b, t, h, v.shape[-1])),
    rt.normal(keys[1], (b, h, dk, v.shape[-1])),
  )
  return rt.outputs_and_grads(op_fn(impl, chunk), inputs, cot)


@hypothesis.given(case=cases())
@hypothesis.example(
  case=dict(
    batch=1,
    seq=3,
    heads=1,
    dk=4,
    dv=3,
    chunk=32,
    with_state=True,
    gated=True,
    seed=0,
  )
)
@hypothesis.example(
  case=dict(
    batch=2,
    seq=40,
    heads=3,
    dk=8,
    dv=8,
    chunk=16,
    with_state=False,
    gated=False,
    seed=1,
  )
)
@hypothesis.example(
  case=dict(
    batch=1,
    seq=39,
    heads=1,
    dk=4,
    dv=3,
    chunk=2,
    with_state=True,
    gated=True,
    seed=5,
  )
)
def test_chunked_equals_recurrent(case):
  inputs = make_inputs(case)
  rt.assert_trees_close(
    run("chunked", case["chunk"], *inputs),
    run("recurrent", case["chunk"], *inputs),
    rt.FP32_TOL,
    "chunked vs recurrent",
  )


@hypothesis.settings(max_examples=3)
@hypothesis.given(case=cases())
def test_bf16_inputs_close_to_fp32_reference(case):
  q, k, v, beta, gate, s0 = make_inputs(case, jnp.bfloat16)
  got = run("chunked", case["chunk"], q, k, v, beta, gate, s0)
  up = lambda x: x.astype(jnp.float32)
  ref = run("recurrent", case["chunk"], up(q), up(k), up(v), beta, gate, s0)
  rt.assert_bf16_close(got, ref)


@hypothesis.settings(max_examples=4)
@hypothesis.given(case=cases(), split=st.integers(1, 39))
def test_split_sequence_carrying_state_equals_one_call(case, split):
  hypothesis.assume(split < case["seq"])
  q, k, v, beta, gate, s0 = make_inputs(case)
  fn = op_fn("chunked", case["chunk"])
  part = lambda x, sl: None if x is None else x[:, sl]
  first_half, second_half = slice(None, split), slice(split, None)
  whole, whole_state = fn(q, k, v, beta, gate, s0)
  first, mid = fn(*(part(x, first_half) for x in (q, k, v, beta, gate)), s0)
  second, end = fn(*(part(x, second_half) for x in (q, k, v, beta, gate)), mid)
  rt.assert_trees_close(
    (jnp.concatenate([first, second], 1), end),
    (whole, whole_state),
    rt.FP32_TOL,
    "split",
  )


CASE = dict(
  batch=2,
  seq=21,
  heads=2,
  dk=8,
  dv=3,
  chunk=8,
  with_state=True,
  gated=True,
  seed=3,
)


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_beta_zero_leaves_the_state_unchanged(impl):
  q, k, v, beta, _, s0 = make_inputs(CASE)
  o, state = ops.delta_rule(
    q,
    k,
    v,
    jnp.zeros_like(beta),
    initial_state=s0,
    output_final_state=True,
    chunk_size=8,
    impl=impl,
  )
  np.testing.assert_allclose(state, s0, **rt.FP32_TOL)
  np.testing.assert_allclose(
    o, jnp.einsum("bthd,bhdv->bthv", q, s0) * 8**-0.5, **rt.FP32_TOL
  )


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_beta_one_with_orthonormal_keys_stores_values_exactly(impl):
  dk, t = 8, 6
  basis = jnp.linalg.qr(rt.normal(jax.random.key(0), (dk, dk)))[0]
  k = basis[:t][None, :, None, :]  # t orthonormal keys
  v = rt.normal(jax.random.key(1), (1, t, 1, 5))
  _, state = ops.delta_rule(
    k,
    k,
    v,
    jnp.ones((1, t, 1)),
    chunk_size=4,
    output_final_state=True,
    impl=impl,
  )
  retrieved = jnp.einsum("btd,dv->btv", k[:, :, 0], state[0, 0])
  np.testing.assert_allclose(retrieved, v[:, :, 0], **rt.FP32_TOL)


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_huge_decay_keeps_only_the_current_token(impl):
  q, k, v, beta, _, s0 = make_inputs(CASE)
  o = ops.delta_rule(
    q,
    k,
    v,
    beta,
    jnp.full(beta.shape, -1e4),
    initial_state=s0,
    chunk_size=8,
    impl=impl,
  )
  expected = (jnp.einsum("bthd,bthd->bth", q, k) * beta)[..., None] * v
  np.testing.assert_allclose(o, expected * 8**-0.5, **rt.FP32_TOL)


def test_minus_inf_decay_resets_the_state_as_in_recurrent():
  """Gate -inf (decay 0) at a chunk start, mid-chunk, the last token."""
  q, k, v, beta, gate, s0 = make_inputs(CASE)
  gate = gate.at[:, (0, 8, 13, 20), 0].set(-jnp.inf).at[1, 5, 1].set(-jnp.inf)
  ref = run("recurrent", 8, q, k, v, beta, gate, s0)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(ref))
  got = run("chunked", 8, q, k, v, beta, gate, s0)
  rt.assert_trees_close(got, ref, rt.FP32_TOL, "chunked vs recurrent")


@pytest.mark.parametrize("arg", [1, 2, 3, 4])
def test_nan_input_reaches_no_earlier_position(arg):
  """NaN in k / v / beta / gate at t: outputs and gradients before t hold."""
  rt.assert_nan_stays_causal(
    op_fn("chunked", 8), op_fn("recurrent", 8), make_inputs(CASE), arg, 13
  )


def test_constant_per_head_decay_equals_broadcast_gate():
  q, k, v, beta, _, s0 = make_inputs(CASE)
  per_head = ops.tnl_log_decay(1, 3, 2)
  a = ops.delta_rule(q, k, v, beta, per_head, initial_state=s0, chunk_size=8)
  b = ops.delta_rule(
    q,
    k,
    v,
    beta,
    jnp.broadcast_to(per_head, beta.shape),
    initial_state=s0,
    chunk_size=8,
    impl="recurrent",
  )
  np.testing.assert_allclose(a, b, **rt.FP32_TOL)


@hypothesis.given(n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_unit_lower_inverse_inverts(n, seed):
  strict = jnp.tril(0.5 * rt.normal(jax.random.key(seed), (2, n, n)), -1)
  lower = strict + jnp.eye(n)[None]
  inv = ops.unit_lower_inverse(lower)
  # fp32 rounding of `inv @ lower` grows with n and the entries' size (the
  # inverse of a random unit-lower matrix can have large entries): bound it
  # by n * eps * max|inv| * max|lower|, with a 1e-4 floor.
  bound = n * 1.2e-7 * float(jnp.max(jnp.abs(inv)) * jnp.max(jnp.abs(lower)))
  np.testing.assert_allclose(
    inv @ lower,
    jnp.broadcast_to(jnp.eye(n), (2, n, n)),
    rtol=0,
    atol=max(1e-4, 8 * bound),
  )
  np.testing.assert_array_equal(jnp.triu(inv, 1), 0.0)


def test_bad_input_names_the_argument():
  q, k, v, beta, gate, _ = make_inputs(CASE)
  with pytest.raises(ValueError, match="`beta`"):
    ops.delta_rule(q, k, v, beta[..., :1])
  with pytest.raises(ValueError, match="`k`"):
    ops.delta_rule(q, k[..., :4], v, beta)
  with pytest.raises(ValueError, match="`v`.*rank 4"):
    ops.delta_rule(q, k, v[0], beta)
  with pytest.raises(ValueError, match="`log_decay`.*<= 0"):
    ops.delta_rule(q, k, v, beta, -gate)
  with pytest.raises(ValueError, match="`log_decay`"):
    ops.delta_rule(q, k, v, beta, gate[:, :3])
  for bad in (0, float("inf"), float("nan")):
    with pytest.raises(ValueError, match="`chunk_size`"):
      ops.delta_rule(q, k, v, beta, chunk_size=bad)
  with pytest.raises(ValueError, match="`impl`"):
    ops.delta_rule(q, k, v, beta, impl="quadratic")
  with pytest.raises(ValueError, match="`initial_state`"):
    ops.delta_rule(q, k, v, beta, initial_state=jnp.zeros((2, 2, 3, 8)))
