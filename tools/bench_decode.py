r"""Decoding benchmark: tokens/s and cache memory against context length.

Two parts, each measured in one run so that its ratios are meaningful on a
noisy machine:

1. `decode_step` of whole models (presets, default sizes, batch 1) with a
   decoding state at context length L (1k..16k): tokens/s, cache MiB, and
   tokens/s relative to L = 1k. Linear-recurrence layers carry a constant
   state; attention layers read a KV cache that grows with L, unless SnapKV
   compressed the prompt to `--snapkv_capacity` entries per head. The state
   has exactly the shapes the real `prefill` returns at L (from
   `jax.eval_shape`, checked against a real prefill at the first L) and
   lengths / positions set to L; its values are zeros, which does not
   change the work of a decode step, so no 16k-token prefill is needed.
2. The decode step of a linear recurrence against a bare state update of
   the same `[batch, heads, Dk, Dv]` state, `S <- a S + k v^T, o = S^T q`
   (the memory-bandwidth floor of a recurrent decode step): the recurrence
   op alone (`ops.delta_rule` / `ops.linear_attention`, `impl="recurrent"`,
   one token, carried state) and the whole mixer layer (projections, short
   conv, recurrence, output norm and gate, output projection).

Timings: each configuration keeps its own (donated) state; rounds go over
all configurations in turn, each timing `--steps` consecutive steps, and the
fastest round is kept (on a shared machine the least-disturbed round is the
best estimate of the cost; the median follows the other users' load).

Usage:
  python -m tools.bench_decode
"""

import dataclasses
import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import inference
from lightning_jax import layers
from lightning_jax import models
from lightning_jax import ops
from lightning_jax.inference import decode
from tools import benchlib

_PRESETS = flags.DEFINE_list(
  "presets", ["tiny-hybrid", "transformer", "deltanet"], "Model presets."
)
_CONTEXTS = flags.DEFINE_list(
  "contexts", ["1024", "2048", "4096", "8192", "16384"], "Context lengths L."
)
_NEW_TOKENS = flags.DEFINE_integer(
  "new_tokens", 256, "Decode budget beyond the prompt (cache slots)."
)
_SNAPKV_CAPACITY = flags.DEFINE_integer(
  "snapkv_capacity",
  1024,
  "SnapKV capacity of the compressed rows (0: skip them).",
)
_STEPS = flags.DEFINE_integer("steps", 16, "Decode steps per timing.")
_ROUNDS = flags.DEFINE_integer(
  "rounds", 9, "Timing rounds (the fastest is kept)."
)
_LAYER_SIZES = flags.DEFINE_list(
  "layer_sizes",
  ["1x4x32x128", "8x8x128x256", "64x4x128x512"],
  "Recurrent-layer comparison sizes batch x heads x head_dim x d_model.",
)
_PARTS = flags.DEFINE_list("parts", ["models", "layers"], "Parts to run.")


def filled_state(abstract, length: int, kept: int):
  """Zeros of the abstract `DecodeState`, at position `length` with `kept`
  dense-cache entries (ring caches at `length`)."""
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)

  def at(layer_state):
    if not isinstance(layer_state, layers.AttentionState):
      return layer_state
    cache = layer_state.cache
    if isinstance(cache, inference.KVCache):
      filled = kept
      cache = cache._replace(length=jnp.full_like(cache.length, kept))
    else:
      filled = length
      cache = dataclasses.replace(
        cache, length=jnp.full_like(cache.length, length)
      )
    return layers.AttentionState(
      cache, jnp.full_like(layer_state.offset, length - filled)
    )

  return decode.DecodeState(
    jnp.full_like(zeros.positions, length), tuple(at(c) for c in zeros.layers)
  )


def abstract_state(params, cfg, length: int, snapkv):
  fn = functools.partial(
    decode.prefill, cfg=cfg, max_len=length + _NEW_TOKENS.value, snapkv=snapkv
  )
  return jax.eval_shape(
    fn,
    params,
    jax.ShapeDtypeStruct((1, length), jnp.int32),
    jax.ShapeDtypeStruct((1,), jnp.int32),
  )[1]


def check_against_prefill(params, cfg, length: int, snapkv):
  """The abstract state has the shapes of a real prefill's."""
  tokens = jax.random.randint(jax.random.key(0), (1, length), 0, cfg.vocab_size)
  _, real = decode.prefill_jit(
    params,
    tokens,
    jnp.array([length]),
    cfg,
    length + _NEW_TOKENS.value,
    snapkv=snapkv,
  )
  want = jax.tree.map(lambda x: (x.shape, x.dtype), real)
  got = jax.tree.map(
    lambda x: (x.shape, x.dtype), abstract_state(params, cfg, length, snapkv)
  )
  if got != want:
    raise AssertionError(f"eval_shape state {got} != prefill state {want}")


class _Runner:
  """A configuration with its own donated state; times `steps` steps."""

  def __init__(self, step_fn, state, args):
    self.step_fn, self.state, self.args = step_fn, state, args
    self.times = []

  def run(self, steps: int, record: bool = True):
    jax.block_until_ready(self.state)
    start = time.perf_counter()
    for _ in range(steps):
      out, self.state = self.step_fn(self.state, *self.args)
    jax.block_until_ready((out, self.state))
    if record:
      self.times.append((time.perf_counter() - start) / steps)

  @property
  def seconds(self) -> float:
    return float(np.min(self.times))


