"""Mixture of Sparse Attention (MoA): per-head elastic sliding windows + sink.

MoA (Fu et al., 2024, "Mixture of Sparse Attention for Automatic Large
Language Model Compression", arXiv 2406.14909): head h of a causal softmax
attention sees key s from query t iff

    s <= t  and  (t - s < window_h  or  s < sink),

with the elastic rule window_h = alpha_h + beta_h * N for input length N.
"""

import dataclasses
import json
import numbers
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax.ops import _blocked
from lightning_jax.ops import attention as attention_lib

IMPLS = ("blocked", "dense")


def moa_windows(alpha, beta, seq_len: int) -> np.ndarray:
  """Elastic windows `clip(round(alpha + beta * seq_len), 1, seq_len)`.

  Args:
    alpha: per-head base spans, `[heads]` (or any shape matching `beta`).
    beta: per-head spans per token of input length, same shape.
    seq_len: the input length N.

  Returns:
    int64 numpy windows, the shape of `alpha`.

  Raises:
    ValueError: the shapes differ or an entry is not finite (naming it).

  Example:
    >>> moa_windows([64, 0], [0.0, 0.5], 1024)
    array([ 64, 512])
  """
  seq_len = _checks.check_positive_int("seq_len", seq_len)
  alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
  if alpha.shape != beta.shape:
    raise ValueError(
      f"`beta` must have the shape of `alpha` {alpha.shape}, got {beta.shape}."
    )
  for name, x in (("alpha", alpha), ("beta", beta)):
    if not np.isfinite(x).all():
      where = np.argwhere(~np.isfinite(x))[0]
      what = f"head {where[0]}" if x.ndim == 1 else f"index {tuple(where)}"
      raise ValueError(
        f"`{name}` must be finite, got {x[tuple(where)]} for {what}."
      )
  return np.clip(np.round(alpha + beta * seq_len), 1, seq_len).astype(np.int64)


def moa_mask(window, seq_len: int, sink: int = 0) -> jax.Array:
  """Bool `[heads, seq_len, seq_len]`: the MoA mask of each head (reference).

  Example:
    >>> moa_mask(jnp.array([2, 8]), 8, sink=1).shape
    (2, 8, 8)
  """
  t = jnp.arange(seq_len)[:, None]
  s = jnp.arange(seq_len)[None, :]
  band = (t - s)[None] < jnp.asarray(window)[:, None, None]
  return (s <= t)[None] & (band | (s < sink)[None])


def _check_window(window, heads: int, impl: str):
  """Returns `window` as concrete numpy ints (or the tracer for "dense")."""
  if isinstance(window, jax.core.Tracer):
    if impl == "blocked":
      raise ValueError(
        "`window` must be concrete (a list or numpy array, not traced under "
        "jit) for impl='blocked': the visited blocks are chosen at trace "
        "time. Close over it, or mark it static, or use impl='dense'."
      )
    _checks.check_shape("window", window, (heads,), "[q_heads]")
    return window
  window = np.asarray(window)
  _checks.check_shape("window", window, (heads,), "[q_heads]")
  if window.dtype.kind not in "iu":
    raise ValueError(f"`window` must hold integers, got dtype {window.dtype}.")
  if (window < 1).any():
    raise ValueError(f"`window` must be >= 1 for every head, got {window}.")
  return window


