"""Blocked (flash) attention == reference attention: outputs and gradients."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import ops
from lightning_jax.ops import _blocked

# fp32: both impls accumulate in fp32; differences are reassociation only.
F32_TOL = dict(atol=2e-5, rtol=2e-5)
# bf16 inputs: compared with the fp32 reference on the same (rounded) inputs;
# the only extra error is the bf16 rounding of the output (2^-8 relative).
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


@functools.partial(jax.jit, static_argnames=("causal", "block_size", "impl"))
def _value_and_vjp(q, k, v, dout, *, causal, block_size, impl):
  fn = lambda q, k, v: ops.attention(
    q, k, v, causal=causal, block_size=block_size, impl=impl
  )
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(dout)


@functools.partial(jax.jit, static_argnames=("causal", "block_size"))
def _blocked_and_reference(q, k, v, dout, *, causal, block_size):
  """Both impls in one program (one compilation per test example)."""
  return [
    _value_and_vjp(
      q, k, v, dout, causal=causal, block_size=block_size, impl=impl
    )
    for impl in ("blocked", "reference")
  ]


def _inputs(seed, batch, seq_q, seq_k, heads, kv_heads, dim, dtype):
  rng = np.random.default_rng(seed)  # numpy: no compilation per shape
  shapes = [
    (batch, seq_q, heads, dim),
    (batch, seq_k, kv_heads, dim),
    (batch, seq_k, kv_heads, dim + 1),
    (batch, seq_q, heads, dim + 1),
  ]
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


@hypothesis.given(
  seq_q=st.integers(1, 30),
  seq_k=st.integers(1, 30),
  kv_heads=st.sampled_from([1, 2]),
  group=st.sampled_from([1, 3]),
  causal=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_blocked_matches_reference(seq_q, seq_k, kv_heads, group, causal, seed):
  # Block 8 with seq <= 30: up to 4 blocks, partial last blocks.
  args = _inputs(
    seed, 2, seq_q, seq_k, kv_heads * group, kv_heads, 8, jnp.float32
  )
  (got, got_grads), (want, want_grads) = _blocked_and_reference(
    *args, causal=causal, block_size=8
  )
  np.testing.assert_allclose(got, want, **F32_TOL)
  for g, w in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, w, **F32_TOL)


def test_bf16_inputs():
  causal = True
  args = _inputs(0, 1, 30, 30, 4, 2, 16, jnp.bfloat16)
  got, got_grads = _value_and_vjp(
    *args, causal=causal, block_size=16, impl="blocked"
  )
  f32 = [x.astype(jnp.float32) for x in args]
  want, want_grads = _value_and_vjp(
    *f32, causal=causal, block_size=16, impl="reference"
  )
  assert got.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in got_grads)
  np.testing.assert_allclose(got.astype(jnp.float32), want, **BF16_TOL)
  for g, w in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g.astype(jnp.float32), w, **BF16_TOL)


@pytest.mark.parametrize("impl", ops.attention_lib.IMPLS)
def test_fully_masked_rows_are_zero_with_finite_gradients(impl):
  # Causal with more queries than keys: queries 0..4 sit before every key.
  q, k, v, dout = _inputs(1, 2, 12, 7, 2, 1, 8, jnp.float32)
  out, grads = _value_and_vjp(
    q, k, v, dout, causal=True, block_size=4, impl=impl
  )
  np.testing.assert_array_equal(out[:, :5], 0.0)
  assert np.all(np.abs(out[:, 5:]) > 0)
  for g in grads:
    assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(grads[0][:, :5], 0.0)


def test_large_scores_do_not_overflow():
  q, k, v, dout = _inputs(2, 1, 20, 20, 2, 2, 8, jnp.float32)
  (out, _), (want, _) = _blocked_and_reference(
    q * 1e3, k, v, dout, causal=True, block_size=8
  )
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, want, **F32_TOL)


def test_bad_inputs_name_the_argument():
  q = jnp.zeros((1, 8, 3, 4))
  kv = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match="`k`"):
    ops.attention(q, kv, kv)
  with pytest.raises(ValueError, match="`q`"):
    ops.attention(q[0], kv, kv)
  with pytest.raises(ValueError, match="`v`"):
    ops.attention(q, q, q[:, :4])
  with pytest.raises(ValueError, match="`impl`"):
    ops.attention(q, q, q, impl="flash")
  with pytest.raises(ValueError, match="`block_size`"):
    ops.attention(q, q, q, block_size=0)


def test_blocked_tiles_run_one_at_a_time():
  # Eight query chunks of 256 per head; the largest tile holds one head x
  # 256 x 2048 scores (2 MiB). Serialised tiles need a few of them at a time;
  # left independent, XLA:CPU keeps every tile alive.
  seq, heads = 2048, 2
  plan = _blocked._plan(
    _blocked.make_pattern(
      seq,
      seq,
      windows=(seq + 64,) * heads,
      sink=0,
      causal=True,
      offset=0,
      block=64,
    )
  )
  assert all(isinstance(tile, _blocked._Tile) for tile in plan)
  tile_bytes = 4 * max(
    (t.h_hi - t.h_lo) * (t.q_hi - t.q_lo) * t.keys[-1][1] for t in plan
  )
  assert tile_bytes == 256 * 2048 * 4
  x = jax.ShapeDtypeStruct((1, seq, heads, 16), jnp.float32)
  fwd = lambda q, k, v: ops.attention(q, k, v)
  grad = jax.grad(lambda q, k, v: fwd(q, k, v).sum(), (0, 1, 2))
  temp = lambda f: (
    jax.jit(f).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
  )
  assert temp(fwd) < 3 * tile_bytes
  assert temp(grad) < 5 * tile_bytes
