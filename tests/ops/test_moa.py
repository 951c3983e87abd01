"""MoA attention: blocked == dense masked reference; windows, density, plans."""

import functools
import json

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import ops
from lightning_jax.ops import _blocked

# fp32: both impls accumulate in fp32; differences are reassociation only.
F32_TOL = dict(atol=2e-5, rtol=2e-5)
# bf16 inputs vs the fp32 reference on the same rounded inputs: bf16 output
# rounding (2^-8 relative) dominates.
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


@functools.partial(jax.jit, static_argnames=("window", "sink", "impl"))
def _value_and_vjp(q, k, v, dout, *, window, sink, impl):
  fn = lambda q, k, v: ops.moa_attention(
    q, k, v, list(window), sink=sink, block_size=8, impl=impl
  )
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(dout)


@functools.partial(jax.jit, static_argnames=("window", "sink"))
def _blocked_and_dense(q, k, v, dout, *, window, sink):
  """Both impls in one program (one compilation per test example)."""
  return [
    _value_and_vjp(q, k, v, dout, window=window, sink=sink, impl=impl)
    for impl in ("blocked", "dense")
  ]


def _inputs(seed, seq, heads, kv_heads, dtype=jnp.float32, seq_k=None):
  rng = np.random.default_rng(seed)  # numpy: no compilation per shape
  seq_k = seq if seq_k is None else seq_k
  shapes = [
    (2, seq, heads, 8),
    (2, seq_k, kv_heads, 8),
    (2, seq_k, kv_heads, 6),
    (2, seq, heads, 6),
  ]
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


@st.composite
def _configs(draw):
  seq = draw(st.integers(1, 30))  # block 8: up to 4 blocks, partial last
  kv_heads = draw(st.sampled_from([1, 2]))
  heads = kv_heads * draw(st.sampled_from([1, 2]))
  # Windows of 1, inside the sequence, and >= seq (dense heads).
  window = tuple(
    draw(
      st.lists(
        st.one_of(st.just(1), st.integers(1, seq + 4)),
        min_size=heads,
        max_size=heads,
      )
    )
  )
  sink = draw(st.sampled_from([0, 1, 3, 9]))
  return seq, heads, kv_heads, window, sink


@hypothesis.given(
  config=_configs(),
  keys_before=st.sampled_from([0, 0, 5, 12]),
  seed=st.integers(0, 2**16),
)
def test_blocked_matches_dense(config, keys_before, seed):
  """Also with keys before the queries (bottom-right alignment)."""
  seq, heads, kv_heads, window, sink = config
  args = _inputs(seed, seq, heads, kv_heads, seq_k=seq + keys_before)
  (got, got_grads), (want, want_grads) = _blocked_and_dense(
    *args, window=window, sink=sink
  )
  np.testing.assert_allclose(got, want, **F32_TOL)
  for g, w in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, w, **F32_TOL)


@functools.partial(
  jax.jit, static_argnames=("window", "sink", "tile_elements", "lanes")
)
def _split_tiles_and_dense(
  q, k, v, dout, *, window, sink, tile_elements, lanes
):
  """The kernel with tiles of at most `tile_elements` scores and `lanes`
  tiles per loop iteration vs the dense impl (windows sorted, one kv head
  per q head, as `moa_attention` passes)."""
  blocked = lambda q, k, v: _blocked.blocked_attention(
    q,
    k,
    v,
    windows=window,
    sink=sink,
    causal=True,
    offset=0,
    block=8,
    tile_elements=tile_elements,
    lanes=lanes,
  )
  dense = lambda q, k, v: ops.moa_attention(
    q, k, v, list(window), sink=sink, scale=1.0, impl="dense"
  )
  return [
    (lambda out, vjp: (out, vjp(dout)))(*jax.vjp(fn, q, k, v))
    for fn in (blocked, dense)
  ]


