"""Matmul FLOPs counted on the jaxpr: loops count per trip, models add up."""

import math

import jax
import jax.numpy as jnp

from lightning_jax import models
from lightning_jax import ops


def _x(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_a_dot_counts_2_batch_m_k_n_and_a_scan_counts_every_trip():
  def batched(a, b):
    return jnp.einsum("bmk,bkn->bmn", a, b)

  assert (
    models.matmul_flops(batched, _x(3, 4, 5), _x(3, 5, 6)) == 2 * 3 * 4 * 5 * 6
  )

  def looped(x):
    return jax.lax.scan(lambda c, _: (c @ x, None), x, None, length=7)[0]

  assert models.matmul_flops(looped, _x(8, 8)) == 7 * 2 * 8**3
  # XLA's own cost analysis counts the loop body once.
  compiled = jax.jit(looped).lower(_x(8, 8)).compile()
  assert compiled.cost_analysis()["flops"] < 2 * 2 * 8**3


def test_sub_programs_count_once_and_a_cond_its_dearest_branch():
  def nested(p, x):
    inner = jax.checkpoint(jax.jit(lambda y: jnp.tanh(y @ x)))
    branch = jax.lax.cond(p, lambda y: y @ x @ x, lambda y: y, x)
    return inner(x) + branch

  assert models.matmul_flops(nested, True, _x(4, 4)) == 3 * 2 * 4**3


def test_transformer_is_6n_plus_attention():
  cfg = models.get_preset("transformer")
  seq = 64
  params = jax.eval_shape(lambda k: models.init(k, cfg), jax.random.key(0))
  matmul_params = sum(
    math.prod(x.shape) for x in jax.tree.leaves(params) if x.ndim >= 2
  )  # the tied embedding is the LM head's matmul
  q = _x(1, seq, cfg.num_heads, cfg.head_dim)
  attention = models.matmul_flops(
    lambda q, k, v: ops.attention(q, k, v, causal=True), q, q, q
  )
  assert models.flops_per_token(cfg, seq) == 3 * (
    2 * matmul_params + cfg.num_layers * attention / seq
  )
