"""Tiled exact-softmax attention core shared by `attention` and `moa_attention`.

Every mask used here depends on the relative position r = t + offset - s
(plus, for sinks, on s): query t (absolute t + offset) sees key s iff
0 <= r < window_h or (s < sink and r >= 0), or, without `causal`, every key.

Heads are sorted by window (widest first) and grouped by equal window. For a
group with window w, the queries are cut into chunks of C positions (C grows
with w: `chunk_size`) and chunk [c0, c0 + C) meets only the keys
[c0 + offset - w + 1, c0 + C + offset), plus the sink keys below that range.
Each (heads, chunk) is one tile: a `[C, keys]` score matrix per head, its
exact softmax and `P V`; a group's heads share a tile up to
`Pattern.tile_elements` scores. Every query row lives in exactly one tile,
so no online rescaling is needed, work is proportional to the tiles' area
(about T (w + C) per head: it falls with the window, and no head pays for a
wider one) and memory to one tile, O(C T) for a dense head. Tiles are large
dense matmuls, which is what XLA:CPU (and GPU) run fastest. The backward pass
recomputes each tile's probabilities from the saved log-sum-exp
(FlashAttention, Dao et al., 2022).

Tiles run one after another (`_after`): left independent, XLA:CPU's default
concurrency-optimised scheduler starts them all at once and keeps every
tile's scores alive: 0.4 GiB of temporaries for 8 dense heads at T = 4096,
page-faulted afresh on every call. Serialised, the forward needs a few tiles
(13 MiB) and ran 3.7x faster (547 -> 149 ms, `docs/benchmarks.md`).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Largest score tile, in elements summed over the tile's heads (4 MiB fp32):
# a group's heads share a tile while their scores fit.
TILE_ELEMENTS = 2**20


class Pattern(NamedTuple):
  """Static description of which (query, key) pairs attend.

  `windows` must be sorted in decreasing order (heads pre-permuted).
  """
  block: int
  seq_q: int
  seq_k: int
  offset: int
  causal: bool
  windows: tuple[int, ...]
  sink: int
  tile_elements: int


class _Tile(NamedTuple):
  """Queries [q_lo, q_hi) of heads [h_lo, h_hi) against the concatenated
  key ranges `keys` ((lo, hi), ...), all heads with window `window`.
  `masked`: some pair of the tile is not attended; `empty_rows`: some query
  row attends no key of the tile (so of any tile)."""
  h_lo: int
  h_hi: int
  q_lo: int
  q_hi: int
  keys: tuple[tuple[int, int], ...]
  window: int
  masked: bool
  empty_rows: bool


def chunk_size(window: int, seq_q: int, block: int) -> int:
  """Query chunk of a head group: the power of two nearest `window / 4`,
  clipped to [block, 4 block] (and to the queries)."""
  target = 2 ** round(np.log2(max(window, 1) / 4))
  return int(min(max(target, block), 4 * block, max(seq_q, 1)))


def _key_ranges(pat: Pattern, q_lo: int, q_hi: int, window: int):
  if not pat.causal:
    return ((0, pat.seq_k),)
  lo = max(0, q_lo + pat.offset - window + 1)
  hi = min(pat.seq_k, q_hi + pat.offset)
  ranges = []
  sink_hi = min(pat.sink, lo, hi)
  if sink_hi > 0:
    ranges.append((0, sink_hi))
  if hi > lo:
    ranges.append((lo, hi))
  return tuple(ranges)


def _allowed(pat: Pattern, t_abs, s, window):
  """Bool mask of (absolute query position, key position) pairs."""
  if not pat.causal:
    return np.ones(np.broadcast_shapes(t_abs.shape, s.shape), bool)
  r = t_abs - s
  return (r >= 0) & ((r < window) | (s < pat.sink))


def _group_tiles(pat: Pattern, window: int, h_lo: int, h_hi: int):
  """The tiles of heads [h_lo, h_hi), all of window `window`: every query
  chunk, for each run of heads whose largest tile fits `pat.tile_elements`."""
  size = chunk_size(window, pat.seq_q, pat.block)
  chunks = []
  for q_lo in range(0, pat.seq_q, size):
    q_hi = min(pat.seq_q, q_lo + size)
    keys = _key_ranges(pat, q_lo, q_hi, window)
    if not keys:
      continue
    s = np.concatenate([np.arange(lo, hi) for lo, hi in keys])
    t_abs = np.arange(q_lo, q_hi)[:, None] + pat.offset
    allowed = _allowed(pat, t_abs, s[None], window)
    chunks.append((q_lo, q_hi, keys, not allowed.all(),
                   not allowed.any(-1).all(), allowed.size))
  if not chunks:
    return []
  step = max(1, pat.tile_elements // max(c[-1] for c in chunks))
  return [_Tile(lo, min(h_hi, lo + step), q_lo, q_hi, keys, window, masked,
                empty)
          for lo in range(h_lo, h_hi, step)
          for q_lo, q_hi, keys, masked, empty, _ in chunks]


@functools.lru_cache(maxsize=64)
def _tiles(pat: Pattern) -> tuple[_Tile, ...]:
  tiles, heads = [], len(pat.windows)
  h_lo = 0
  while h_lo < heads:
    window = pat.windows[h_lo]
    h_hi = h_lo + sum(1 for w in pat.windows[h_lo:] if w == window)
    tiles += _group_tiles(pat, window, h_lo, h_hi)
    h_lo = h_hi
  return tuple(tiles)


def visited_pairs(pat: Pattern) -> int:
  """(query, key) score entries the tiles compute, summed over heads."""
  return sum((t.h_hi - t.h_lo) * (t.q_hi - t.q_lo)
             * sum(hi - lo for lo, hi in t.keys) for t in _tiles(pat))


def _after(token, *xs):
  """`xs`, made to depend on the scalar `token` (None: unchanged).

  The tile that produced `token` must then finish before these inputs of the
  next tile exist, so XLA runs tiles one at a time and reuses one tile's
  buffers (see the module docstring). `lax.optimization_barrier` would say
  this, but XLA:CPU removes it before scheduling. The added term is exactly
  0 (0 times a 0/1 flag, never NaN), and XLA does not fold float products
  with 0 away; `test_blocked_tiles_run_one_at_a_time` checks that it holds.
  """
  if token is None:
    return xs
  zero = 0.0 * jnp.isnan(token).astype(jnp.float32)
  return tuple(x + zero for x in xs)


def _tile_rows(tile: _Tile, x):
  """Query rows of a tile: [B, h, q, ...]."""
  return x[:, tile.h_lo:tile.h_hi, tile.q_lo:tile.q_hi]


def _tile_kv(tile: _Tile, x):
  """Keys or values of a tile: [B, h, keys, D]."""
  parts = [x[:, tile.h_lo:tile.h_hi, lo:hi] for lo, hi in tile.keys]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)


def _tile_scores(pat: Pattern, tile: _Tile, q_tile, k_tile):
  s = jnp.einsum("bhqd,bhkd->bhqk", q_tile, k_tile)
  if not tile.masked:
    return s
  t_abs = (jnp.arange(tile.q_lo, tile.q_hi) + pat.offset)[:, None]
  keys = jnp.concatenate([jnp.arange(lo, hi) for lo, hi in tile.keys])[None]
  return jnp.where(_allowed(pat, t_abs, keys, tile.window)[None, None], s,
                   -jnp.inf)


def _assemble(pat: Pattern, parts, fill, batch: int, trailing: tuple):
  """Per-tile [B, h, q, ...] results -> [B, H, seq_q, ...]; rows of no tile
  get `fill`."""
  by_group = {}
  for tile, part in parts:
    by_group.setdefault((tile.h_lo, tile.h_hi), []).append((tile, part))
  groups, h_lo = [], 0
  for (lo, hi), items in sorted(by_group.items()):
    if lo > h_lo:
      groups.append(jnp.full((batch, lo - h_lo, pat.seq_q) + trailing, fill))
    rows, t = [], 0
    for tile, part in items:
      if tile.q_lo > t:
        rows.append(jnp.full((batch, hi - lo, tile.q_lo - t) + trailing, fill))
      rows.append(part)
      t = tile.q_hi
    if t < pat.seq_q:
      rows.append(jnp.full((batch, hi - lo, pat.seq_q - t) + trailing, fill))
    groups.append(jnp.concatenate(rows, axis=2))
    h_lo = hi
  if h_lo < len(pat.windows):
    groups.append(jnp.full((batch, len(pat.windows) - h_lo, pat.seq_q)
                           + trailing, fill))
  return jnp.concatenate(groups, axis=1)


def _tile_softmax(tile: _Tile, s):
  """Unnormalised probabilities, row sums and log-sum-exp of a tile's scores.

  Rows with no key (only where `tile.empty_rows`) get p = 0, sum 1, lse +inf.
  Other tiles skip those guards, so XLA fuses max, subtract and exp.
  """
  m = s.max(-1)
  if tile.empty_rows:
    m = jnp.where(m == -jnp.inf, 0.0, m)
  p = jnp.exp(s - m[..., None])
  row_sum = p.sum(-1)
  if not tile.empty_rows:
    return p, row_sum, m + jnp.log(row_sum)
  empty = row_sum == 0.0
  row_sum = jnp.where(empty, 1.0, row_sum)
  return p, row_sum, jnp.where(empty, jnp.inf, m + jnp.log(row_sum))


def _forward(pat: Pattern, q, k, v):
  """Returns (out [B, H, T, Dv], lse [B, H, T]); rows with no key: 0, +inf."""
  outs, lses, token = [], [], None
  for tile in _tiles(pat):
    q_tile, k_tile, v_tile = _after(token, _tile_rows(tile, q),
                                    _tile_kv(tile, k), _tile_kv(tile, v))
    p, row_sum, lse = _tile_softmax(tile, _tile_scores(pat, tile, q_tile,
                                                       k_tile))
    o = jnp.einsum("bhqk,bhkd->bhqd", p, v_tile) / row_sum[..., None]
    outs.append((tile, o))
    lses.append((tile, lse))
    token = o[0, 0, 0, 0]
  batch = q.shape[0]
  return (_assemble(pat, outs, 0.0, batch, (v.shape[-1],)),
          _assemble(pat, lses, jnp.inf, batch, ()))


def _backward(pat: Pattern, q, k, v, out, lse, dout):
  delta = jnp.sum(dout * out, axis=-1)
  dqs, token = [], None
  dk, dv = jnp.zeros_like(k), jnp.zeros_like(v)
  for tile in _tiles(pat):
    q_tile, do, k_tile, v_tile = _after(
        token, _tile_rows(tile, q), _tile_rows(tile, dout), _tile_kv(tile, k),
        _tile_kv(tile, v))
    s = _tile_scores(pat, tile, q_tile, k_tile)
    p = jnp.exp(s - _tile_rows(tile, lse)[..., None])
    dp = jnp.einsum("bhqd,bhkd->bhqk", do, v_tile)
    ds = p * (dp - _tile_rows(tile, delta)[..., None])
    dqs.append((tile, jnp.einsum("bhqk,bhkd->bhqd", ds, k_tile)))
    dk_tile = jnp.einsum("bhqk,bhqd->bhkd", ds, q_tile)
    dv_tile = jnp.einsum("bhqk,bhqd->bhkd", p, do)
    token = dk_tile[0, 0, 0, 0] + dv_tile[0, 0, 0, 0]
    start = 0
    for lo, hi in tile.keys:
      keys = (slice(None), slice(tile.h_lo, tile.h_hi), slice(lo, hi))
      dk = dk.at[keys].add(dk_tile[:, :, start:start + hi - lo])
      dv = dv.at[keys].add(dv_tile[:, :, start:start + hi - lo])
      start += hi - lo
  dq = _assemble(pat, dqs, 0.0, q.shape[0], (q.shape[-1],))
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(pat: Pattern, q, k, v):
  return _forward(pat, q, k, v)[0]


def _core_fwd(pat, q, k, v):
  out, lse = _forward(pat, q, k, v)
  return out, (q, k, v, out, lse)


def _core_bwd(pat, res, dout):
  return _backward(pat, *res, dout)


_core.defvjp(_core_fwd, _core_bwd)


def make_pattern(seq_q: int, seq_k: int, *, windows, sink: int, causal: bool,
                 offset: int, block: int, tile_elements: int | None = None
                 ) -> Pattern:
  """The `Pattern`; `tile_elements` defaults to `TILE_ELEMENTS`."""
  return Pattern(block, seq_q, seq_k, offset, causal,
                 tuple(int(w) for w in windows), min(sink, seq_k),
                 TILE_ELEMENTS if tile_elements is None else tile_elements)


def blocked_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxDv, *, windows, sink: int,
                      causal: bool, offset: int, block: int,
                      tile_elements: int | None = None):
  """Tiled attention over heads already sorted by decreasing window.

  Args:
    q_BxTxHxD: queries, already multiplied by the softmax scale, fp32.
    k_BxSxHxD: keys with one head per query head (GQA already expanded), fp32.
    v_BxSxHxDv: values, like keys, fp32.
    windows: concrete ints per head, non-increasing (causal only).
    sink: number of leading keys every query sees (causal only).
    causal: whether query t (absolute t + offset) sees only keys s <= t.
    offset: absolute position of query 0 (S - T for bottom-right alignment).
    block: smallest query chunk (see `chunk_size`).
    tile_elements: largest score tile summed over its heads (default
      `TILE_ELEMENTS`).

  Returns:
    [B, T, H, Dv] fp32.
  """
  pat = make_pattern(q_BxTxHxD.shape[1], k_BxSxHxD.shape[1], windows=windows,
                     sink=sink, causal=causal, offset=offset, block=block,
                     tile_elements=tile_elements)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out = _core(pat, heads_first(q_BxTxHxD), heads_first(k_BxSxHxD),
              heads_first(v_BxSxHxDv))
  return heads_first(out)
