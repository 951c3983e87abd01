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
wider one) and memory to a few tiles, O(C T) for a dense head. The backward
pass recomputes each tile's probabilities from the saved log-sum-exp
(FlashAttention, Dao et al., 2022).

Two schedules (`docs/moa.md` has the measurements behind both):

- Static tiles run one after another (`_after`): left independent, XLA:CPU's
  concurrency-optimised scheduler starts them all at once and keeps every
  tile's scores alive (0.4 GiB for 8 dense heads at T = 4096, page-faulted
  afresh on every call).
- Where one head's tile is small (under `LOOP_BELOW` scores: narrow
  windows), a run of chunks whose tiles are the previous ones shifted by C
  (the band inside the sequence: same shape, same mask) becomes one
  `lax.fori_loop` (`_Loop`). Each iteration computes about `Pattern.lanes`
  independent tiles (chunks x head splits), which XLA runs concurrently: a
  128-row band tile is too small a matmul to keep two cores busy, several
  side by side are not. The loop also compiles one iteration instead of
  one program piece per chunk. Wider tiles stay static: there, in loops,
  measured slower.
"""

import functools
import math
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Largest score tile, in elements summed over the tile's heads (256 KiB
# fp32): a group's heads share a tile while their scores fit.
TILE_ELEMENTS = 2**16
# Independent tiles per loop iteration (chunks x head splits).
LANES = 8
# One head's chunk tile below this many scores (a 128 x 1024 matmul) is too
# small to keep two cores busy: runs of such chunks go into loops.
LOOP_BELOW = 2**17


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
  lanes: int


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


class _Loop(NamedTuple):
  """`tiles` (at their first-iteration positions) computed `steps` times,
  iteration i shifted by i * `stride` queries and non-sink keys."""

  tiles: tuple[_Tile, ...]
  steps: int
  stride: int


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


def _shift(pat: Pattern, key_range, d):
  """A key range moved with its chunk by `d` queries (sink ranges stay)."""
  lo, hi = key_range
  return (lo, hi) if lo < pat.sink else (lo + d, hi + d)


def _allowed(pat: Pattern, t_abs, s, window):
  """Bool mask of (absolute query position, key position) pairs."""
  if not pat.causal:
    return np.ones(np.broadcast_shapes(t_abs.shape, s.shape), bool)
  r = t_abs - s
  return (r >= 0) & ((r < window) | (s < pat.sink))


def _chunks(pat: Pattern, window: int):
  """_Tile fields past the heads of every query chunk, and its area."""
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
    chunks.append(
      (
        (
          q_lo,
          q_hi,
          keys,
          window,
          not allowed.all(),
          not allowed.any(-1).all(),
        ),
        allowed.size,
      )
    )
  return chunks


def _follows(pat: Pattern, prev, chunk) -> bool:
  """Whether `chunk` is `prev` shifted by one chunk (same shape and mask)."""
  (q_lo, q_hi, keys, *flags), (n_lo, n_hi, n_keys, *n_flags) = prev, chunk
  d = q_hi - q_lo
  return (n_lo, n_hi, n_flags) == (q_lo + d, q_hi + d, flags) and (
    n_keys == tuple(_shift(pat, r, d) for r in keys)
  )


def _group_plan(pat: Pattern, window: int, h_lo: int, h_hi: int):
  """Tiles and loops of heads [h_lo, h_hi), all of window `window`.

  Heads are split so that a tile holds at most `pat.tile_elements` scores.
  Where one head's tile is smaller than `LOOP_BELOW` (narrow windows), each
  maximal run of chunks that follow one another becomes a `_Loop` of
  `ceil(lanes / head splits)` chunks per iteration when it fills two
  iterations; the rest are static tiles.
  """
  chunks = _chunks(pat, window)
  if not chunks:
    return []
  largest = max(area for _, area in chunks)
  step = max(1, pat.tile_elements // largest)
  heads = [(lo, min(h_hi, lo + step)) for lo in range(h_lo, h_hi, step)]
  per_step = math.ceil(pat.lanes / len(heads))
  tiles = lambda run: [_Tile(lo, hi, *c) for c in run for lo, hi in heads]
  plan, start = [], 0
  for end in range(1, len(chunks) + 1):
    if end < len(chunks) and _follows(pat, chunks[end - 1][0], chunks[end][0]):
      continue
    run = [c for c, _ in chunks[start:end]]
    steps = len(run) // per_step
    if steps >= 2 and largest < LOOP_BELOW:
      plan.append(
        _Loop(
          tuple(tiles(run[:per_step])),
          steps,
          per_step * (run[0][1] - run[0][0]),
        )
      )
      run = run[steps * per_step :]
    plan += tiles(run)
    start = end
  return plan


@functools.lru_cache(maxsize=64)
def _plan(pat: Pattern) -> tuple[_Tile | _Loop, ...]:
  plan, heads = [], len(pat.windows)
  h_lo = 0
  while h_lo < heads:
    window = pat.windows[h_lo]
    h_hi = h_lo + sum(1 for w in pat.windows[h_lo:] if w == window)
    plan += _group_plan(pat, window, h_lo, h_hi)
    h_lo = h_hi
  return tuple(plan)


def visited_pairs(pat: Pattern) -> int:
  """(query, key) score entries the tiles compute, summed over heads."""
  area = lambda t: (
    (t.h_hi - t.h_lo) * (t.q_hi - t.q_lo) * sum(hi - lo for lo, hi in t.keys)
  )
  return sum(
    sum(map(area, item.tiles)) * item.steps
    if isinstance(item, _Loop)
    else area(item)
    for item in _plan(pat)
  )


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


def _part(x, heads, start, size: int):
  """Heads [heads) and positions [start, start + size) of a [B, H, T, ...]
  `x`; `start` may be traced."""
  starts, sizes = [0] * x.ndim, list(x.shape)
  starts[1], sizes[1] = heads[0], heads[1] - heads[0]
  starts[2], sizes[2] = start, size
  return lax.dynamic_slice(x, starts, sizes)


def _tile_rows(tile: _Tile, d, x):
  """Query rows of a tile shifted by `d` (an int or a traced scalar):
  [B, h, q, ...]."""
  return _part(x, (tile.h_lo, tile.h_hi), tile.q_lo + d, tile.q_hi - tile.q_lo)


def _put_rows(tile: _Tile, d, x, rows):
  """[B, H, T, ...] `x` with the tile's query rows (shifted by `d`) set."""
  start = (0, tile.h_lo, tile.q_lo + d) + (0,) * (x.ndim - 3)
  return lax.dynamic_update_slice(x, rows, start)