def _assert_split_tiles_match_dense(
  seq, heads, window, sink, tile_elements, lanes, seed
):
  args = _inputs(seed, seq, heads, heads)
  (got, got_grads), (want, want_grads) = _split_tiles_and_dense(
    *args,
    window=tuple(sorted(window, reverse=True)),
    sink=sink,
    tile_elements=tile_elements,
    lanes=lanes,
  )
  np.testing.assert_allclose(got, want, **F32_TOL)
  for g, w in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, w, **F32_TOL)


@hypothesis.given(
  config=_configs(),
  seed=st.integers(0, 2**16),
  tile_elements=st.sampled_from([1, 40, 300]),
  lanes=st.sampled_from([1, 3, 8]),
)
def test_heads_split_across_tiles_match_dense(
  config, seed, tile_elements, lanes
):
  # Small tiles split a window group's heads over several tiles; few lanes
  # turn runs of two or more chunks into loops.
  seq, heads, _, window, sink = config
  _assert_split_tiles_match_dense(
    seq, heads, window, sink, tile_elements, lanes, seed
  )


def _pattern(seq, window, sink, tile_elements, lanes):
  return _blocked.make_pattern(
    seq,
    seq,
    windows=sorted(window, reverse=True),
    sink=sink,
    causal=True,
    offset=0,
    block=8,
    tile_elements=tile_elements,
    lanes=lanes,
  )


def _has_loop(plan):
  return any(isinstance(item, _blocked._Loop) for item in plan)


@pytest.mark.parametrize("sink", [0, 3])
def test_band_chunks_run_as_loops(sink):
  # Window 9, chunks of 8, 2 heads split in 2 tiles, 4 lanes: 2 chunks per
  # iteration. Without a sink chunks 1-7 are each the previous one shifted
  # by 8 (3 iterations, chunks 0 and 7 static); with sink 3, chunks 2-7
  # (keys past the sink; chunks 0 and 1 static).
  seq, window = 64, [9, 9]
  plan = _blocked._plan(_pattern(seq, window, sink, 8 * 16, lanes=4))
  loops = [item for item in plan if isinstance(item, _blocked._Loop)]
  assert [(len(lp.tiles), lp.steps, lp.stride) for lp in loops] == [(4, 3, 16)]
  assert sum(isinstance(item, _blocked._Tile) for item in plan) == 2 * 2
  # The loop visits exactly the tiles of the all-static plan.
  all_static = _pattern(seq, window, sink, 8 * 16, lanes=64)
  assert not _has_loop(_blocked._plan(all_static))
  assert _blocked.visited_pairs(_pattern(seq, window, sink, 8 * 16, 4)) == (
    _blocked.visited_pairs(all_static)
  )
  _assert_split_tiles_match_dense(seq, 2, window, sink, 8 * 16, 4, seed=0)
  # Dense heads (keys from 0, growing) never form a loop.
  assert not _has_loop(
    _blocked._plan(_pattern(seq, [seq, seq], sink, 8 * 16, lanes=1))
  )


def test_bf16_inputs():
  window = (30, 5, 1, 12)
  args = _inputs(3, 30, 4, 2, jnp.bfloat16)
  got, got_grads = _value_and_vjp(*args, window=window, sink=2, impl="blocked")
  want, want_grads = _value_and_vjp(
    *[x.astype(jnp.float32) for x in args], window=window, sink=2, impl="dense"
  )
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, **BF16_TOL)
  for g, w in zip(got_grads, want_grads, strict=True):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), w, **BF16_TOL)


def test_window_covering_seq_is_causal_attention():
  q, k, v, _ = _inputs(4, 19, 4, 2)
  got = ops.moa_attention(q, k, v, [19, 40, 19, 100], block_size=8)
  want = ops.attention(q, k, v, impl="reference")
  np.testing.assert_allclose(got, want, **F32_TOL)


def test_window_one_without_sink_returns_own_value():
  q, k, v, _ = _inputs(5, 21, 4, 2)
  got = ops.moa_attention(q, k, v, [1, 1, 1, 1], block_size=8)
  np.testing.assert_allclose(got, jnp.repeat(v, 2, axis=2), **F32_TOL)


