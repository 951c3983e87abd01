"""Shared helpers for the linear-recurrence property tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# fp32: chunked, recurrent and quadratic impls agree to float reassociation.
FP32_TOL = dict(rtol=2e-4, atol=2e-4)
# bf16 inputs vs the fp32 reference on the same (bf16-rounded) values: the
# output is rounded to bf16 (8 bits of mantissa), so ~1e-2 relative.
BF16_TOL = dict(rtol=3e-2, atol=3e-2)


def normal(key, shape, dtype=jnp.float32):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def unit_norm(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnums=(0,))
def outputs_and_grads(fn, args, cotangents):
  """`fn(*args) -> (o, state)`; returns them and d<o.co_o + s.co_s>/d(args)."""

  def loss(args):
    o, state = fn(*args)
    return (
      jnp.sum(o.astype(jnp.float32) * cotangents[0])
      + jnp.sum(state * cotangents[1])
    ), (o, state)

  grads, (o, state) = jax.grad(loss, has_aux=True)(args)
  return o, state, grads


def assert_trees_close(actual, expected, tol, what):
  leaves_a, tree_a = jax.tree.flatten(actual)
  leaves_e, tree_e = jax.tree.flatten(expected)
  assert tree_a == tree_e, what
  for i, (a, e) in enumerate(zip(leaves_a, leaves_e, strict=True)):
    np.testing.assert_allclose(
      np.asarray(a, np.float32),
      np.asarray(e, np.float32),
      err_msg=f"{what} (leaf {i})",
      **tol,
    )


def assert_bf16_close(got, ref):
  """bf16-input results `(o, state, grads)` vs the fp32 reference's.

  Outputs and states within BF16_TOL of the reference's scale; gradients
  within 5% of theirs (they accumulate more bf16 roundings).
  """
  o, state, grads = got
  assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32
  scale = max(float(jnp.abs(ref[0]).max()), 1.0)
  tol = dict(rtol=BF16_TOL["rtol"], atol=BF16_TOL["atol"] * scale)
  assert_trees_close((o, state), ref[:2], tol, "bf16 outputs")
  gscale = max(float(jnp.abs(ref[2][0]).max()), 1.0)
  assert_trees_close(
    grads, ref[2], dict(rtol=0.05, atol=0.05 * gscale), "bf16 grads"
  )


def with_nan(x, t):
  """`x` with a NaN at position t (axis 1) of batch 0, head 0, dim 0."""
  return x.at[(0, t) + (0,) * (x.ndim - 2)].set(jnp.nan)


def assert_nan_stays_causal(fn, reference, args, arg, t):
  """A NaN in `args[arg]` at position t changes nothing before t.

  `fn(*args) -> (o, state)`. With the NaN, fn's outputs before t, and the
  gradients of a random projection of them w.r.t. the inputs before t (and
  the initial state, last), equal `reference`'s on the clean inputs; fn's
  outputs are NaN where `reference`'s are with the NaN, and so is its final
  state (there, fn's may be NaN in more rows of a NaN column).
  """
  bad = list(args)
  bad[arg] = with_nan(args[arg], t)
  o, state = fn(*args)
  cot = (
    normal(jax.random.key(7), o.shape).at[:, t:].set(0.0),
    jnp.zeros(state.shape),
  )
  got = outputs_and_grads(fn, tuple(bad), cot)
  nan_ref = outputs_and_grads(reference, tuple(bad), cot)
  np.testing.assert_array_equal(np.isnan(got[0]), np.isnan(nan_ref[0]))
  assert np.isnan(got[1])[np.isnan(nan_ref[1])].all(), "state"
  clean = outputs_and_grads(reference, args, cot)
  before = lambda r: (r[0][:, :t], [g[:, :t] for g in r[2][:-1]], r[2][-1])
  assert_trees_close(before(got), before(clean), FP32_TOL, "before the NaN")