def _tile_kv(pat: Pattern, tile: _Tile, d, x_BHSD):
  """Keys or values of a tile shifted by `d`: [B, h, keys, D]."""
  parts = [
    _part(x_BHSD, (tile.h_lo, tile.h_hi), _shift(pat, r, d)[0], r[1] - r[0])
    for r in tile.keys
  ]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)


def _add_kv(pat: Pattern, tile: _Tile, d, x_BHSD, grad):
  """`x_BHSD` plus a tile's key gradient [B, h, keys, D] at its keys."""
  start = 0
  for r in tile.keys:
    size = r[1] - r[0]
    at = (0, tile.h_lo, _shift(pat, r, d)[0], 0)
    part = _part(x_BHSD, (tile.h_lo, tile.h_hi), at[2], size)
    x_BHSD = lax.dynamic_update_slice(
      x_BHSD, part + lax.slice_in_dim(grad, start, start + size, axis=2), at
    )
    start += size
  return x_BHSD


def _tile_scores(pat: Pattern, tile: _Tile, d, q_tile, k_tile):
  s = jnp.einsum("bhqd,bhkd->bhqk", q_tile, k_tile)
  if not tile.masked:
    return s
  t_abs = (jnp.arange(tile.q_lo, tile.q_hi) + pat.offset + d)[:, None]
  keys = jnp.concatenate(
    [jnp.arange(hi - lo) + _shift(pat, (lo, hi), d)[0] for lo, hi in tile.keys]
  )[None]
  return jnp.where(
    _allowed(pat, t_abs, keys, tile.window)[None, None], s, -jnp.inf
  )


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


