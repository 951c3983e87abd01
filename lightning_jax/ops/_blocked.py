"""Block-diagonal flash attention core shared by `attention` and `moa_attention`.

Queries and keys are cut into blocks of `block` positions. The mask of every
pattern used here depends only on the relative position r = t + offset - s
(plus, for sinks, on s), so the block pair (query block i, key block i - d)
has the same mask for every i: the work is organised by block diagonals d.
Each diagonal is one step with static slices (query blocks [i_lo, i_hi) of
the heads whose band reaches d), so blocks outside every band are never
touched, compute is proportional to the visited blocks and memory to one
diagonal, O(T * block). Heads are sorted by window (widest first) so that the
heads visiting a diagonal are always a prefix: a narrow head never pays for a
wide one. Online softmax (Dao et al., 2022, FlashAttention) combines the
steps; the backward pass recomputes the scores from the saved log-sum-exp.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Pattern(NamedTuple):
  """Static description of which (query, key) pairs attend.

  Query t (absolute position t + offset) attends key s iff
  causal: 0 <= r < windows[h] or (s < sink and r >= 0), r = t + offset - s;
  not causal: s < seq_k (every real key).
  `windows` must be sorted in decreasing order (heads pre-permuted).
  """
  block: int
  n_q: int  # query blocks (queries padded to n_q * block)
  n_k: int  # key blocks
  seq_q: int
  seq_k: int
  offset: int
  causal: bool
  windows: tuple[int, ...]
  sink: int


class _Step(NamedTuple):
  """One visit: query blocks [i_lo, i_hi) of heads [h_lo, h_hi) against key
  blocks [i_lo - d, i_hi - d) (band step) or key block `sink_block` (sink step).
  """
  h_lo: int
  h_hi: int
  i_lo: int
  i_hi: int
  d: int
  sink_block: int | None
  mask: np.ndarray | None  # broadcastable to [1, h, n_i, block, block]


def _band_steps(pat: Pattern) -> list[_Step]:
  b, off = pat.block, pat.offset
  qi = np.arange(b)[:, None]
  ki = np.arange(b)[None, :]
  if not pat.causal:
    d_lo, d_hi = -(pat.n_k - 1), pat.n_q - 1
    d_max = [d_hi] * len(pat.windows)
  else:
    # Smallest d with some r = d*b + off + qi - ki >= 0; largest with r < w.
    d_lo = -((off + b - 1) // b)
    d_max = [min((w - 2 + b - off) // b, pat.n_q - 1) for w in pat.windows]
    d_hi = max(d_max)
  steps = []
  for d in range(max(d_lo, -(pat.n_k - 1)), d_hi + 1):
    i_lo, i_hi = max(0, d), min(pat.n_q, pat.n_k + d)
    h_hi = sum(dm >= d for dm in d_max)
    if i_lo >= i_hi or h_hi == 0:
      continue
    mask = None
    if pat.causal:
      r = d * b + off + qi - ki
      w = np.array(pat.windows[:h_hi])[:, None, None]
      allowed = (r >= 0) & (r < w)
      if not allowed.all():
        mask = allowed[None, :, None]
    elif pat.seq_k % b and i_hi - d == pat.n_k:  # padded keys in this slice
      s = (np.arange(i_lo, i_hi) - d)[:, None, None] * b + ki
      mask = (s < pat.seq_k)[None, None]
    steps.append(_Step(0, h_hi, i_lo, i_hi, d, None, mask))
  return steps


def _sink_steps(pat: Pattern) -> list[_Step]:
  """Sink key blocks for the heads whose band does not already cover them."""
  if not pat.causal or pat.sink == 0:
    return []
  b, off = pat.block, pat.offset
  steps = []
  for c in range(-(-pat.sink // b)):
    r_max = pat.seq_q - 1 + off - c * b  # largest r of a real query here
    h_lo = sum(w > r_max for w in pat.windows)
    if h_lo == len(pat.windows):
      continue
    w_min = pat.windows[-1]
    i_lo = max(0, -(-(w_min + c * b - off - b + 1) // b))
    if i_lo >= pat.n_q:
      continue
    steps.append(_Step(h_lo, len(pat.windows), i_lo, pat.n_q, 0, c, None))
  return steps


@functools.lru_cache(maxsize=64)
def _steps(pat: Pattern) -> tuple[_Step, ...]:
  return tuple(_band_steps(pat) + _sink_steps(pat))


def _sink_mask(pat: Pattern, step: _Step) -> jax.Array:
  """[1, h, n_i, b, b]: sink keys outside the head's band (built by iota)."""
  b = pat.block
  t = (jnp.arange(step.i_lo, step.i_hi)[:, None, None] * b
       + jnp.arange(b)[None, :, None] + pat.offset)
  s = step.sink_block * b + jnp.arange(b)[None, None, :]
  w = jnp.asarray(pat.windows[step.h_lo:step.h_hi])[:, None, None, None]
  return ((s < pat.sink)[None] & ((t - s)[None] >= w))[None]


def _slices(pat: Pattern, step: _Step, q, k, v):
  """Query and key/value tiles of one step: [B, h, n_i, b, D] (keys of a
  sink step: [B, h, b, D], shared by all query blocks)."""
  hs = slice(step.h_lo, step.h_hi)
  qs = q[:, hs, step.i_lo:step.i_hi]
  if step.sink_block is None:
    ks_ = slice(step.i_lo - step.d, step.i_hi - step.d)
    return qs, k[:, hs, ks_], v[:, hs, ks_]
  return qs, k[:, hs, step.sink_block], v[:, hs, step.sink_block]


