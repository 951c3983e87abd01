"""Tick tables: every microbatch visits every virtual stage once, in order."""

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from lightning_jax.parallel import schedules


def _forward_ticks(table):
  """{(microbatch, virtual stage): tick} of the forward work."""
  seen = {}
  for t, s in zip(*np.nonzero(table.fwd_microbatch >= 0), strict=True):
    key = (
      int(table.fwd_microbatch[t, s]),
      int(table.fwd_repeat[t, s]) * table.num_stages + int(s),
    )
    assert key not in seen, f"{key} run twice"
    seen[key] = int(t)
  return seen


def _table_args():
  return st.tuples(
    st.sampled_from(schedules.SCHEDULES),
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(2, 3),
  )


def _make(args):
  schedule, s, k, r = args
  if schedule == "circular":
    return schedules.tick_table(schedule, s, k * s, r)
  return schedules.tick_table(schedule, s, k * s + (k % 3), 1)


@hypothesis.given(_table_args())
def test_every_microbatch_runs_every_virtual_stage_once_one_hop_per_tick(args):
  table = _make(args)
  ticks = _forward_ticks(table)
  num_virtual = table.num_stages * table.repeats
  assert set(ticks) == {
    (m, v) for m in range(table.num_microbatches) for v in range(num_virtual)
  }
  # The executor moves activations one stage per tick (ppermute s -> s+1,
  # S-1 -> 0 for the next repeat): the next virtual stage runs next tick.
  for (m, v), t in ticks.items():
    if v > 0:
      assert ticks[(m, v - 1)] == t - 1
  assert table.num_ticks == (
    table.num_microbatches * table.repeats
    + table.num_stages
    - 1
    + (table.num_stages - 1 if table.schedule == "1f1b" else 0)
  )


@hypothesis.given(_table_args())
def test_bubble_fraction_matches_formula(args):
  table = _make(args)
  expected = schedules.theoretical_bubble_fraction(
    table.num_stages, table.num_microbatches, table.repeats
  )
  np.testing.assert_allclose(table.bubble_fraction, expected, rtol=1e-12)


@hypothesis.given(st.integers(1, 6), st.integers(1, 13))
def test_1f1b_backward_order_and_ring_of_2s_minus_1_slots(s, m):
  table = schedules.tick_table("1f1b", s, m)
  fwd = _forward_ticks(table)
  bwd = {}
  for t, stage in zip(*np.nonzero(table.bwd_microbatch >= 0), strict=True):
    key = (int(table.bwd_microbatch[t, stage]), int(stage))
    assert key not in bwd
    bwd[key] = int(t)
  assert set(bwd) == set(fwd)
  for (mb, stage), t in bwd.items():
    assert t >= fwd[(mb, stage)]  # after its own forward
    if stage < s - 1:  # one tick after the next stage's backward
      assert t == bwd[(mb, stage + 1)] + 1
    else:  # the last stage starts the backward in its forward's tick
      assert t == fwd[(mb, stage)]
  # Warm-up ticks run no backward, cool-down ticks no forward.
  assert not np.any(table.bwd_microbatch[: s - 1] >= 0)
  assert not np.any(table.fwd_microbatch[m + s - 1 :] >= 0)
  # Saved inputs live from forward to backward: at most 2S - 1 per stage,
  # in distinct slots m % (2S - 1) (the executor's ring buffer).
  for stage in range(s):
    for t in range(table.num_ticks):
      live = [
        mb for mb in range(m) if fwd[(mb, stage)] <= t <= bwd[(mb, stage)]
      ]
      assert len(live) <= 2 * s - 1
      assert len({mb % (2 * s - 1) for mb in live}) == len(live)
  # Steady state: every stage runs one forward and one backward per tick.
  assert np.all(table.fwd_microbatch[2 * s - 2 : m] >= 0)
  assert np.all(table.bwd_microbatch[2 * s - 2 : m] >= 0)


def test_gpipe_example():
  table = schedules.tick_table("gpipe", 3, 2)
  np.testing.assert_array_equal(
    table.fwd_microbatch, [[0, -1, -1], [1, 0, -1], [-1, 1, 0], [-1, -1, 1]]
  )


@pytest.mark.parametrize(
  "args, match",
  [
    (("pipedream", 2, 2, 1), "schedule"),
    (("gpipe", 0, 2, 1), "num_stages"),
    (("gpipe", 2, 0, 1), "num_microbatches"),
    (("gpipe", 2, 2, 2), "repeats"),
    (("1f1b", 2, 2, 2), "repeats"),
    (("circular", 2, 4, 1), "repeats"),
    (("circular", 2, 3, 2), "multiple of num_stages"),
  ],
)
def test_bad_input(args, match):
  with pytest.raises(ValueError, match=match):
    schedules.tick_table(*args)