def _assemble(pat: Pattern, parts, fill, batch: int, trailing: tuple):
  """Per-tile [B, h, q, ...] results -> [B, H, seq_q, ...]; rows of no tile
  get `fill`. (Concatenation: writing static tiles into one buffer with
  dynamic-update-slice made XLA:CPU copy the buffer per tile.)"""
  by_group = {}
  for tile, part in parts:
    by_group.setdefault((tile.h_lo, tile.h_hi), []).append((tile, part))
  full = lambda heads, rows: jnp.full((batch, heads, rows) + trailing, fill)
  groups, h_lo = [], 0
  for (lo, hi), items in sorted(by_group.items()):
    if lo > h_lo:
      groups.append(full(lo - h_lo, pat.seq_q))
    rows, t = [], 0
    for tile, part in items:
      if tile.q_lo > t:
        rows.append(full(hi - lo, tile.q_lo - t))
      rows.append(part)
      t = tile.q_hi
    if t < pat.seq_q:
      rows.append(full(hi - lo, pat.seq_q - t))
    groups.append(jnp.concatenate(rows, axis=2))
    h_lo = hi
  if h_lo < len(pat.windows):
    groups.append(full(len(pat.windows) - h_lo, pat.seq_q))
  return jnp.concatenate(groups, axis=1)


def _loops(pat: Pattern, tile_step, carry):
  """Runs every `_Loop` of the plan: `tile_step(tile, d, carry) -> carry`
  for each of its tiles, d = iteration * stride (traced)."""
  for item in _plan(pat):
    if isinstance(item, _Loop):

      def body(i, carry, item=item):
        for tile in item.tiles:
          carry = tile_step(tile, i * item.stride, carry)
        return carry

      carry = lax.fori_loop(0, item.steps, body, carry)
  return carry


def _static_tiles(pat: Pattern):
  return [item for item in _plan(pat) if isinstance(item, _Tile)]


def _forward(pat: Pattern, q, k, v):
  """[B, H, T, D] q and [B, H, S, D] k, v -> (out [B, H, T, Dv],
  lse [B, H, T]); rows with no key: 0, +inf."""

  def tile_forward(tile, d, token):
    q_tile, k_tile, v_tile = _after(
      token,
      _tile_rows(tile, d, q),
      _tile_kv(pat, tile, d, k),
      _tile_kv(pat, tile, d, v),
    )
    p, row_sum, lse = _tile_softmax(
      tile, _tile_scores(pat, tile, d, q_tile, k_tile)
    )
    return jnp.einsum("bhqk,bhkd->bhqd", p, v_tile) / row_sum[..., None], lse

  outs, lses, token = [], [], None
  for tile in _static_tiles(pat):
    o, lse = tile_forward(tile, 0, token)
    outs.append((tile, o))
    lses.append((tile, lse))
    token = o[0, 0, 0, 0]
  batch = q.shape[0]
  out = _assemble(pat, outs, 0.0, batch, (v.shape[-1],))
  lse = _assemble(pat, lses, jnp.inf, batch, ())

  def loop_step(tile, d, carry):
    o, lse = tile_forward(tile, d, None)
    return _put_rows(tile, d, carry[0], o), _put_rows(tile, d, carry[1], lse)

  return _loops(pat, loop_step, (out, lse))


