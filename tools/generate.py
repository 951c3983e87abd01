r"""Samples text from a trained checkpoint, streaming it as it is generated.

Restores the params of the latest complete checkpoint in
`<workdir>/checkpoints` (`training.checkpoint`) and the model config saved
in its metadata ("model_config"), prefills the prompt, and decodes token by
token with the fixed-shape caches of `lightning_jax.inference` (recurrent
states for linear layers, KV caches for attention, optionally compressed by
SnapKV). Reports prefill and decode tokens/s (compile time excluded and
reported on its own).

Usage:
  python -m tools.generate --workdir=/tmp/lightning_jax_run \
      --prompt="The " --max_new_tokens=200 --temperature=0.8 --top_p=0.95
"""

import codecs
import functools
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import inference
from lightning_jax import models
from lightning_jax import training
from lightning_jax.inference import decode
from tools import cli

CHECKPOINT_DIR = training.CHECKPOINT_DIR
load_model = training.load_model
model_config_from_metadata = training.model_config_from_metadata
BYTE_VOCAB = 256

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory of tools/train.py (holds checkpoints/)."
)
_PROMPT = flags.DEFINE_string(
  "prompt", "The ", "Text to continue (UTF-8 bytes for the byte vocabulary)."
)
_MAX_NEW_TOKENS = flags.DEFINE_integer(
  "max_new_tokens", 200, "Tokens to generate."
)
_TEMPERATURE = flags.DEFINE_float(
  "temperature", 0.8, "Softmax temperature; 0 = greedy."
)
_TOP_K = flags.DEFINE_integer(
  "top_k", 0, "Keep the k most likely tokens (0: all)."
)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SNAPKV_CAPACITY = flags.DEFINE_integer(
  "snapkv_capacity",
  0,
  "Compress each attention layer's prompt cache to "
  "this many entries per KV head with SnapKV (0: off).",
)
_SNAPKV_WINDOW = flags.DEFINE_integer(
  "snapkv_window", 32, "SnapKV observation window."
)
_SNAPKV_KERNEL = flags.DEFINE_integer(
  "snapkv_kernel", 7, "SnapKV pooling kernel (odd)."
)
_SNAPKV_POOLING = flags.DEFINE_enum(
  "snapkv_pooling", "avg", ["avg", "max"], "SnapKV pooling."
)
_STEP = flags.DEFINE_integer(
  "step", None, "Checkpoint step (default: the latest complete one)."
)


def encode_prompt(prompt: str, vocab_size: int) -> np.ndarray:
  """Byte tokens of `prompt` (or whitespace-separated ids for other vocabs)."""
  if vocab_size == BYTE_VOCAB:
    tokens = training.encode_bytes(prompt)
  else:
    try:
      tokens = np.asarray([int(t) for t in prompt.split()], np.int32)
    except ValueError:
      raise ValueError(
        f"--prompt must be whitespace-separated token ids for a vocabulary "
        f"of {vocab_size}, got {prompt!r}."
      ) from None
  if tokens.size == 0:
    raise ValueError("--prompt must not be empty.")
  if tokens.min() < 0 or tokens.max() >= vocab_size:
    raise ValueError(
      f"--prompt token ids must be in [0, {vocab_size}), got {prompt!r}."
    )
  return tokens


