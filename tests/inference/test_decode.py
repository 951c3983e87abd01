"""Prefill + token-by-token decoding == the full forward pass, for every mixer
kind (hybrids, GQA, sliding window, MoA, MoE / MH-MoE, parallel blocks), with
ragged right-padded prompts; one compiled decode step; greedy generation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import inference
from lightning_jax import models
from lightning_jax import ops
from lightning_jax.inference import decode
from tests import mixer_testing as mt

# fp32: prefill uses the chunked / blocked kernels (`recurrent_impl` chunked
# here; "auto", the default, prefills with the recurrent scan on CPU) and
# decoding the recurrent step and the cached softmax; they agree with the
# forward pass to float reassociation.
F32_TOL = dict(atol=2e-4, rtol=2e-4)
SMALL = dict(
  vocab_size=64,
  d_model=32,
  num_heads=2,
  head_dim=16,
  d_ff=64,
  chunk_size=4,
  moe_d_ff=32,
  num_experts=4,
  recurrent_impl="chunked",
)
PROMPT, NEW = 6, 4
MAX_LEN = PROMPT + NEW
LENGTHS = np.array([6, 3], np.int32)


def _config(name, **overrides):
  return models.get_preset(name, **{**SMALL, **overrides})


CONFIGS = {
  "tiny-hybrid": _config("tiny-hybrid"),
  "gated-deltanet-hgrn2": _config(
    "tnl", pattern=("gated_deltanet", "hgrn2"), num_layers=2
  ),
  "tnl-attention-gqa": _config(
    "tnl",
    pattern=("lightning", "attention"),
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
  ),
  "moe-hybrid": _config("moe-hybrid", num_layers=2),
  "window-sink-mhmoe-parallel": _config(
    "transformer",
    num_layers=2,
    window=3,
    sink=1,
    parallel_block=True,
    pattern=("attention", "deltanet"),
    ffn_pattern=("mhmoe",),
  ),
}


@jax.jit(static_argnames="cfg")
def _decode_vs_forward(params, tokens_BxT, lengths_B, cfg):
  """Logits of each row's positions lengths-1 .. lengths+NEW-2 by prefill +
  decoding (teacher forced) and by `models.forward`."""
  logits, state = inference.prefill(
    params, tokens_BxT[:, :PROMPT], lengths_B, cfg, MAX_LEN
  )

  def step(state, i):
    token = jnp.take_along_axis(tokens_BxT, (lengths_B + i)[:, None], axis=1)[
      :, 0
    ]
    return decode._decode_step(params, state, token, cfg)[::-1]

  state, stepped = jax.lax.scan(step, state, jnp.arange(NEW - 1))
  got = jnp.concatenate([logits[:, None], jnp.swapaxes(stepped, 0, 1)], 1)
  full = models.forward(params, tokens_BxT, cfg)[0]
  idx = lengths_B[:, None] - 1 + jnp.arange(NEW)[None, :]
  return got, jnp.take_along_axis(full, idx[..., None], axis=1), state


def _tokens(seed, vocab=64):
  return jnp.asarray(
    np.random.default_rng(seed).integers(0, vocab, (2, MAX_LEN)), jnp.int32
  )


def _check_decoding(cfg, seed=0):
  params = models.init(jax.random.key(seed), cfg)
  got, want, state = _decode_vs_forward(params, _tokens(seed), LENGTHS, cfg)
  np.testing.assert_allclose(got, want, **F32_TOL)
  np.testing.assert_array_equal(state.positions, LENGTHS + NEW - 1)
  return state


def _check_state_shapes(state, cfg):
  """Each layer's state keeps the structure and shapes of its empty state."""
  empty = decode.empty_states(cfg, len(LENGTHS), MAX_LEN)
  assert jax.tree.map(jnp.shape, state.layers) == jax.tree.map(jnp.shape, empty)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoding_matches_forward(name):
  state = _check_decoding(CONFIGS[name])
  _check_state_shapes(state, CONFIGS[name])


@pytest.mark.parametrize("kind", mt.kinds())
def test_every_mixer_decodes_like_forward(kind):
  """Prefill + steps == forward for each registered kind, after a
  recurrent layer (so its input is not just embeddings). With
  `recurrent_impl="auto"` the recurrent mixers' prefill runs the recurrent
  form on CPU, the forward the chunked one (the other tests: both chunked)."""
  cfg = _config(
    "transformer",
    num_layers=2,
    pattern=("deltanet", kind),
    recurrent_impl="auto",
    **mt.overrides(kind, 1, SMALL["num_heads"]),
  )
  _check_state_shapes(_check_decoding(cfg), cfg)