def _backward(pat: Pattern, q, k, v, out, lse, dout):
  """Gradients of `_core` (layouts as there; out and lse as `_forward`)."""
  delta = jnp.sum(dout * out, axis=-1)  # [B, H, T]

  def tile_backward(tile, d, token):
    q_tile, do, k_tile, v_tile = _after(
      token,
      _tile_rows(tile, d, q),
      _tile_rows(tile, d, dout),
      _tile_kv(pat, tile, d, k),
      _tile_kv(pat, tile, d, v),
    )
    s = _tile_scores(pat, tile, d, q_tile, k_tile)
    p = jnp.exp(s - _tile_rows(tile, d, lse)[..., None])
    dp = jnp.einsum("bhqd,bhkd->bhqk", do, v_tile)
    ds = p * (dp - _tile_rows(tile, d, delta)[..., None])
    return (
      jnp.einsum("bhqk,bhkd->bhqd", ds, k_tile),
      jnp.einsum("bhqk,bhqd->bhkd", ds, q_tile),
      jnp.einsum("bhqk,bhqd->bhkd", p, do),
    )

  dqs, token = [], None
  dk, dv = jnp.zeros_like(k), jnp.zeros_like(v)
  for tile in _static_tiles(pat):
    dq_tile, dk_tile, dv_tile = tile_backward(tile, 0, token)
    dqs.append((tile, dq_tile))
    dk, dv = (
      _add_kv(pat, tile, 0, dk, dk_tile),
      _add_kv(pat, tile, 0, dv, dv_tile),
    )
    token = dk_tile[0, 0, 0, 0] + dv_tile[0, 0, 0, 0]
  dq = _assemble(pat, dqs, 0.0, q.shape[0], (q.shape[-1],))

  def loop_step(tile, d, carry):
    dq, dk, dv = carry
    dq_tile, dk_tile, dv_tile = tile_backward(tile, d, None)
    return (
      _put_rows(tile, d, dq, dq_tile),
      _add_kv(pat, tile, d, dk, dk_tile),
      _add_kv(pat, tile, d, dv, dv_tile),
    )

  return _loops(pat, loop_step, (dq, dk, dv))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(pat: Pattern, q, k, v):
  """[B, H, T, D] q, [B, H, S, D] k, v -> [B, H, T, Dv]."""
  return _forward(pat, q, k, v)[0]


def _core_fwd(pat, q, k, v):
  out, lse = _forward(pat, q, k, v)
  return out, (q, k, v, out, lse)


def _core_bwd(pat, res, dout):
  return _backward(pat, *res, dout)


_core.defvjp(_core_fwd, _core_bwd)


def make_pattern(
  seq_q: int,
  seq_k: int,
  *,
  windows,
  sink: int,
  causal: bool,
  offset: int,
  block: int,
  tile_elements: int | None = None,
  lanes: int | None = None,
) -> Pattern:
  """The `Pattern`; `tile_elements` and `lanes` default to `TILE_ELEMENTS`
  and `LANES`."""
  return Pattern(
    block,
    seq_q,
    seq_k,
    offset,
    causal,
    tuple(int(w) for w in windows),
    min(sink, seq_k),
    TILE_ELEMENTS if tile_elements is None else tile_elements,
    LANES if lanes is None else lanes,
  )


def blocked_attention(
  q_BxTxHxD,
  k_BxSxHxD,
  v_BxSxHxDv,
  *,
  windows,
  sink: int,
  causal: bool,
  offset: int,
  block: int,
  tile_elements: int | None = None,
  lanes: int | None = None,
):
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
    lanes: independent tiles per loop iteration (default `LANES`).

  Returns:
    [B, T, H, Dv] fp32.
  """
  pat = make_pattern(
    q_BxTxHxD.shape[1],
    k_BxSxHxD.shape[1],
    windows=windows,
    sink=sink,
    causal=causal,
    offset=offset,
    block=block,
    tile_elements=tile_elements,
    lanes=lanes,
  )
  heads_first = lambda x: x.swapaxes(1, 2)
  return heads_first(
    _core(
      pat,
      heads_first(q_BxTxHxD),
      heads_first(k_BxSxHxD),
      heads_first(v_BxSxHxDv),
    )
  )
