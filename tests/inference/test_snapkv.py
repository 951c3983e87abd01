"""SnapKV: pooling and selection by hand, GQA voting, exactness when the
prompt fits, and a needle that survives compression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import inference
from lightning_jax import ops

F32_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "pooling,want",
  [
    # avg divides by the kernel at the edges too (zero padding counted)
    ("avg", [1.0, 5 / 3, 5 / 3, 2.0, 4 / 3]),
    ("max", [3.0, 3.0, 3.0, 4.0, 4.0]),
  ],
)
def test_pool1d_by_hand(pooling, want):
  x = jnp.array([[0.0, 3.0, 2.0, 0.0, 4.0]])
  got = inference.pool1d(x, 3, pooling)
  np.testing.assert_allclose(got[0], want, **F32_TOL)
  assert inference.pool1d(x, 1, pooling).tolist() == x.tolist()


@pytest.mark.parametrize(
  "pooling,keep", [("avg", [0, 1, 4, 5, 8, 9]), ("max", [0, 1, 3, 4, 8, 9])]
)
def test_select_by_hand(pooling, keep):
  # Prefix = slots 0..7 (length 10, window 2); votes of slots 8, 9 ignored.
  # avg k=3: [2, 2, 0, 4/3, 8/3, 8/3, 5/3, 1/3]  -> top 4: 4, 5, 0, 1
  # max k=3: [6, 6, 0, 4, 4, 4, 4, 1]              -> top 4: 0, 1, 3, 4 (ties:
  # lowest slot first)
  scores = jnp.array([[[6.0, 0, 0, 0, 4, 4, 0, 1, 50, 50]]] * 2)
  cfg = inference.SnapKVConfig(capacity=6, window=2, kernel=3, pooling=pooling)
  got = jax.jit(inference.snapkv_select, static_argnums=2)(
    scores, jnp.array([10, 5]), cfg
  )
  np.testing.assert_array_equal(got[0, 0], keep)
  np.testing.assert_array_equal(got[1, 0], np.arange(6))  # 5 <= capacity


def test_observation_scores_sum_over_window_and_gqa_group():
  rng = np.random.default_rng(0)
  b, w, h, hkv, s, d = 2, 3, 4, 2, 9, 8
  q = rng.standard_normal((b, w, h, d)).astype(np.float32)
  k = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
  lengths = np.array([9, 6])
  got = jax.jit(inference.observation_scores)(
    jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths)
  )
  want = np.zeros((b, hkv, s))
  for bi in range(b):
    for i in range(w):
      t = lengths[bi] - w + i  # slot of window query i
      for hi in range(h):
        logits = k[bi, : t + 1, hi // 2] @ q[bi, i, hi] / np.sqrt(d)
        p = np.exp(logits - logits.max())
        want[bi, hi // 2, : t + 1] += p / p.sum()
  np.testing.assert_allclose(got, want, **F32_TOL)


def _attend(k_BxSxHxD, v_BxSxHxD, q_BxHxD):
  """A query over all given keys."""
  return ops.attention(
    q_BxHxD[:, None], k_BxSxHxD, v_BxSxHxD, causal=False, impl="reference"
  )[:, 0]


@jax.jit
def _decode_after_snapkv(q, k, v, lengths):
  """Compress prompts (slots < 12) to capacity 12, then decode 4 tokens."""
  cfg = inference.SnapKVConfig(capacity=12, window=4, kernel=3)
  q_obs = jnp.take_along_axis(
    q,
    jnp.maximum(inference.snapkv.window_slots(lengths, 4), 0)[..., None, None],
    axis=1,
  )
  kc, vc, kept = inference.snapkv_compress(
    q_obs, k[:, :12], v[:, :12], lengths, cfg
  )
  cache = inference.kv_cache_from_prompt(kc, vc, kept, 16)

  def step(cache, i):  # append the token at position lengths + i, attend
    pos = (lengths + i)[:, None, None, None]
    take = lambda x: jnp.take_along_axis(x, pos, axis=1)[:, 0]
    o, cache = inference.kv_cache_step(cache, take(q), take(k), take(v))
    return cache, (o, take(ops.attention(q, k, v, impl="reference")))

  return kept, jax.lax.scan(step, cache, jnp.arange(4))[1]


def test_prompt_within_capacity_gives_full_attention():
  rng = np.random.default_rng(1)
  q, k, v = (
    jnp.asarray(rng.standard_normal((2, 16, n, 8)), jnp.float32)
    for n in (4, 2, 2)
  )
  lengths = jnp.array([12, 7])
  kept, (got, want) = _decode_after_snapkv(q, k, v, lengths)
  np.testing.assert_array_equal(kept, lengths)
  np.testing.assert_allclose(got, want, **F32_TOL)


@jax.jit
def _needle_logits(q_obs, q_new, k, v, readout):
  cfg = inference.SnapKVConfig(capacity=16, window=4, kernel=5)
  s = k.shape[1]
  kc, vc, kept = inference.snapkv_compress(q_obs, k, v, jnp.array([s]), cfg)
  logits = lambda o: o.reshape(1, -1) @ readout
  full = logits(_attend(k, v, q_new))
  snap = logits(_attend(kc, vc, q_new))  # kept == capacity: all valid
  recent = logits(_attend(k[:, -16:], v[:, -16:], q_new))
  return kc, kept, full, snap, recent


def test_needle_survives_compression():
  # One KV head shared by 2 query heads; a needle key at slot 20 that the
  # observation window and the next query both point at.
  rng = np.random.default_rng(2)
  s, h, d, v_dim, vocab, needle = 64, 2, 16, 16, 32, 20
  u = rng.standard_normal(d)
  u /= np.linalg.norm(u)
  k = rng.standard_normal((1, s, 1, d))
  k[0, needle, 0] = 7.0 * u
  q_obs = 7.0 * u + 0.3 * rng.standard_normal((1, 4, h, d))
  q_new = 7.0 * u + 0.3 * rng.standard_normal((1, h, d))
  v = rng.standard_normal((1, s, 1, v_dim))
  readout = rng.standard_normal((h * v_dim, vocab)) / np.sqrt(h * v_dim)
  kc, kept, full, snap, recent = _needle_logits(
    *(jnp.asarray(x, jnp.float32) for x in (q_obs, q_new, k, v, readout))
  )
  assert int(kept[0]) == 16
  assert any(np.allclose(kc[0, j], k[0, needle], atol=1e-6) for j in range(16))
  # The dropped keys held ~0.1% of the attention mass: logits (scale ~2)
  # move by < 5e-3, while a cache of the 16 most recent keys is far off.
  np.testing.assert_allclose(snap, full, atol=5e-3)
  assert np.abs(recent - full).max() > 50 * np.abs(snap - full).max()


def test_bad_config_and_shapes():
  with pytest.raises(ValueError, match="capacity"):
    inference.SnapKVConfig(capacity=4, window=4)
  with pytest.raises(ValueError, match="kernel"):
    inference.SnapKVConfig(capacity=8, window=2, kernel=4)
  with pytest.raises(ValueError, match="pooling"):
    inference.SnapKVConfig(capacity=8, window=2, pooling="sum")
  cfg = inference.SnapKVConfig(capacity=8, window=2)
  kv = jnp.zeros((1, 16, 1, 4))
  with pytest.raises(ValueError, match="q_obs_BxWxHxD"):
    inference.snapkv_compress(
      jnp.zeros((1, 3, 2, 4)), kv, kv, jnp.array([16]), cfg
    )