def _compiled(seq, window, impl, sink=0):
  x = jax.ShapeDtypeStruct((1, seq, len(window), 16), jnp.float32)
  fn = lambda q, k, v: ops.moa_attention(
    q, k, v, window, sink=sink, block_size=16, impl=impl
  )
  return jax.jit(fn).lower(x, x, x).compile()


def _visited(seq, window, sink=0):
  """Score entries the tiles visit (heads sorted by window, as the op does)."""
  return _blocked.visited_pairs(
    _blocked.make_pattern(
      seq,
      seq,
      windows=sorted(window, reverse=True),
      sink=sink,
      causal=True,
      offset=0,
      block=16,
    )
  )


def test_blocked_work_and_memory_fall_with_density():
  seq = 128
  flops = lambda c: c.cost_analysis()["flops"]
  dense = flops(_compiled(seq, [seq] * 2, "blocked"))
  mixed = flops(_compiled(seq, [seq, 10], "blocked"))
  sparse = {}
  for sink in (0, 5):
    sparse[sink] = flops(_compiled(seq, [10] * 2, "blocked", sink))
    # The visited tiles hug the band and the sink: for window 10 they hold
    # under 40 % of the dense tiles' entries. Work follows them (plus a
    # per-query-row cost, about 8 entries' worth at this tiny head dim).
    want = _visited(seq, [10] * 2, sink) / _visited(seq, [seq] * 2)
    assert want < 0.4
    assert want < 2.5 * ops.moa_density([10] * 2, seq, sink).mean()
    assert want <= sparse[sink] / dense <= 1.3 * want
  # A narrow head does not pay for a wide one.
  # (Paying for the wide one would make `mixed` ~45 % dearer than this.)
  np.testing.assert_allclose(mixed, (dense + sparse[0]) / 2, rtol=0.15)
  # No [seq, seq] score or mask buffer: at seq 1280 the temporaries of the
  # blocked impl stay far below one, those of the dense reference do not.
  long_seq = 1280
  score_bytes = 2 * long_seq * long_seq * 4
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temp(_compiled(long_seq, [20] * 2, "blocked")) < score_bytes / 5
  assert temp(_compiled(long_seq, [20] * 2, "dense")) >= score_bytes


@hypothesis.given(
  window=st.lists(st.integers(1, 40), min_size=1, max_size=3),
  seq=st.integers(1, 33),
  sink=st.integers(0, 40),
)
def test_density_counts_the_mask(window, seq, sink):
  mask = ops.moa_mask(jnp.asarray(window), seq, sink)
  want = np.asarray(mask).sum((1, 2)) / (seq * (seq + 1) / 2)
  np.testing.assert_allclose(
    ops.moa_density(window, seq, sink), want, rtol=1e-12
  )


def test_moa_windows_elastic_rule():
  alpha = np.array([64.0, 0.0, 10.0, -5.0, 3000.0])
  beta = np.array([0.0, 0.5, 0.25, 0.0, 0.0])
  for n in (1, 100, 1024):
    w = ops.moa_windows(alpha, beta, n)
    assert w.dtype == np.int64
    want = np.clip(np.round(alpha + beta * n), 1, n)
    np.testing.assert_array_equal(w, want)
  np.testing.assert_array_equal(
    ops.moa_windows(alpha, beta, 1024), [64, 512, 266, 1, 1024]
  )


