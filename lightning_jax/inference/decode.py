"""Prefill and token-by-token decoding of `lightning_jax.models` LMs.

Each layer's token mixer carries its own state (`layers.mixers` states the
contract): a linear recurrence its `RecurrentState` (O(1) in the context),
attention its `AttentionState` (a `KVCache` of `max_len` slots, or SnapKV's
capacity plus the new tokens; MoA / sliding windows a sink + ring
`RingKVCache`). MLP / MoE channel mixers act token-wise and need nothing.
Here is only the loop: prefill and a decode step both run
`models.run_blocks`, then sampling.

Batches are right padded: row b holds its `lengths[b]` prompt tokens first,
and a decode step writes each row's token at its own position.

`decode_step` is one jitted function of fixed-shape arrays: every token of a
generation reuses the same compiled executable.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax import layers
from lightning_jax import models
from lightning_jax.inference import sampling
from lightning_jax.layers import mixers


class DecodeState(NamedTuple):
  """Everything a decode step reads and writes (a pytree).

  Attributes:
    positions: int32 `[batch]`, position of each row's next token (= tokens
      seen so far).
    layers: per layer, its mixer's state.
  """

  positions: jax.Array
  layers: tuple


def check_prompt(tokens_BxT, lengths_B, max_len: int):
  """Validates a right-padded prompt batch against `max_len`."""
  _checks.check_rank("tokens_BxT", tokens_BxT, 2, "[batch, seq]")
  _checks.check_shape("lengths_B", lengths_B, tokens_BxT.shape[:1], "[batch]")
  _checks.check_positive_int("max_len", max_len)
  if tokens_BxT.shape[1] > max_len:
    raise ValueError(
      f"`max_len` ({max_len}) must be >= the prompt length "
      f"{tokens_BxT.shape[1]}."
    )


def _check_prompt_values(tokens_BxT, lengths_B, vocab_size: int) -> None:
  """Host-side checks of a concrete prompt that passed `check_prompt`: ids
  in `[0, vocab_size)`, each row's length in `[1, seq]`."""
  tokens, lengths = np.asarray(tokens_BxT), np.asarray(lengths_B)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"`tokens_BxT` must be integer ids, got {tokens.dtype}.")
  bad = (tokens < 0) | (tokens >= vocab_size)
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise ValueError(
      f"`tokens_BxT` ids must be in [0, {vocab_size}), got "
      f"{tokens[row, col]} at [{row}, {col}]."
    )
  if not ((lengths >= 1) & (lengths <= tokens.shape[1])).all():
    raise ValueError(
      f"`lengths_B` must be in [1, {tokens.shape[1]}], got {lengths.tolist()}."
    )


def empty_states(cfg: models.ModelConfig, batch: int, max_len: int) -> tuple:
  """Every layer's fresh mixer state for sequences of <= `max_len` tokens."""
  dtype = models.compute_dtype(cfg)
  return tuple(
    mixers.get(b.kind).empty_state(b.mixer, batch, max_len, dtype)
    for b in models.block_configs(cfg)
  )


def prefill(
  params,
  tokens_BxT,
  lengths_B,
  cfg: models.ModelConfig,
  max_len: int,
  *,
  snapkv: layers.SnapKVConfig | None = None,
):
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
  # A copy: the state is donated to `decode_step`, the caller's array not.
  lengths = jnp.array(lengths_B, jnp.int32)
  params = models.cast_params(params, models.compute_dtype(cfg))
  h, _, states = models.run_blocks(
    params["layers"],
    models.embed(params, tokens_BxT, cfg),
    models.block_configs(cfg),
    empty_states(cfg, tokens_BxT.shape[0], max_len),
    layers.Decoding(lengths, snapkv),
  )
  last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
  logits = models.head(params, last, cfg)[:, 0]
  return logits, DecodeState(lengths, states)


def _decode_step(params, state: DecodeState, tokens_B, cfg):
  _checks.check_shape("tokens_B", tokens_B, state.positions.shape, "[batch]")
  params = models.cast_params(params, models.compute_dtype(cfg))
  h, _, states = models.run_blocks(
    params["layers"],
    models.embed(params, tokens_B[:, None], cfg),
    models.block_configs(cfg),
    state.layers,
    layers.Decoding(jnp.ones_like(state.positions)),
  )
  logits = models.head(params, h, cfg)[:, 0]
  return logits, DecodeState(state.positions + 1, states)


decode_step = jax.jit(
  _decode_step, static_argnames="cfg", donate_argnames="state"
)
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


def generate_stream(
  params,
  tokens_BxT,
  lengths_B,
  cfg: models.ModelConfig,
  *,
  max_new_tokens: int,
  key,
  sampling_cfg: sampling.SamplingConfig | None = None,
  snapkv: layers.SnapKVConfig | None = None,
):
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
  max_new_tokens = _checks.check_positive_int("max_new_tokens", max_new_tokens)
  max_len = tokens_BxT.shape[-1] + max_new_tokens  # rank checked next
  check_prompt(tokens_BxT, lengths_B, max_len)
  _check_prompt_values(tokens_BxT, lengths_B, cfg.vocab_size)
  sampling_cfg = sampling_cfg or sampling.SamplingConfig()
  logits, state = prefill_jit(
    params, tokens_BxT, lengths_B, cfg, max_len, snapkv=snapkv
  )
  for i in range(max_new_tokens):
    tokens = _sample(jax.random.fold_in(key, i), logits, sampling_cfg)
    if i + 1 < max_new_tokens:
      logits, state = decode_step(params, state, tokens, cfg)
    yield jax.device_get(tokens)


def generate(params, tokens_BxT, lengths_B, cfg: models.ModelConfig, **kwargs):
  """`generate_stream` collected: int32 `[batch, max_new_tokens]`."""
  return jnp.stack(
    list(generate_stream(params, tokens_BxT, lengths_B, cfg, **kwargs)), axis=1
  )
