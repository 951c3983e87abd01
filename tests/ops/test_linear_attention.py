"""Property tests: linear_attention and gated_linear_attention.

chunked == recurrent == quadratic (outputs, final states, gradients w.r.t.
every input and the initial state), for random shapes including seq < chunk,
seq not a multiple of the chunk, and several groups of chunks (chunk sizes 2
and 4: groups of GROUP_CHUNKS * chunk tokens); tolerances in
recurrence_testing.
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

IMPLS = ("chunked", "recurrent", "quadratic")


@st.composite
def cases(draw):
  return dict(
    batch=draw(st.sampled_from([1, 2])),
    seq=draw(st.integers(1, 40)),
    heads=draw(st.sampled_from([1, 3])),
    dk=draw(st.sampled_from([4, 8])),
    dv=draw(st.sampled_from([3, 8])),
    chunk=draw(st.sampled_from([2, 4, 5, 8, 16])),
    with_state=draw(st.booleans()),
    seed=draw(st.integers(0, 2**16)),
  )


def make_inputs(case, decay, dtype=jnp.float32):
  """q, k, v, log decay (per `decay` kind) and the initial state."""
  b, t, h, dk, dv = (case[n] for n in ("batch", "seq", "heads", "dk", "dv"))
  ks = jax.random.split(jax.random.key(case["seed"]), 5)
  q = rt.normal(ks[0], (b, t, h, dk), dtype)
  k = rt.normal(ks[1], (b, t, h, dk), dtype)
  v = rt.normal(ks[2], (b, t, h, dv), dtype)
  gate = {
    "none": None,
    "head": ops.tnl_log_decay(0, 3, h),
    "data": jax.nn.log_sigmoid(2 * rt.normal(ks[3], (b, t, h)) + 1),
    "vector": jax.nn.log_sigmoid(2 * rt.normal(ks[3], (b, t, h, dk)) + 1),
    "strong": -20.0 * jax.nn.sigmoid(rt.normal(ks[3], (b, t, h, dk))),
  }[decay]
  s0 = rt.normal(ks[4], (b, h, dk, dv)) if case["with_state"] else None
  return q, k, v, gate, s0


@functools.cache
def op_fn(op, impl, chunk):
  """`(q, k, v, gate, s0) -> (o, state)`, one object per static config so that
  jit caches hit across hypothesis examples of the same shapes."""

  def call(q, k, v, gate, s0):
    return op(
      q,
      k,
      v,
      gate,
      initial_state=s0,
      impl=impl,
      chunk_size=chunk,
      output_final_state=True,
    )

  return jax.jit(call)


def run(op, impl, chunk, q, k, v, gate, s0):
  """Outputs, final state and gradients of a fixed random projection."""
  b, t, h, _ = q.shape
  keys = jax.random.split(jax.random.key(7), 2)
  cot = (
    rt.normal(keys[0], (b, t, h, v.shape[-1])),
    rt.normal(keys[1], (b, h, k.shape[-1], v.shape[-1])),
  )
  return rt.outputs_and_grads(op_fn(op, impl, chunk), (q, k, v, gate, s0), cot)


def assert_impls_agree(op, case, decay):
  inputs = make_inputs(case, decay)
  ref = run(op, "recurrent", case["chunk"], *inputs)
  for impl in ("chunked", "quadratic"):
    got = run(op, impl, case["chunk"], *inputs)
    rt.assert_trees_close(got, ref, rt.FP32_TOL, f"{impl} vs recurrent")


@hypothesis.given(case=cases(), decay=st.sampled_from(["none", "head", "data"]))
@hypothesis.example(
  case=dict(
    batch=1, seq=3, heads=1, dk=4, dv=3, chunk=16, with_state=True, seed=0
  ),
  decay="data",
)
@hypothesis.example(
  case=dict(
    batch=2, seq=32, heads=3, dk=8, dv=8, chunk=16, with_state=False, seed=1
  ),
  decay="head",
)
def test_linear_attention_impls_agree(case, decay):
  assert_impls_agree(ops.linear_attention, case, decay)


@hypothesis.given(case=cases(), decay=st.sampled_from(["vector", "strong"]))
@hypothesis.example(
  case=dict(
    batch=1, seq=37, heads=1, dk=8, dv=3, chunk=16, with_state=True, seed=2
  ),
  decay="strong",
)
@hypothesis.example(
  case=dict(
    batch=1, seq=40, heads=1, dk=8, dv=3, chunk=2, with_state=True, seed=4
  ),
  decay="vector",
)
def test_gated_linear_attention_impls_agree(case, decay):
  assert_impls_agree(ops.gated_linear_attention, case, decay)


@hypothesis.settings(max_examples=3)
@hypothesis.given(
  case=cases(), op_decay=st.sampled_from([("la", "data"), ("gla", "vector")])
)
def test_bf16_inputs_close_to_fp32_reference(case, op_decay):
  op = {"la": ops.linear_attention, "gla": ops.gated_linear_attention}[
    op_decay[0]
  ]
  q, k, v, gate, s0 = make_inputs(case, op_decay[1], jnp.bfloat16)
  got = run(op, "chunked", case["chunk"], q, k, v, gate, s0)
  upcast = lambda x: x.astype(jnp.float32)
  ref = run(
    op, "recurrent", case["chunk"], upcast(q), upcast(k), upcast(v), gate, s0
  )
  rt.assert_bf16_close(got, ref)


@hypothesis.settings(max_examples=4)
@hypothesis.given(
  case=cases(),
  split=st.integers(1, 39),
  impl=st.sampled_from(["chunked", "recurrent"]),
)
def test_split_sequence_carrying_state_equals_one_call(case, split, impl):
  hypothesis.assume(split < case["seq"])
  q, k, v, gate, s0 = make_inputs(case, "vector")
  fn = op_fn(ops.gated_linear_attention, impl, case["chunk"])
  whole, whole_state = fn(q, k, v, gate, s0)
  first, mid = fn(q[:, :split], k[:, :split], v[:, :split], gate[:, :split], s0)
  second, end = fn(
    q[:, split:], k[:, split:], v[:, split:], gate[:, split:], mid
  )
  rt.assert_trees_close(
    (jnp.concatenate([first, second], 1), end),
    (whole, whole_state),
    rt.FP32_TOL,
    "split",
  )


CASE = dict(
  batch=2, seq=21, heads=2, dk=4, dv=3, chunk=8, with_state=True, seed=3
)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_decay_is_plain_linear_attention(impl):
  q, k, v, _, s0 = make_inputs(CASE, "none")
  plain = ops.linear_attention(
    q, k, v, initial_state=s0, chunk_size=8, impl=impl
  )
  for gate in (jnp.zeros((2,)), jnp.zeros((2, 21, 2))):
    zero = ops.linear_attention(
      q, k, v, gate, initial_state=s0, chunk_size=8, impl=impl
    )
    np.testing.assert_allclose(zero, plain, **rt.FP32_TOL)
  gla = ops.gated_linear_attention(
    q, k, v, jnp.zeros_like(q), chunk_size=8, initial_state=s0, impl=impl
  )
  np.testing.assert_allclose(gla, plain, **rt.FP32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_decay_keeps_only_the_current_token(impl):
  q, k, v, _, s0 = make_inputs(CASE, "none")
  only_current = jnp.einsum("bthd,bthd->bth", q, k)[..., None] * v * 4**-0.5
  la = ops.linear_attention(
    q,
    k,
    v,
    jnp.full((2, 21, 2), -1e4),
    initial_state=s0,
    chunk_size=8,
    impl=impl,
  )
  gla = ops.gated_linear_attention(
    q, k, v, jnp.full(q.shape, -1e4), initial_state=s0, chunk_size=8, impl=impl
  )
  np.testing.assert_allclose(la, only_current, **rt.FP32_TOL)
  np.testing.assert_allclose(gla, only_current, **rt.FP32_TOL)


def test_strong_gates_stay_finite_with_finite_gradients():
  """log_forget = -20 on whole chunks overflows a naive exp(-cumsum) form."""
  q, k, v, _, s0 = make_inputs(dict(CASE, seq=64, chunk=64), "none")
  gate = jnp.full(q.shape, -20.0).at[:, 10:20].set(-0.01)
  o, _, grads = run(
    ops.gated_linear_attention, "chunked", 64, q, k, v, gate, s0
  )
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves((o, grads)))
  ref = run(ops.gated_linear_attention, "recurrent", 64, q, k, v, gate, s0)
  rt.assert_trees_close((o, grads), (ref[0], ref[2]), rt.FP32_TOL, "strong")


@pytest.mark.parametrize(
  "op_name, decay", [("la", "head"), ("la", "data"), ("gla", "vector")]
)
def test_minus_inf_decay_resets_the_state_as_in_recurrent(op_name, decay):
  """log decay -inf (decay 0): no NaN, chunked == quadratic == recurrent."""
  op = {"la": ops.linear_attention, "gla": ops.gated_linear_attention}[op_name]
  q, k, v, gate, s0 = make_inputs(CASE, decay)
  if decay == "head":
    gate = gate.at[0].set(-jnp.inf)
  else:  # at a chunk start, mid-chunk and the last token
    gate = gate.at[:, (0, 8, 13, 20), 0].set(-jnp.inf)
  if decay == "vector":  # only some key dims
    gate = gate.at[1, 5, 1, :2].set(-jnp.inf)
  ref = run(op, "recurrent", 8, q, k, v, gate, s0)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(ref))
  for impl in ("chunked", "quadratic"):
    got = run(op, impl, 8, q, k, v, gate, s0)
    rt.assert_trees_close(got, ref, rt.FP32_TOL, f"{impl} vs recurrent")


@pytest.mark.parametrize("impl", ["chunked", "quadratic"])
@pytest.mark.parametrize(
  "op_name, arg", [("la", 1), ("la", 2), ("la", 3), ("gla", 1), ("gla", 3)]
)
def test_nan_input_reaches_no_earlier_position(impl, op_name, arg):
  """NaN in k / v / gate at t: outputs and gradients before t unchanged."""
  op = {"la": ops.linear_attention, "gla": ops.gated_linear_attention}[op_name]
  inputs = make_inputs(CASE, "data" if op_name == "la" else "vector")
  rt.assert_nan_stays_causal(
    op_fn(op, impl, 8), op_fn(op, "recurrent", 8), inputs, arg, 13
  )


def test_hgrn2_is_gla_with_input_gate_one_minus_forget():
  """HGRN2: h_t = f_t * h_{t-1} + (1 - f_t) outer i_t, read out by q_t."""
  q, _, v, gate, _ = make_inputs(CASE, "vector")
  forget = jnp.exp(gate)

  def step(h, x):
    q_t, f_t, i_t = x
    h = f_t[..., None] * h + (1 - f_t)[..., None] * i_t[..., None, :]
    return h, jnp.einsum("bhd,bhdv->bhv", q_t, h)

  _, expected = jax.lax.scan(
    step,
    jnp.zeros((2, 2, 4, 3)),
    (q.swapaxes(0, 1), forget.swapaxes(0, 1), v.swapaxes(0, 1)),
  )
  got = ops.gated_linear_attention(
    q, 1 - forget, v, gate, scale=1.0, chunk_size=8
  )
  np.testing.assert_allclose(got, expected.swapaxes(0, 1), **rt.FP32_TOL)


def test_tnl_log_decay_matches_alibi_slopes_and_depth_rule():
  slopes8 = 2.0 ** -np.arange(1, 9)
  np.testing.assert_allclose(
    ops.tnl_log_decay(0, 4, 8), -slopes8 * (1 + 1e-5), rtol=1e-6
  )
  np.testing.assert_allclose(
    ops.tnl_log_decay(3, 4, 8), -slopes8 * 1e-5, rtol=1e-6
  )
  # Non-power-of-two heads: 4 slopes of H=4 then every other one of H=8.
  slopes6 = np.array([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
  np.testing.assert_allclose(
    ops.tnl_log_decay(1, 3, 6), -slopes6 * (0.5 + 1e-5), rtol=1e-6
  )
  with pytest.raises(ValueError, match="layer_idx"):
    ops.tnl_log_decay(4, 4, 8)


def test_chunked_backward_keeps_no_per_step_states():
  """fwd+bwd peak temp memory: chunked far below T*Dk*Dv, recurrent above.

  At head dim 64 (at 32 the O(T * C) intra-chunk blocks are as large as the
  per-step states, so the comparison says nothing).
  """
  t, d = 1024, 64
  x = jax.ShapeDtypeStruct((1, t, 1, d), jnp.float32)
  gate = jax.ShapeDtypeStruct((1, t, 1), jnp.float32)
  per_step_states = t * d * d * 4

  def temp_bytes(impl):
    loss = lambda q, k, v, g: ops.linear_attention(q, k, v, g, impl=impl).sum()
    compiled = (
      jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
      .lower(x, x, x, gate)
      .compile()
    )
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes("chunked") < per_step_states / 2
  assert temp_bytes("recurrent") >= per_step_states


@pytest.mark.parametrize(
  "op", [ops.linear_attention, ops.gated_linear_attention]
)
def test_bad_input_names_the_argument(op):
  q, k, v, _, _ = make_inputs(CASE, "none")
  gate = None if op is ops.linear_attention else jnp.zeros_like(q)
  with pytest.raises(ValueError, match="`k`"):
    op(q, k[:, :-1], v, gate)
  with pytest.raises(ValueError, match="`v`"):
    op(q, k, v[:, :, :1], gate)
  with pytest.raises(ValueError, match="`q`.*rank 4"):
    op(q[0], k, v, gate)
  for bad in (0, -3, float("inf"), float("nan"), 2.5):
    with pytest.raises(ValueError, match="`chunk_size`"):
      op(q, k, v, gate, chunk_size=bad)
  with pytest.raises(ValueError, match="`impl`"):
    op(q, k, v, gate, impl="fast")
  with pytest.raises(ValueError, match="`initial_state`"):
    op(q, k, v, gate, initial_state=jnp.zeros((2, 2, 3, 3)))


def test_bad_decays_name_the_argument():
  q, k, v, _, _ = make_inputs(CASE, "none")
  with pytest.raises(ValueError, match="`log_decay`.*<= 0"):
    ops.linear_attention(q, k, v, jnp.full((2,), 0.1))
  with pytest.raises(ValueError, match="`log_decay`"):
    ops.linear_attention(q, k, v, jnp.zeros((3,)))
  with pytest.raises(ValueError, match="`log_decay`"):
    ops.linear_attention(q, k, v, jnp.zeros((2, 21)))
  with pytest.raises(ValueError, match="`log_forget`.*<= 0"):
    ops.gated_linear_attention(q, k, v, jnp.full(q.shape, 0.5))
  with pytest.raises(ValueError, match="`log_forget`"):
    ops.gated_linear_attention(q, k, v, jnp.zeros((2, 21, 2)))


@pytest.mark.parametrize("op_name", ["la", "gla", "delta"])
def test_bf16_at_long_length_stays_finite(op_name):
  """bf16 inputs at T = 4096 (64 groups of chunks): finite outputs and
  gradients through the hand-written backward (and the delta rule's)."""
  ks = jax.random.split(jax.random.key(0), 4)
  shape = (1, 4096, 2, 8)
  q, k, v = (rt.normal(key, shape, jnp.bfloat16) for key in ks[:3])
  k = rt.unit_norm(k.astype(jnp.float32)).astype(jnp.bfloat16)
  gate = jax.nn.log_sigmoid(rt.normal(ks[3], shape) + 3)
  op, extra = {
    "la": (ops.linear_attention, (gate[..., 0],)),
    "gla": (ops.gated_linear_attention, (gate,)),
    "delta": (ops.delta_rule, (jax.nn.sigmoid(gate[..., 0]), gate[..., 0])),
  }[op_name]
  loss = lambda *a: jnp.sum(op(*a, chunk_size=16).astype(jnp.float32) ** 2)
  args = (q, k, v, *extra)
  value, grads = jax.jit(
    jax.value_and_grad(loss, argnums=tuple(range(len(args))))
  )(*args)
  assert all(bool(jnp.isfinite(x).all()) for x in (value, *grads))
