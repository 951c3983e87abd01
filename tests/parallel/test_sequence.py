"""Sequence-parallel recurrences == the single-device ops (outputs, states,
grads).

The sequence-parallel path runs the chunked kernels on each device; the
reference is the single-device recurrent impl (a scan over time).
"""

import functools
import re

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import pytest

from lightning_jax import ops
from lightning_jax import parallel
from tests.ops import recurrence_testing as rt

B, T, H, DK, DV, CHUNK = 2, 32, 2, 4, 6, 4


def _inputs(key, kind, t=T):
  ks = jax.random.split(key, 7)
  q, k = rt.normal(ks[0], (B, t, H, DK)), rt.normal(ks[1], (B, t, H, DK))
  v = rt.normal(ks[2], (B, t, H, DV))
  gate = -jax.nn.softplus(rt.normal(ks[3], (B, t, H)))
  state = rt.normal(ks[4], (B, H, DK, DV))
  if kind == "tnl":  # a constant decay per head, replicated over devices
    return (q, k, v, ops.tnl_log_decay(0, 2, H)), state
  if kind == "gated_linear_attention":
    return (q, k, v, -jax.nn.softplus(rt.normal(ks[5], (B, t, H, DK)))), state
  beta = jax.nn.sigmoid(rt.normal(ks[5], (B, t, H)))
  args = (q, rt.unit_norm(k), v, beta)
  return (args + (gate,) if kind == "gated_delta_rule" else args), state


OPS = {
  "tnl": (parallel.sp_linear_attention, ops.linear_attention),
  "gated_linear_attention": (
    parallel.sp_gated_linear_attention,
    ops.gated_linear_attention,
  ),
  "delta_rule": (parallel.sp_delta_rule, ops.delta_rule),
  "gated_delta_rule": (parallel.sp_delta_rule, ops.delta_rule),
}


def _with_state(fn, **kwargs):
  return lambda *a: fn(
    *a[:-1],
    initial_state=a[-1],
    output_final_state=True,
    chunk_size=CHUNK,
    **kwargs,
  )


@functools.cache
def _sequence_parallel(kind, devices):
  mesh = parallel.make_mesh(f"seq={devices}", jax.devices()[:devices])
  return _with_state(parallel.sequence_parallel(OPS[kind][0], mesh))


@functools.cache
def _single_device(kind):
  """The reference: the op's scan over time on one device."""
  return _with_state(OPS[kind][1], impl="recurrent")


# Devices per op: every op once (two compiles each), every P in {2, 4, 8}.
# Lightning / TNL decays are a constant per head (replicated over devices);
# the data-dependent scalar gate shares their code after `scalar_log_decay`.
DEVICES = {
  "tnl": 8,
  "gated_linear_attention": 2,
  "delta_rule": 4,
  "gated_delta_rule": 8,
}


@hypothesis.settings(max_examples=6)
@hypothesis.given(kind=st.sampled_from(sorted(OPS)), seed=st.integers(0, 99))
def test_sequence_parallel_matches_single_device(kind, seed):
  devices = DEVICES[kind]
  args, state = _inputs(jax.random.key(seed), kind)
  cotangents = (
    rt.normal(jax.random.key(seed + 1), (B, T, H, DV)),
    rt.normal(jax.random.key(seed + 2), (B, H, DK, DV)),
  )
  got = rt.outputs_and_grads(
    _sequence_parallel(kind, devices), (*args, state), cotangents
  )
  want = rt.outputs_and_grads(_single_device(kind), (*args, state), cotangents)
  rt.assert_trees_close(got, want, rt.FP32_TOL, f"{kind} over {devices}")


@pytest.mark.parametrize("kind", ["gated_linear_attention", "gated_delta_rule"])
def test_minus_inf_decay_matches_single_device(kind):
  """Decay 0 (log -inf) on a device's first and last token and mid-chunk."""
  args, state = _inputs(jax.random.key(0), kind)
  gate = args[-1].at[:, (0, 5, 15, 16, 31)].set(-jnp.inf)
  args = (*args[:-1], gate, state)
  cotangents = (
    rt.normal(jax.random.key(1), (B, T, H, DV)),
    rt.normal(jax.random.key(2), (B, H, DK, DV)),
  )
  got = rt.outputs_and_grads(
    _sequence_parallel(kind, DEVICES[kind]), args, cotangents
  )
  want = rt.outputs_and_grads(_single_device(kind), args, cotangents)
  rt.assert_trees_close(got, want, rt.FP32_TOL, kind)


_COLLECTIVE = re.compile(
  r"= (\w+)\[([\d,]*)\]\S* (all-gather|reduce-scatter|"
  r"all-reduce|collective-permute|all-to-all)\("
)


def _collectives(kind, t, mesh):
  """(op, dtype, result shape) of every collective of the compiled fwd + bwd."""
  args, _ = _inputs(jax.random.key(0), kind, t)
  fn = parallel.sequence_parallel(OPS[kind][0], mesh)
  loss = lambda args: jnp.sum(fn(*args, chunk_size=CHUNK))
  hlo = jax.jit(jax.grad(loss)).lower(args).compile().as_text()
  return sorted((m[3], m[1], m[2]) for m in _COLLECTIVE.finditer(hlo))


def test_communication_independent_of_seq_len():
  """One all-gather of the P summaries forward, its reduce-scatter backward.

  The delta rule's summaries `[S_p | M_p]: [B, H, Dk, Dv + Dk]` (linear
  attention's are `[B, H, Dk, Dv + 1]`, gathered the same way).
  """
  mesh = parallel.make_mesh("seq=4", jax.devices()[:4])
  short = _collectives("delta_rule", T, mesh)
  summary = f"{B},{H},{DK},{DV + DK}"
  assert short == [
    ("all-gather", "f32", f"4,{summary}"),
    ("reduce-scatter", "f32", f"1,{summary}"),
  ]
  assert _collectives("delta_rule", 2 * T, mesh) == short


def test_errors_name_the_argument():
  mesh = parallel.make_mesh("seq=8")
  fn = parallel.sequence_parallel(parallel.sp_linear_attention, mesh)
  (q, k, v, g), _ = _inputs(jax.random.key(0), "gated_linear_attention", t=12)
  with pytest.raises(ValueError, match="`q` sequence length 12"):
    fn(q, k, v, g)
  with pytest.raises(ValueError, match="log_decay"):
    fn(q, k, v, log_decay=g[..., 0])
  with pytest.raises(ValueError, match="batch_axes"):
    parallel.sequence_parallel(
      parallel.sp_delta_rule, mesh, batch_axes=("data",)
    )