def test_plan_json_in_the_authors_format(tmp_path):
  text = json.dumps(
    {"alphas": [[64, 1024], [8, 0]], "betas": [[0.0, 0.25], [0.5, 1.0]]}
  )
  plan = ops.MoAPlan.from_json(text)
  assert plan.num_layers == 2
  np.testing.assert_array_equal(plan.windows(0, 4096), [64, 2048])
  np.testing.assert_array_equal(plan.windows(1, 100), [58, 100])
  plan.save(tmp_path / "plan.json")
  assert ops.MoAPlan.load(tmp_path / "plan.json") == plan
  assert json.loads(plan.to_json()) == json.loads(text)
  with pytest.raises(ValueError, match="`betas`"):
    ops.MoAPlan(alphas=((1.0, 2.0),), betas=((0.0,),))
  with pytest.raises(ValueError, match="alphas"):
    ops.MoAPlan.from_json('{"alphas": [[1.0]]}')


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_alpha_or_beta_names_the_head_and_layer(bad):
  """Not a window of INT64_MIN: a ValueError naming the head (and layer)."""
  with pytest.raises(ValueError, match=r"`alpha` must be finite.*head 1"):
    ops.moa_windows([4.0, bad], [0.0, 0.0], 16)
  with pytest.raises(ValueError, match=r"`beta` must be finite.*head 0"):
    ops.moa_windows([4.0, 4.0], [bad, 0.0], 16)
  with pytest.raises(ValueError, match="`alphas` of layer 1, head 0 .*finite"):
    ops.MoAPlan(alphas=((1.0,), (bad,)), betas=((0.0,), (0.0,)))
  with pytest.raises(ValueError, match="`betas` of layer 0, head 1 .*finite"):
    ops.MoAPlan(alphas=((1.0, 2.0),), betas=((0.0, bad),))


@pytest.mark.parametrize(
  "text, match",
  [
    (None, r"cannot read MoA plan .*No such file"),
    ("not json", r"MoA plan .*must be JSON"),
    ("[1, 2]", r'JSON object with "alphas"'),
    ('{"alphas": [1, 2], "betas": [0, 0]}', r"`alphas` must be a list over"),
    (
      '{"alphas": [[1, "2"]], "betas": [[0, 0]]}',
      r"`alphas` of layer 0, head 1 must be a number, got '2'",
    ),
    (
      '{"alphas": [[1, 2]], "betas": [[0, NaN]]}',
      r"`betas` of layer 0, head 1 must be finite",
    ),
    (
      '{"alphas": [[1, 2], [3]], "betas": [[0, 0], [0, 0]]}',
      r"`betas` must have the layers of `alphas` \(2\) with as many heads "
      r"each \(\[2, 1\]\), got 2 layers with \[2, 2\] heads",
    ),
  ],
)
def test_bad_plan_file_is_one_clear_value_error(tmp_path, text, match):
  path = tmp_path / "plan.json"
  if text is not None:
    path.write_text(text)
  with pytest.raises(ValueError, match=match):
    ops.MoAPlan.load(path)


def test_bad_inputs_name_the_argument():
  q = jnp.zeros((1, 8, 4, 4))
  kv = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match=r"`window`.*\[q_heads\]"):
    ops.moa_attention(q, kv, kv, [4, 4])
  with pytest.raises(ValueError, match="`window`.*>= 1"):
    ops.moa_attention(q, kv, kv, [4, -1, 4, 4])
  with pytest.raises(ValueError, match="`window`.*integers"):
    ops.moa_attention(q, kv, kv, [4.5, 1.0, 4.0, 4.0])
  with pytest.raises(ValueError, match="`k`"):
    ops.moa_attention(
      q, jnp.zeros((1, 8, 3, 4)), jnp.zeros((1, 8, 3, 4)), [4, 4, 4, 4]
    )
  short = jnp.zeros((1, 7, 2, 4))
  with pytest.raises(ValueError, match="`k` must have at least the 8"):
    ops.moa_attention(q, short, short, [4, 4, 4, 4])
  with pytest.raises(ValueError, match="`sink`"):
    ops.moa_attention(q, kv, kv, [4, 4, 4, 4], sink=-1)
  with pytest.raises(ValueError, match="`window` must be concrete"):
    jax.jit(lambda w: ops.moa_attention(q, kv, kv, w))(jnp.ones(4, jnp.int32))
  # A traced window is fine for the dense reference.
  out = jax.jit(lambda w: ops.moa_attention(q, kv, kv, w, impl="dense"))(
    jnp.ones(4, jnp.int32)
  )
  assert out.shape == (1, 8, 4, 4)