def moa_attention(
  q,
  k,
  v,
  window,
  *,
  sink: int = 0,
  scale=None,
  block_size: int = 64,
  impl: str = "blocked",
):
  """Causal softmax attention with a per-head sliding window and a sink.

  Query t of head h attends key s iff s <= t and (t - s < window[h] or
  s < sink), with query t at position `t + seq_k - seq` when the keys are
  longer than the queries (bottom-right alignment, as in `ops.attention`:
  keys before the queries, e.g. a sequence-parallel device's halo). A head
  with window >= seq_k is dense. The "blocked" impl visits
  only the (query chunk, key range) tiles around a head's band and sink, so
  time and memory fall with density; heads are grouped by window so none
  pays for a wider one. `window` must then be concrete (numpy or a list,
  static under `jit`), because the tiles are fixed at trace time.

  Args:
    q: `[batch, seq, heads, dim]`.
    k: `[batch, seq_k, kv_heads, dim]`, kv_heads dividing heads (GQA),
      seq_k >= seq.
    v: `[batch, seq_k, kv_heads, value_dim]`.
    window: int `[heads]`, each >= 1 (e.g. from `moa_windows`).
    sink: leading keys that every query sees (attention sink), >= 0.
    scale: score scale, default `dim ** -0.5`.
    block_size: smallest query chunk of the "blocked" impl (chunks grow
      with the window up to 4 `block_size`).
    impl: "blocked" (tiles around the band, recomputing backward) or
      "dense" (reference: the `[heads, seq, seq]` mask applied to full scores).

  Returns:
    `[batch, seq, heads, value_dim]` in q's dtype (fp32 accumulation).

  Raises:
    ValueError: on bad shapes, windows < 1, a traced window with "blocked",
      negative `sink`, or a bad `impl` / `block_size`.

  Example:
    >>> q = jnp.ones((1, 100, 4, 16)); kv = jnp.ones((1, 100, 2, 16))
    >>> moa_attention(q, kv, kv, [100, 32, 8, 1], sink=4).shape
    (1, 100, 4, 16)
  """
  group = attention_lib.check_qkv(q, k, v)
  _checks.check_choice("impl", impl, IMPLS)
  block = _checks.check_positive_int("block_size", block_size)
  seq, heads, seq_k = q.shape[1], q.shape[2], k.shape[1]
  if seq_k < seq:
    raise ValueError(
      f"`k` must have at least the {seq} positions of q, got shape {k.shape}."
    )
  if (
    isinstance(sink, bool)
    or not isinstance(sink, (int, np.integer))
    or (sink < 0)
  ):
    raise ValueError(f"`sink` must be an integer >= 0, got {sink!r}.")
  window = _check_window(window, heads, impl)
  if impl == "dense":
    mask = moa_mask(window, seq_k, sink)[:, seq_k - seq :]
    return attention_lib.masked_attention(q, k, v, mask, scale=scale)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  window = np.minimum(window, seq_k)
  order = np.argsort(-window, kind="stable")
  f32 = lambda x: x.astype(jnp.float32)
  out = _blocked.blocked_attention(
    attention_lib.take_heads(f32(q) * scale, order),
    attention_lib.take_heads(f32(k), order // group),
    attention_lib.take_heads(f32(v), order // group),
    windows=tuple(window[order]),
    sink=int(sink),
    causal=True,
    offset=seq_k - seq,
    block=block,
  )
  return attention_lib.take_heads(out, np.argsort(order)).astype(q.dtype)


def moa_density(window, seq_len: int, sink: int = 0) -> np.ndarray:
  """Fraction of the causal `seq_len (seq_len + 1) / 2` pairs each head keeps.

  Example:
    >>> moa_density([4, 4], 4).tolist()
    [1.0, 1.0]
  """
  w = np.minimum(np.asarray(window, np.int64), seq_len)[..., None]
  t = np.arange(seq_len)
  band = np.minimum(t + 1, w)  # keys t-w+1..t
  sink_extra = np.clip(np.minimum(sink, t - w + 1), 0, None)  # s < t-w+1
  return (band + sink_extra).sum(-1) / (seq_len * (seq_len + 1) / 2)


@dataclasses.dataclass(frozen=True)
class MoAPlan:
  """Per-layer, per-head elastic rules (alpha, beta).

  JSON format (as published by the MoA authors):
  `{"alphas": [[...per head...] per layer], "betas": [[...]]}`.

  Example:
    >>> plan = MoAPlan(alphas=((64.0, 8.0),), betas=((0.5, 0.0),))
    >>> plan.windows(0, 256).tolist()
    [192, 8]
  """

  alphas: tuple[tuple[float, ...], ...]
  betas: tuple[tuple[float, ...], ...]

  def __post_init__(self):
    for name in ("alphas", "betas"):
      _check_rows(name, getattr(self, name))
    heads = [len(a) for a in self.alphas]
    if heads != [len(b) for b in self.betas]:
      raise ValueError(
        f"`betas` must have the layers of `alphas` ({len(heads)}) with as "
        f"many heads each ({heads}), got {len(self.betas)} layers with "
        f"{[len(b) for b in self.betas]} heads."
      )

  @property
  def num_layers(self) -> int:
    return len(self.alphas)

  def windows(self, layer: int, seq_len: int) -> np.ndarray:
    """Windows `[heads]` of `layer` at input length `seq_len`."""
    return moa_windows(self.alphas[layer], self.betas[layer], seq_len)

  def to_json(self) -> str:
    return json.dumps(
      {
        "alphas": [list(a) for a in self.alphas],
        "betas": [list(b) for b in self.betas],
      }
    )

  @classmethod
  def from_json(cls, text: str) -> "MoAPlan":
    """The plan of the authors' JSON; ValueError if it is not one."""
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"A MoA plan must be JSON: {e}.") from None
    if not isinstance(data, dict) or {"alphas", "betas"} - set(data):
      raise ValueError(
        'A plan must be a JSON object with "alphas" and '
        '"betas" (lists over layers of lists over heads).'
      )
    for name in ("alphas", "betas"):
      _check_rows(name, data[name])
    as_rows = lambda rows: tuple(tuple(float(x) for x in r) for r in rows)
    return cls(as_rows(data["alphas"]), as_rows(data["betas"]))

  def save(self, path) -> None:
    pathlib.Path(path).write_text(self.to_json())

  @classmethod
  def load(cls, path) -> "MoAPlan":
    """The plan in the JSON file `path`.

    Raises:
      ValueError: naming the file, if it cannot be read or is not a plan.
    """
    try:
      text = pathlib.Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
      reason = getattr(e, "strerror", None) or e
      raise ValueError(
        f"cannot read MoA plan {str(path)!r}: {reason}."
      ) from None
    try:
      return cls.from_json(text)
    except ValueError as e:
      raise ValueError(f"MoA plan {str(path)!r}: {e}") from None


def _check_rows(name: str, rows) -> None:
  """Raises ValueError unless `rows` are lists over layers of lists over
  heads of finite numbers, naming the first bad layer and head."""
  is_list = lambda x: isinstance(x, (list, tuple))
  if not is_list(rows) or not all(map(is_list, rows)):
    raise ValueError(
      f"`{name}` must be a list over layers of lists over heads, got "
      f"{rows!r:.60}."
    )
  for layer, row in enumerate(rows):
    for head, x in enumerate(row):
      if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(
          f"`{name}` of layer {layer}, head {head} must be a number, got {x!r}."
        )
      if not np.isfinite(x):
        raise ValueError(
          f"`{name}` of layer {layer}, head {head} must be finite, got {x}."
        )