def _rounds(runners):
  for r in runners:
    r.run(2, record=False)  # compile + warm up
  for _ in range(_ROUNDS.value):
    for r in runners:
      r.run(_STEPS.value)


def model_rows():
  """Rows of part 1."""
  contexts = [int(c) for c in _CONTEXTS.value]
  runners, meta = [], []
  for name in _PRESETS.value:
    cfg = models.get_preset(name)
    params = models.init(jax.random.key(0), cfg)
    has_attention = "attention" in cfg.mixers or "moa" in cfg.mixers
    settings = [None]
    if has_attention and _SNAPKV_CAPACITY.value:
      settings.append(inference.SnapKVConfig(_SNAPKV_CAPACITY.value))
    for snapkv in settings:
      check_against_prefill(params, cfg, contexts[0], snapkv)
      for length in contexts:
        kept = length if snapkv is None else min(length, snapkv.capacity)
        state = filled_state(
          abstract_state(params, cfg, length, snapkv), length, kept
        )
        step = lambda s, p, t, cfg=cfg: inference.decode_step(p, s, t, cfg)
        runners.append(
          _Runner(step, state, (params, jnp.zeros((1,), jnp.int32)))
        )
        meta.append(
          dict(
            preset=name,
            snapkv=snapkv.capacity if snapkv else "-",
            context=length,
            cache_mib=inference.cache_bytes(state) / 2**20,
          )
        )
  _rounds(runners)
  rows, base = [], {}
  for m, r in zip(meta, runners, strict=True):
    tps = 1.0 / r.seconds
    key = (m["preset"], m["snapkv"])
    base.setdefault(key, tps)
    rows.append(
      dict(
        **m,
        step_ms=r.seconds * 1e3,
        tokens_per_s=tps,
        vs_first_context=tps / base[key],
      )
    )
  return rows


def _bare_update(state, q, k, v, log_a):
  """`S <- exp(a) S + k v^T; o = S^T q` on `[B, H, Dk, Dv]` (fp32)."""
  state = (
    jnp.exp(log_a)[..., None, None] * state + k[..., :, None] * v[..., None, :]
  )
  return jnp.einsum("bhkv,bhk->bhv", state, q), state


def _op_step(kind):
  """The recurrence op on one token: `(state, q, k, v, beta, log_a) ->
  (o, state)`, all `[B, H, ...]`."""

  def step(state, q, k, v, beta, log_a):
    one = lambda x: x[:, None]  # [B, 1, H, ...]
    kw = dict(initial_state=state, output_final_state=True, impl="recurrent")
    if kind == "deltanet":
      o, state = ops.delta_rule(
        one(q), one(k), one(v), one(beta), one(log_a), **kw
      )
    else:
      o, state = ops.linear_attention(one(q), one(k), one(v), one(log_a), **kw)
    return o[:, 0], state

  return step


def layer_rows():
  """Rows of part 2."""
  runners, meta, floors = [], [], []
  for size in _LAYER_SIZES.value:
    batch, heads, dim, d_model = (int(x) for x in size.split("x"))
    state_mib = batch * heads * dim * dim * 4 / 2**20
    keys = jax.random.split(jax.random.key(2), 5)
    q, k, v = (jax.random.normal(kk, (batch, heads, dim)) for kk in keys[:3])
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.random.uniform(keys[3], (batch, heads))
    log_a = -jax.random.uniform(keys[4], (batch, heads))
    shape = (batch, heads, dim, dim)
    floors.append(len(runners))
    runners.append(
      _Runner(
        jax.jit(_bare_update, donate_argnums=0),
        jnp.zeros(shape),
        (q, k, v, log_a),
      )
    )
    meta.append(dict(what="bare state update", size=size, state_mib=state_mib))
    for kind in ("deltanet", "lightning"):
      runners.append(
        _Runner(
          jax.jit(_op_step(kind), donate_argnums=0),
          jnp.zeros(shape),
          (q, k, v, beta, log_a),
        )
      )
      meta.append(dict(what=f"{kind} op step", size=size, state_mib=state_mib))
      cfg = layers.RecurrentConfig(
        kind,
        d_model,
        heads,
        dim,
        conv_size=4 if kind == "deltanet" else 0,
        impl="recurrent",
      )
      params = layers.init_recurrent(
        jax.random.key(0), cfg, layer=0, num_layers=2
      )
      x = jax.random.normal(jax.random.key(1), (batch, 1, d_model))
      layer = jax.jit(
        lambda s, p, x, cfg=cfg: layers.recurrent_layer(p, x, cfg, s),
        donate_argnums=0,
      )
      runners.append(
        _Runner(layer, layers.init_recurrent_state(cfg, batch), (params, x))
      )
      meta.append(
        dict(what=f"{kind} layer step", size=size, state_mib=state_mib)
      )
  _rounds(runners)
  rows = []
  for i, (m, r) in enumerate(zip(meta, runners, strict=True)):
    floor = runners[max(f for f in floors if f <= i)].seconds  # same size
    rows.append(dict(**m, step_us=r.seconds * 1e6, vs_bare=r.seconds / floor))
  return rows


def main(argv):
  del argv
  print(f"devices: {jax.devices()}")
  if "models" in _PARTS.value:
    print("\n## decode_step vs context (batch 1)\n")
    print(benchlib.markdown_table(model_rows()))
  if "layers" in _PARTS.value:
    print("\n## recurrence decode step vs bare state update\n")
    print(benchlib.markdown_table(layer_rows()))


if __name__ == "__main__":
  app.run(main)