def run(
  params,
  cfg,
  prompt_tokens,
  *,
  max_new_tokens,
  key,
  sampling_cfg,
  snapkv=None,
  out=sys.stdout,
):
  """Generates after one prompt, writing text to `out` as it comes.

  Returns:
    `(new tokens [max_new_tokens] numpy, stats dict)` with prefill and decode
    tokens/s and compile seconds.
  """
  tokens = jnp.asarray(prompt_tokens, jnp.int32)[None]
  lengths = jnp.array([tokens.shape[1]], jnp.int32)
  max_len = tokens.shape[1] + max_new_tokens
  start = time.perf_counter()
  jax.block_until_ready(
    decode.prefill_jit(params, tokens, lengths, cfg, max_len, snapkv=snapkv)
  )
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(
    decode.prefill_jit(params, tokens, lengths, cfg, max_len, snapkv=snapkv)
  )
  prefill_s = time.perf_counter() - start
  text = codecs.getincrementaldecoder("utf-8")(errors="replace")
  new, stamps = [], []
  for step in inference.generate_stream(
    params,
    tokens,
    lengths,
    cfg,
    max_new_tokens=max_new_tokens,
    key=key,
    sampling_cfg=sampling_cfg,
    snapkv=snapkv,
  ):
    stamps.append(time.perf_counter())
    new.append(int(step[0]))
    if cfg.vocab_size == BYTE_VOCAB:
      out.write(text.decode(bytes([new[-1]])))
    else:
      out.write(f"{new[-1]} ")
    out.flush()
  out.write(text.decode(b"", final=True) + "\n")
  # Token 0 follows the prefill, token 1 the first (compiling) decode step.
  steps = len(stamps) - 2
  decode_tps = steps / (stamps[-1] - stamps[1]) if steps > 0 else float("nan")
  stats = dict(
    prefill_tokens=int(tokens.shape[1]),
    prefill_tokens_per_s=tokens.shape[1] / prefill_s,
    prefill_compile_s=compile_s - prefill_s,
    decode_tokens_per_s=decode_tps,
    cache_bytes=inference.cache_bytes(
      jax.eval_shape(
        functools.partial(
          decode.prefill, cfg=cfg, max_len=max_len, snapkv=snapkv
        ),
        params,
        tokens,
        lengths,
      )[1]
    ),
  )
  return np.asarray(new, np.int32), stats


def _check_flags():
  """`(sampling_cfg, snapkv)` of the flags; ValueError on a bad flag."""
  if _WORKDIR.value is None:
    raise ValueError("--workdir is required.")
  cli.check_workdir(_WORKDIR.value)
  if _MAX_NEW_TOKENS.value < 1:
    raise ValueError(
      f"--max_new_tokens must be >= 1, got {_MAX_NEW_TOKENS.value}."
    )
  if _SNAPKV_CAPACITY.value < 0:
    raise ValueError(
      f"--snapkv_capacity must be >= 0, got {_SNAPKV_CAPACITY.value}."
    )
  sampling_cfg = inference.SamplingConfig(
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value or None,
    top_p=_TOP_P.value,
  )
  snapkv = None
  if _SNAPKV_CAPACITY.value:
    snapkv = inference.SnapKVConfig(
      _SNAPKV_CAPACITY.value,
      _SNAPKV_WINDOW.value,
      _SNAPKV_KERNEL.value,
      _SNAPKV_POOLING.value,
    )
  return sampling_cfg, snapkv


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  try:
    sampling_cfg, snapkv = _check_flags()
    params, cfg, step = load_model(_WORKDIR.value, _STEP.value)
    prompt = encode_prompt(_PROMPT.value, cfg.vocab_size)
  except cli.INPUT_ERRORS as e:
    cli.fail(e)
  print(
    f"# {_WORKDIR.value}: step {step}, {models.num_params(cfg):,} params, "
    f"mixers {cfg.mixers}",
    file=sys.stderr,
  )
  sys.stdout.write(_PROMPT.value)
  _, stats = run(
    params,
    cfg,
    prompt,
    max_new_tokens=_MAX_NEW_TOKENS.value,
    key=jax.random.key(_SEED.value),
    sampling_cfg=sampling_cfg,
    snapkv=snapkv,
  )
  print(
    f"# prefill: {stats['prefill_tokens']} tokens at "
    f"{stats['prefill_tokens_per_s']:.1f} tokens/s (compile "
    f"{stats['prefill_compile_s']:.1f} s); decode: "
    f"{stats['decode_tokens_per_s']:.1f} tokens/s; cache "
    f"{stats['cache_bytes'] / 2**20:.2f} MiB",
    file=sys.stderr,
  )


if __name__ == "__main__":
  app.run(main)
