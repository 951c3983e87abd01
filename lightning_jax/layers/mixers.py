"""The token-mixer registry: one `Mixer` record per kind.

A record holds everything the framework needs of a token mixer: how its
layer config derives from the model config, parameter init, ONE apply
function for training, prefill and decoding, the empty decoding state, the
sharding rules of its parameters and a one-line doc. `models`, `inference`,
`parallel.sharding`, `parallel.pipeline` and the tests iterate over
`kinds()`; a new mixer is one file that calls `register` (from inside the
package or outside it).

Decoding contract. For a record `m`, params `p`, layer config `c`:

* `m.apply(p, x, c)` (no state) is the training forward on a fresh
  sequence `x [batch, seq, d_model]`: `(y [batch, seq, d_model], state or
  None)`.
* `m.empty_state(c, batch, max_len, dtype)` is the state of a fresh
  sequence that will grow to at most `max_len` tokens.
* Prefill: `m.apply(p, x, c, empty, Decoding(lengths_B))` with `x` right
  padded (row b's `lengths_B[b]` real tokens first) returns the outputs of
  the real tokens and the state after each row's `lengths_B[b]` tokens.
* Step: `m.apply(p, x_Bx1xD, c, state, Decoding(ones))` feeds one more
  token per row and returns its output and the advanced state.

so that prefill of a prompt followed by steps equals `apply` of the whole
sequence at every real position (up to rounding; the tests check it for
every registered kind). A state is a pytree of fixed-shape arrays (static
metadata allowed), so a decode step compiles once. Mixers must be causal.
Inside `shard_map` (the pipeline) a `lax.scan` carry must vary over the
same mesh axes as its inputs: build a training-time zero state from the
input (`jnp.zeros_like`) rather than from constants.
"""

import dataclasses
import json
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class Decoding(NamedTuple):
  """Context of a prefill or decode-step call (built inside `jit`).

  Attributes:
    lengths_B: int32 `[batch]`, real tokens of `x` per row (right padded;
      all ones in a decode step).
    snapkv: optional `layers.SnapKVConfig` compressing dense attention
      caches at prefill (other mixers ignore it).
  """

  lengths_B: jax.Array
  snapkv: Any = None


class LayerSpec(NamedTuple):
  """What a record's `config` builder reads to make one layer's config.

  Attributes:
    model: the `models.ModelConfig` (read its generic fields: `d_model`,
      `head_dim`, `conv_size`, `chunk_size`, `recurrent_impl`, ...).
    layer: 0-based layer index.
    num_heads: heads of this layer (after layer-wise scaling).
    num_kv_heads: key/value heads of this layer (GQA).
    options: this kind's `ModelConfig.mixer_options`, `{name: value}`.
  """

  model: Any
  layer: int
  num_heads: int
  num_kv_heads: int
  options: dict


@dataclasses.dataclass(frozen=True)
class Mixer:
  """A token-mixer kind.

  Attributes:
    name: the kind, as written in `ModelConfig.pattern`.
    config: `LayerSpec -> layer config` (a frozen, hashable dataclass with
      a `d_model` field; layers of one kind with equal configs stack into
      pipeline stages).
    init: `(key, layer_cfg, *, layer, num_layers) -> params` (a dict).
    apply: `(params, x_BxTxD, layer_cfg, state=None, decoding=None) ->
      (y_BxTxD, state)`, see the module docstring.
    empty_state: `(layer_cfg, batch, max_len, dtype) -> state`.
    flops: `(layer_cfg, seq_len) -> float`: forward FLOPs per token of the
      sequence mixing, beyond the matmuls of the layer's own weights
      (`models.flops_per_token` counts those from the param shapes); the
      work the model defines (e.g. the recurrent form), not a kernel's.
    rules: `((param path suffix, logical dim names), ...)` for
      `parallel.sharding`; suffixes are relative to the mixer's params.
    doc: one line: what it is, with the paper.
    softmax: a softmax-attention mixer (its heads are profiled for MoA).
    preset: `ModelConfig` fields of a model preset of this mixer alone,
      named like the kind with "-" for "_" (`models.get_preset`); None: no
      preset.
  """

  name: str
  config: Callable[[LayerSpec], Any]
  init: Callable[..., dict]
  apply: Callable[..., tuple[jax.Array, Any]]
  empty_state: Callable[..., Any]
  flops: Callable[[Any, int], float]
  rules: tuple[tuple[tuple[str, ...], tuple[str | None, ...]], ...]
  doc: str
  softmax: bool = False
  preset: dict | None = None


_REGISTRY: dict[str, Mixer] = {}


