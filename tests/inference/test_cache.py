"""Dense and MoA ring KV caches: cached decoding == full causal attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import inference
from lightning_jax import ops

F32_TOL = dict(atol=1e-5, rtol=1e-5)
B, T, H, HKV, D = 2, 24, 4, 2, 8
PROMPT = 14  # prompt slots; sequences have lengths <= PROMPT
LENGTHS = jnp.array([14, 9], jnp.int32)
N_NEW = T - PROMPT


def _qkv(seed):
  rng = np.random.default_rng(seed)
  q, k, v = (
    jnp.asarray(rng.standard_normal((B, T, h, D)), jnp.float32)
    for h in (H, HKV, HKV)
  )
  return q, k, v


def _new_token(x, i):
  """Row b's token at position LENGTHS[b] + i: `[B, heads, dim]`."""
  return jnp.take_along_axis(x, (LENGTHS + i)[:, None, None, None], axis=1)[
    :, 0
  ]


def _decode(cache, step_fn, q, k, v):
  def step(cache, i):
    o, cache = step_fn(cache, *(_new_token(x, i) for x in (q, k, v)))
    return cache, o

  cache, out = jax.lax.scan(step, cache, jnp.arange(N_NEW))
  return jnp.swapaxes(out, 0, 1), cache  # [B, N_NEW, H, D]


def _expected(full_BxTxHxD):
  idx = LENGTHS[:, None] + jnp.arange(N_NEW)[None, :]
  return jnp.take_along_axis(full_BxTxHxD, idx[..., None, None], axis=1)


@jax.jit
def _dense_run(q, k, v):
  cache = inference.kv_cache_from_prompt(
    k[:, :PROMPT], v[:, :PROMPT], LENGTHS, T
  )
  return _decode(cache, inference.kv_cache_step, q, k, v)


def test_dense_cache_matches_causal_attention_with_ragged_prompts():
  q, k, v = _qkv(0)
  got, cache = _dense_run(q, k, v)
  want = _expected(ops.attention(q, k, v, impl="reference"))
  np.testing.assert_allclose(got, want, **F32_TOL)
  np.testing.assert_array_equal(cache.length, LENGTHS + N_NEW)


@pytest.mark.parametrize(
  "windows,sink", [((3, 5, 1, 7), 2), ((4, 4, 9, 2), 0), ((30, 6, 2, 2), 3)]
)
def test_ring_cache_matches_moa_attention(windows, sink):
  q, k, v = _qkv(1)
  layout = inference.RingLayout.build(windows, HKV, sink, T)

  @jax.jit
  def run(q, k, v):
    cache = inference.ring_cache_from_prompt(
      k[:, :PROMPT], v[:, :PROMPT], LENGTHS, layout
    )
    return _decode(cache, inference.ring_cache_step, q, k, v)

  got, _ = run(q, k, v)
  want = _expected(
    ops.moa_attention(q, k, v, np.array(windows), sink=sink, impl="dense")
  )
  np.testing.assert_allclose(got, want, **F32_TOL)


def test_ring_layout_memory_follows_density():
  # GQA: KV head 0 serves windows (3, 5) -> ring 5; KV head 1 (1, 7) -> 7.
  layout = inference.RingLayout.build((3, 5, 1, 7), 2, 2, 1000)
  assert layout.rings == (5, 7) and layout.kv_heads == ((0,), (1,))
  assert layout.slot_count() == (2 + 5) + (2 + 7)
  wide = inference.RingLayout.build((900, 4, 4, 4), 4, 0, 64)
  assert wide.rings == (4, 64) and wide.slot_count() == 64 + 3 * 4
  kv = jnp.zeros((1, 8, 4, 16))
  cache = inference.ring_cache_from_prompt(kv, kv, jnp.array([8]), wide)
  assert inference.cache_bytes(cache.k) == wide.slot_count() * 16 * 4


def test_bad_arguments():
  with pytest.raises(ValueError, match="slots"):
    inference.kv_cache_from_prompt(
      jnp.zeros((1, 8, 1, 4)), jnp.zeros((1, 8, 1, 4)), jnp.array([8]), 4
    )
  with pytest.raises(ValueError, match="num_kv_heads"):
    inference.RingLayout.build((1, 2, 3), 2, 0, 16)
