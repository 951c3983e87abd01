"""Prefill and token-by-token decoding of `lightning_jax.models` LMs.

Per layer kind, the decoder carries:

* linear recurrences (lightning / deltanet / gated_deltanet / hgrn2): the
  layer's `RecurrentState` (fp32 `[batch, heads, key_dim, value_dim]` plus the
  short-conv tail): O(1) memory in the context length. Prefill runs the
  chunked kernel with `output_final_state`; a decode step runs the layer on
  one token with `impl="recurrent"`.
* dense softmax attention: a preallocated `KVCache` of `max_len` slots (or
  SnapKV's `capacity` plus the new tokens), keys stored with RoPE applied.
* MoA / sliding-window attention: a `RingKVCache` (sink + per-head ring of the
  head's window), windows evaluated at `max_len` (the MoA elastic rule's N).
* MLP / MoE channel mixers act token-wise and need nothing.

Batches are right padded: row b holds its `lengths[b]` prompt tokens first.
Attention prefill is then exact with the causal blocked kernels (padding comes
after every real token), and a decode step writes each row's token at its own
slot / position. For recurrent layers, prefill shifts each row's normed input
so that its real tokens end at the last slot (left alignment) and zeroes the
padding in front: every mixer maps a zero input to a zero increment (no biases,
v = 0), so the state and conv tail after the shifted sequence are exactly
those after the row's `lengths[b]` tokens; the outputs are shifted back.

`decode_step` is one jitted function of fixed-shape arrays: every token of a
generation reuses the same compiled executable.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lightning_jax import _checks
from lightning_jax import layers
from lightning_jax import models
from lightning_jax import ops
from lightning_jax.inference import cache as cache_lib
from lightning_jax.inference import sampling
from lightning_jax.inference import snapkv as snapkv_lib


class DecodeState(NamedTuple):
  """Everything a decode step reads and writes (a pytree).

  Attributes:
    positions: int32 `[batch]`, position of each row's next token (= tokens
      seen so far).
    layers: per layer, a `KVCache`, `RingKVCache` or `layers.RecurrentState`.
  """
  positions: jax.Array
  layers: tuple


def _rope_at(x_BxTxHxD, positions_BxT, theta: float):
  """RoPE with per-row positions."""
  return jax.vmap(lambda x, p: layers.apply_rope(x[None], p, theta)[0])(
      x_BxTxHxD, positions_BxT)


def _project(params, x_BxTxD, positions_BxT, cfg: layers.AttentionConfig):
  """q `[B, T, H, Dh]`, k, v `[B, T, Hkv, Dh]`, RoPE at `positions`."""
  q, k, v = (jnp.einsum("btd,dhk->bthk", x_BxTxD, params[w])
             for w in ("wq", "wk", "wv"))
  return (_rope_at(q, positions_BxT, cfg.rope_theta),
          _rope_at(k, positions_BxT, cfg.rope_theta), v)


def _out(params, o_BxTxHxD, dtype):
  return jnp.einsum("bthk,hkd->btd", o_BxTxHxD.astype(dtype), params["wo"])


def _prefill_attention(params, x_BxTxD, lengths_B, cfg: layers.AttentionConfig,
                       max_len: int, snapkv: snapkv_lib.SnapKVConfig | None):
  """Attention over the prompt with the blocked kernels; returns its cache."""
  batch, seq, _ = x_BxTxD.shape
  positions = jnp.broadcast_to(jnp.arange(seq)[None], (batch, seq))
  q, k, v = _project(params, x_BxTxD, positions, cfg)
  windows = cfg.windows(max_len)
  if windows is None:
    o = ops.attention(q, k, v, block_size=cfg.block_size, impl=cfg.impl)
    if snapkv is None or seq <= snapkv.capacity:
      cache = cache_lib.kv_cache_from_prompt(k, v, lengths_B, max_len)
    else:
      slots = jnp.maximum(snapkv_lib.window_slots(lengths_B, snapkv.window), 0)
      q_obs = jnp.take_along_axis(q, slots[..., None, None], axis=1)
      kc, vc, kept = snapkv_lib.compress(q_obs, k, v, lengths_B, snapkv)
      cache = cache_lib.kv_cache_from_prompt(
          kc, vc, kept, snapkv.capacity + max_len - seq)
  else:
    o = ops.moa_attention(
        q, k, v, windows, sink=cfg.sink, block_size=cfg.block_size,
        impl="blocked" if cfg.impl == "blocked" else "dense")
    layout = cache_lib.RingLayout.build(windows, cfg.num_kv_heads, cfg.sink,
                                        max_len)
    cache = cache_lib.ring_cache_from_prompt(k, v, lengths_B, layout)
  return _out(params, o, x_BxTxD.dtype), cache


def _shift(x_BxTxD, shift_B):
  """`y[b, i] = x[b, i - shift[b]]`, zero where `i - shift[b]` is outside."""
  seq = x_BxTxD.shape[1]
  src = jnp.arange(seq)[None, :] - shift_B[:, None]
  valid = (src >= 0) & (src < seq)
  y = jnp.take_along_axis(x_BxTxD, jnp.clip(src, 0, seq - 1)[..., None],
                          axis=1)
  return jnp.where(valid[..., None], y, 0)


def _prefill_recurrent(params, x_BxTxD, lengths_B,
                       cfg: layers.RecurrentConfig):
  """The chunked layer on left-aligned, zero-padded rows; its final state."""
  pad = x_BxTxD.shape[1] - lengths_B
  y, state = layers.recurrent_layer(params, _shift(x_BxTxD, pad), cfg)
  return _shift(y, -pad), state


def check_prompt(tokens_BxT, lengths_B, max_len: int):
  """Validates a right-padded prompt batch against `max_len`."""
  _checks.check_rank("tokens_BxT", tokens_BxT, 2, "[batch, seq]")
  _checks.check_shape("lengths_B", lengths_B, tokens_BxT.shape[:1], "[batch]")
  _checks.check_positive_int("max_len", max_len)
  if tokens_BxT.shape[1] > max_len:
    raise ValueError(f"`max_len` ({max_len}) must be >= the prompt length "
                     f"{tokens_BxT.shape[1]}.")


def prefill(params, tokens_BxT, lengths_B, cfg: models.ModelConfig,
            max_len: int, *, snapkv: snapkv_lib.SnapKVConfig | None = None):
  """Runs the prompt and builds the decoding state.

  Args:
    params: model params (float32; cast to `cfg.dtype` here).
    tokens_BxT: int prompt tokens, right padded.
    lengths_B: int prompt lengths in `[1, T]`.
    cfg: the model config.
    max_len: longest total length (prompt + generated) to decode to; sizes
      the dense caches and fixes the MoA windows.
    snapkv: compress every dense attention layer's prompt cache with SnapKV
      (ignored when the prompt has <= capacity slots).

  Returns:
    `(logits [batch, vocab] float32 of each row's last prompt token,
    DecodeState)`.

  Example:
    >>> cfg = models.get_preset("tiny-hybrid")
    >>> params = models.init(jax.random.key(0), cfg)
    >>> logits, state = prefill(params, jnp.zeros((2, 8), jnp.int32),
    ...                         jnp.array([8, 5]), cfg, 32)
  """
  check_prompt(tokens_BxT, lengths_B, max_len)
  lengths = jnp.asarray(lengths_B, jnp.int32)
  params = models.cast_params(params, models.compute_dtype(cfg))
  h = models.embed(params, tokens_BxT, cfg)
  caches = []
  for layer_params, block in zip(params["layers"], models.block_configs(cfg),
                                 strict=True):
    if isinstance(block.mixer, layers.AttentionConfig):
      mixer_fn = functools.partial(
          _prefill_attention, layer_params["mixer"], lengths_B=lengths,
          cfg=block.mixer, max_len=max_len, snapkv=snapkv)
    else:
      mixer_fn = functools.partial(
          _prefill_recurrent, layer_params["mixer"], lengths_B=lengths,
          cfg=block.mixer)
    h, _, layer_cache = models.block_with_mixer(layer_params, h, block,
                                                mixer_fn)
    caches.append(layer_cache)
  last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
  logits = models.head(params, last, cfg)[:, 0]
  return logits, DecodeState(lengths, tuple(caches))


def _step_attention(params, x_Bx1xD, positions_B, layer_cache,
                    cfg: layers.AttentionConfig):
  q, k, v = _project(params, x_Bx1xD, positions_B[:, None], cfg)
  step = (cache_lib.kv_cache_step if isinstance(layer_cache, cache_lib.KVCache)
          else cache_lib.ring_cache_step)
  o, layer_cache = step(layer_cache, q[:, 0], k[:, 0], v[:, 0])
  return _out(params, o[:, None], x_Bx1xD.dtype), layer_cache


def _step_recurrent(params, x_Bx1xD, state, cfg: layers.RecurrentConfig):
  return layers.recurrent_layer(params, x_Bx1xD,
                                dataclasses.replace(cfg, impl="recurrent"),
                                state)


def _decode_step(params, state: DecodeState, tokens_B, cfg):
  _checks.check_shape("tokens_B", tokens_B, state.positions.shape, "[batch]")
  params = models.cast_params(params, models.compute_dtype(cfg))
  h = models.embed(params, tokens_B[:, None], cfg)
  caches = []
  for layer_params, block, layer_cache in zip(
      params["layers"], models.block_configs(cfg), state.layers, strict=True):
    if isinstance(block.mixer, layers.AttentionConfig):
      mixer_fn = functools.partial(
          _step_attention, layer_params["mixer"], positions_B=state.positions,
          layer_cache=layer_cache, cfg=block.mixer)
    else:
      mixer_fn = functools.partial(_step_recurrent, layer_params["mixer"],
                                   state=layer_cache, cfg=block.mixer)
    h, _, layer_cache = models.block_with_mixer(layer_params, h, block,
                                                mixer_fn)
    caches.append(layer_cache)
  logits = models.head(params, h, cfg)[:, 0]
  return logits, DecodeState(state.positions + 1, tuple(caches))


decode_step = jax.jit(_decode_step, static_argnames="cfg",
                      donate_argnames="state")
decode_step.__doc__ = """Feeds one token per row and advances the state.

  Args:
    params: model params (float32).
    state: the `DecodeState` (donated: its buffers are updated in place).
    tokens_B: int32 `[batch]`, each row's token at `state.positions`.
    cfg: the model config (static).

  Returns:
    `(logits [batch, vocab] float32 for the next token, new DecodeState)`.
    One compiled executable serves every step: all shapes are fixed.
  """


prefill_jit = jax.jit(prefill, static_argnames=("cfg", "max_len", "snapkv"))


_sample = jax.jit(sampling.sample, static_argnums=2)


def generate_stream(params, tokens_BxT, lengths_B, cfg: models.ModelConfig, *,
                    max_new_tokens: int, key,
                    sampling_cfg: sampling.SamplingConfig | None = None,
                    snapkv: snapkv_lib.SnapKVConfig | None = None):
  """Yields each row's next token, `[batch]` numpy int32, as it is sampled.

  Args:
    params: model params.
    tokens_BxT: right-padded prompts.
    lengths_B: int `[batch]`, their lengths.
    cfg: the model config.
    max_new_tokens: tokens to generate per row.
    key: PRNG key; new token i is drawn with `fold_in(key, i)`.
    sampling_cfg: the sampling rule (default: temperature 1, no truncation).
    snapkv: optional SnapKV compression of the prompt caches.

  Example:
    >>> for tokens in generate_stream(params, prompt, lengths, cfg,
    ...                               max_new_tokens=16, key=key):
    ...   print(tokens)
  """
  max_new_tokens = _checks.check_positive_int("max_new_tokens",
                                              max_new_tokens)
  sampling_cfg = sampling_cfg or sampling.SamplingConfig()
  logits, state = prefill_jit(params, tokens_BxT, lengths_B, cfg,
                              tokens_BxT.shape[1] + max_new_tokens,
                              snapkv=snapkv)
  for i in range(max_new_tokens):
    tokens = _sample(jax.random.fold_in(key, i), logits, sampling_cfg)
    if i + 1 < max_new_tokens:
      logits, state = decode_step(params, state, tokens, cfg)
    yield jax.device_get(tokens)


def generate(params, tokens_BxT, lengths_B, cfg: models.ModelConfig,
             **kwargs):
  """`generate_stream` collected: int32 `[batch, max_new_tokens]`."""
  return jnp.stack(list(generate_stream(params, tokens_BxT, lengths_B, cfg,
                                        **kwargs)), axis=1)