def register(mixer: Mixer) -> Mixer:
  """Adds `mixer` to the registry (a kind is registered once) and returns it.

  Raises:
    ValueError: a mixer of that name is already registered.
  """
  if mixer.name in _REGISTRY:
    raise ValueError(f"A mixer named {mixer.name!r} is already registered.")
  _REGISTRY[mixer.name] = mixer
  return mixer


def kinds() -> tuple[str, ...]:
  """The registered kinds, in registration order."""
  return tuple(_REGISTRY)


def get(kind: str) -> Mixer:
  """The record of `kind`.

  Raises:
    ValueError: unknown kind, listing the registered ones.
  """
  if kind not in _REGISTRY:
    raise ValueError(
      f"Unknown token mixer {kind!r}; registered mixers: {list(_REGISTRY)}."
    )
  return _REGISTRY[kind]


def parse_options(entries: tuple[str, ...]) -> dict[str, dict]:
  """`("mamba2.state_dim=64", ...)` -> `{"mamba2": {"state_dim": 64}}`.

  Values are JSON (numbers, booleans, quoted strings); a bare word is a
  string.

  Raises:
    ValueError: an entry not of the form `kind.name=value`, or an unknown
      kind.
  """
  out: dict[str, dict] = {}
  for entry in entries:
    key, sep, value = entry.partition("=")
    kind, dot, name = key.partition(".")
    if not (sep and dot and kind and name):
      raise ValueError(
        f"`mixer_options` entries must be 'kind.name=value', got {entry!r}."
      )
    get(kind)
    try:
      parsed = json.loads(value)
    except json.JSONDecodeError:
      parsed = value
    out.setdefault(kind, {})[name] = parsed
  return out


# Forms of the linear-recurrence mixers' kernels (`RecurrentConfig.impl`...).
RECURRENT_IMPLS = ("chunked", "recurrent", "auto")


def recurrent_impl(impl: str, seq: int, decoding: Decoding | None) -> str:
  """The kernel form ("chunked" / "recurrent") of one mixer call.

  One token runs the recurrent step. "auto" runs the chunked form for
  training (its backward is several times faster than the scan's and keeps
  no per-step states) and, for a prefill (forward only), the form measured
  fastest on the backend: the recurrent scan on CPU, where XLA runs it as
  one fused loop over a cache-resident state and the chunked forward's small
  matmuls do not pay for their extra FLOPs (docs/benchmarks.md), the chunked
  form elsewhere (matmul units; not measured here).

  Args:
    impl: the configured form, one of `RECURRENT_IMPLS`.
    seq: tokens in the call.
    decoding: the prefill / decode context, None for a training forward.
  """
  if seq == 1:
    return "recurrent"
  if impl != "auto":
    return impl
  prefill_on_cpu = decoding is not None and jax.default_backend() == "cpu"
  return "recurrent" if prefill_on_cpu else "chunked"


def left_align(x_BxTxD, lengths_B):
  """Shifts each right-padded row so its real tokens end at the last slot.

  A linear recurrence run on the shifted rows from a zero state, with zero
  value increments at the padding in front (`valid_BxT` False), ends in the
  state after each row's real tokens; a short conv sees zeros before them,
  as for a fresh sequence.

  Returns:
    `(shifted x, valid_BxT bool, unshift)` with `unshift(y)` moving outputs
    back to the right-padded layout.
  """
  pad = x_BxTxD.shape[1] - jnp.asarray(lengths_B, jnp.int32)
  seq = x_BxTxD.shape[1]
  valid = jnp.arange(seq)[None, :] >= pad[:, None]
  return _shift(x_BxTxD, pad), valid, lambda y: _shift(y, -pad)


def _shift(x_BxTx, shift_B):
  """`y[b, i] = x[b, i - shift[b]]`, zero where `i - shift[b]` is outside."""
  seq = x_BxTx.shape[1]
  src = jnp.arange(seq)[None, :] - shift_B[:, None]
  inside = (src >= 0) & (src < seq)
  idx = jnp.clip(src, 0, seq - 1).reshape(src.shape + (1,) * (x_BxTx.ndim - 2))
  y = jnp.take_along_axis(x_BxTx, idx, axis=1)
  return jnp.where(inside.reshape(idx.shape), y, 0)


def with_options(layer_cfg, options: dict):
  """`layer_cfg` with fields replaced from `options`.

  Raises:
    ValueError: an option that is not a field of the layer config.
  """
  fields = {f.name for f in dataclasses.fields(layer_cfg)}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(
      f"Unknown mixer option(s) {unknown} for "
      f"{type(layer_cfg).__name__}; fields: {sorted(fields)}."
    )
  return dataclasses.replace(layer_cfg, **options)