def _scores(pat: Pattern, step: _Step, qs, ks):
  if step.sink_block is None:
    s = jnp.einsum("bhnqd,bhnkd->bhnqk", qs, ks)
    mask = step.mask
  else:
    s = jnp.einsum("bhnqd,bhkd->bhnqk", qs, ks)
    mask = _sink_mask(pat, step)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  return s


def _forward(pat: Pattern, q, k, v):
  """Returns (out [B,H,nq,b,Dv], lse [B,H,nq,b]); rows with no key: 0, +inf."""
  batch, heads = q.shape[:2]
  m = jnp.full((batch, heads, pat.n_q, pat.block), -jnp.inf, jnp.float32)
  row_sum = jnp.zeros_like(m)
  acc = jnp.zeros((batch, heads, pat.n_q, pat.block, v.shape[-1]), jnp.float32)
  for step in _steps(pat):
    qs, ks, vs = _slices(pat, step, q, k, v)
    s = _scores(pat, step, qs, ks)
    idx = (slice(None), slice(step.h_lo, step.h_hi),
           slice(step.i_lo, step.i_hi))
    m_old = m[idx]
    m_new = jnp.maximum(m_old, s.max(-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    corr = jnp.exp(m_old - m_safe)
    pv = (jnp.einsum("bhnqk,bhnkd->bhnqd", p, vs) if step.sink_block is None
          else jnp.einsum("bhnqk,bhkd->bhnqd", p, vs))
    m = m.at[idx].set(m_new)
    row_sum = row_sum.at[idx].set(corr * row_sum[idx] + p.sum(-1))
    acc = acc.at[idx].set(corr[..., None] * acc[idx] + pv)
  empty = row_sum == 0.0
  out = acc / jnp.where(empty, 1.0, row_sum)[..., None]
  lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, row_sum)))
  return out, lse


def _backward(pat: Pattern, q, k, v, out, lse, dout):
  delta = jnp.sum(dout * out, axis=-1)
  dq, dk, dv = jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
  for step in _steps(pat):
    qs, ks, vs = _slices(pat, step, q, k, v)
    idx = (slice(None), slice(step.h_lo, step.h_hi),
           slice(step.i_lo, step.i_hi))
    p = jnp.exp(_scores(pat, step, qs, ks) - lse[idx][..., None])
    do = dout[idx]
    if step.sink_block is None:
      kidx = (idx[0], idx[1], slice(step.i_lo - step.d, step.i_hi - step.d))
      dp = jnp.einsum("bhnqd,bhnkd->bhnqk", do, vs)
      ds = p * (dp - delta[idx][..., None])
      dv = dv.at[kidx].add(jnp.einsum("bhnqk,bhnqd->bhnkd", p, do))
      dk = dk.at[kidx].add(jnp.einsum("bhnqk,bhnqd->bhnkd", ds, qs))
      dq = dq.at[idx].add(jnp.einsum("bhnqk,bhnkd->bhnqd", ds, ks))
    else:
      kidx = (idx[0], idx[1], step.sink_block)
      dp = jnp.einsum("bhnqd,bhkd->bhnqk", do, vs)
      ds = p * (dp - delta[idx][..., None])
      dv = dv.at[kidx].add(jnp.einsum("bhnqk,bhnqd->bhkd", p, do))
      dk = dk.at[kidx].add(jnp.einsum("bhnqk,bhnqd->bhkd", ds, qs))
      dq = dq.at[idx].add(jnp.einsum("bhnqk,bhkd->bhnqd", ds, ks))
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


def _to_blocks(x_BxTxHxD, n_blocks: int, block: int):
  """[B, T, H, D] -> [B, H, n_blocks, block, D] (zero padded)."""
  batch, seq, heads, dim = x_BxTxHxD.shape
  x = jnp.pad(x_BxTxHxD, ((0, 0), (0, n_blocks * block - seq), (0, 0), (0, 0)))
  return x.reshape(batch, n_blocks, block, heads, dim).transpose(0, 3, 1, 2, 4)


def blocked_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxDv, *, windows, sink: int,
                      causal: bool, offset: int, block: int):
  """Blocked attention over heads already sorted by decreasing window.

  Args:
    q_BxTxHxD: queries, already multiplied by the softmax scale, fp32.
    k_BxSxHxD: keys with one head per query head (GQA already expanded), fp32.
    v_BxSxHxDv: values, like keys, fp32.
    windows: concrete ints per head, non-increasing (causal only).
    sink: number of leading keys every query sees (causal only).
    causal: whether query t (absolute t + offset) sees only keys s <= t.
    offset: absolute position of query 0 (S - T for bottom-right alignment).
    block: block size.

  Returns:
    [B, T, H, Dv] fp32.
  """
  batch, seq_q, heads, _ = q_BxTxHxD.shape
  seq_k = k_BxSxHxD.shape[1]
  n_q, n_k = -(-seq_q // block), -(-seq_k // block)
  pat = Pattern(block, n_q, n_k, seq_q, seq_k, offset, causal,
                tuple(int(w) for w in windows), min(sink, seq_k))
  out = _core(pat, _to_blocks(q_BxTxHxD, n_q, block),
              _to_blocks(k_BxSxHxD, n_k, block),
              _to_blocks(v_BxSxHxDv, n_k, block))
  out = out.transpose(0, 2, 3, 1, 4).reshape(batch, n_q * block, heads, -1)
  return out[:, :seq_q]