def test_moa_plan_decoding_matches_forward():
  # Layer 0 heads: windows 2 and 10 (dense) at N = MAX_LEN; layer 1: 5, 1.
  plan = ops.MoAPlan(
    alphas=((2.0, 0.0), (0.0, 1.0)), betas=((0.0, 1.0), (0.5, 0.0))
  )
  cfg = _config(
    "transformer", num_layers=2, pattern=("moa",), sink=1, moa_plan=plan
  )
  state = _check_decoding(cfg)
  assert [c.cache.layout.windows for c in state.layers] == [(2, 10), (5, 1)]


def test_decode_step_compiles_once():
  cfg = CONFIGS["tiny-hybrid"]
  params = models.init(jax.random.key(1), cfg)
  tokens = _tokens(1)
  _, state = decode.prefill_jit(
    params, tokens[:, :PROMPT], LENGTHS, cfg, MAX_LEN
  )
  logits, state = inference.decode_step(params, state, tokens[:, 0], cfg)
  compiled = inference.decode_step._cache_size()
  for i in range(1, NEW - 1):
    logits, state = inference.decode_step(params, state, tokens[:, i], cfg)
  assert inference.decode_step._cache_size() == compiled
  assert logits.shape == (2, 64)


def test_greedy_generation_is_the_argmax_chain():
  cfg = CONFIGS["tiny-hybrid"]
  params = models.init(jax.random.key(2), cfg)
  prompt = _tokens(2)[:, :PROMPT]
  new = inference.generate(
    params,
    prompt,
    LENGTHS,
    cfg,
    max_new_tokens=NEW,
    key=jax.random.key(0),
    sampling_cfg=inference.SamplingConfig(temperature=0.0),
  )
  seqs = np.zeros((2, MAX_LEN), np.int32)  # each row: prompt, new, padding
  for b, n in enumerate(LENGTHS):
    seqs[b, : n + NEW] = np.concatenate([prompt[b, :n], new[b]])
  logits = jax.jit(models.forward, static_argnums=2)(params, seqs, cfg)[0]
  for b, n in enumerate(LENGTHS):
    np.testing.assert_array_equal(
      jnp.argmax(logits[b, n - 1 : n - 1 + NEW], axis=-1), new[b]
    )


def test_snapkv_prefill_keeps_gqa_heads_and_bounds_the_cache():
  cfg = CONFIGS["tnl-attention-gqa"]
  params = models.init(jax.random.key(3), cfg)
  tokens = jnp.asarray(
    np.random.default_rng(3).integers(0, 64, (2, 24)), jnp.int32
  )
  lengths = jnp.array([24, 9])
  snap = inference.SnapKVConfig(capacity=12, window=4, kernel=3)
  full_logits, _ = decode.prefill_jit(params, tokens, lengths, cfg, 28)
  logits, state = decode.prefill_jit(
    params, tokens, lengths, cfg, 28, snapkv=snap
  )
  np.testing.assert_allclose(logits, full_logits, **F32_TOL)  # prompt exact
  attention_cache = state.layers[1].cache
  assert attention_cache.k.shape == (2, 2, 12 + 4, 8)  # Hkv, capacity + new
  np.testing.assert_array_equal(attention_cache.length, [12, 9])
  # The next RoPE position is the prompt length, not the kept count.
  np.testing.assert_array_equal(
    attention_cache.length + state.layers[1].offset, lengths
  )
  np.testing.assert_array_equal(state.positions, lengths)
  logits, state = inference.decode_step(params, state, tokens[:, 0], cfg)
  assert np.all(np.isfinite(logits))


def test_bad_prompt():
  cfg = CONFIGS["tnl-attention-gqa"]
  params = models.init(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match="max_len"):
    inference.prefill(
      params, jnp.zeros((1, 8), jnp.int32), jnp.array([8]), cfg, 4
    )
  with pytest.raises(ValueError, match="lengths_B"):
    inference.prefill(
      params, jnp.zeros((1, 8), jnp.int32), jnp.array([8, 8]), cfg, 8
    )
  # generate checks the concrete prompt's values before compiling.
  generate = lambda tokens, lengths: inference.generate(
    params, tokens, lengths, cfg, max_new_tokens=2, key=jax.random.key(0)
  )
  ok = jnp.ones((2, 4), jnp.int32)
  for tokens, lengths, match in [
    (
      ok.at[1, 2].set(cfg.vocab_size),
      [4, 4],
      r"\[0, \d+\), got \d+ at \[1, 2\]",
    ),
    (ok.at[0, 0].set(-1), [4, 4], r"got -1 at \[0, 0\]"),
    (ok, [5, 4], r"lengths_B.*\[1, 4\]"),
    (ok, [0, 4], r"lengths_B.*\[1, 4\]"),
    (ok[0], [4], "tokens_BxT"),
  ]:
    with pytest.raises(ValueError, match=match):
      generate(tokens, jnp.asarray(lengths))


def test_config_fields_used_here_exist():
  # The decoder reads these ModelConfig fields through block_configs.
  names = {f.name for f in dataclasses.fields(models.ModelConfig)}
  assert {"window", "sink", "moa_plan", "dtype"} <= names
