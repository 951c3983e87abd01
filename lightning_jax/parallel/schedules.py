"""Pipeline tick tables: which microbatch each stage runs at each tick.

Pure numpy, no JAX: the executors in `pipeline.py` read these tables (as
constants indexed by tick and `axis_index("pipe")`) and
`tools/plot_pipeline.py` draws them, so the drawn timeline is the executed one.

Conventions (docs/pipeline.md): `S` stages (devices on the `pipe` axis), `M`
microbatches, `R` repeats (virtual stages per device). Virtual stage
`v = r * S + s` lives on device `s`; the model's layers are split into `S * R`
consecutive virtual stages. An entry -1 means a bubble (nothing to do).
"""

import dataclasses

import numpy as np

from lightning_jax import _checks

SCHEDULES = ("gpipe", "circular", "1f1b")


@dataclasses.dataclass(frozen=True)
class TickTable:
  """What every stage does at every tick.

  Attributes:
    schedule: "gpipe", "circular" or "1f1b".
    num_stages: S.
    num_microbatches: M.
    repeats: R.
    fwd_microbatch: int32 `[ticks, S]` microbatch run forward, -1 = bubble.
    fwd_repeat: int32 `[ticks, S]` its repeat r (virtual stage r * S + s).
    bwd_microbatch: int32 `[ticks, S]` microbatch run backward in the same
      tick (1f1b only; all -1 for schedules differentiated by autodiff).
    bwd_repeat: int32 `[ticks, S]` its repeat.
  """

  schedule: str
  num_stages: int
  num_microbatches: int
  repeats: int
  fwd_microbatch: np.ndarray
  fwd_repeat: np.ndarray
  bwd_microbatch: np.ndarray
  bwd_repeat: np.ndarray

  @property
  def num_ticks(self) -> int:
    return self.fwd_microbatch.shape[0]

  @property
  def bubble_fraction(self) -> float:
    """Idle share of stage-slots in the ticks that run any forward (resp.
    backward) work; for gpipe / circular the backward mirrors the forward.

    A tick lasts as long as its slowest stage and SPMD stages run in lockstep,
    so a 1f1b tick with forward work on some stage costs a forward on all.
    """
    slots = busy = 0
    for work in (self.fwd_microbatch, self.bwd_microbatch):
      active = np.any(work >= 0, axis=1)
      slots += np.count_nonzero(active) * self.num_stages
      busy += np.count_nonzero(work >= 0)
    return 1.0 - busy / slots


def theoretical_bubble_fraction(
  num_stages: int, num_microbatches: int, repeats: int = 1
) -> float:
  """`(S - 1) / (R * M + S - 1)`: GPipe (R = 1, Huang et al., 2019),
  circular / interleaved (Narayanan et al., 2021), and our SPMD 1F1B (R = 1).
  """
  s, m, r = num_stages, num_microbatches, repeats
  return (s - 1) / (r * m + s - 1)


def _forward_items(num_stages, num_microbatches, repeats):
  """Work item i -> (microbatch, repeat) in the order stage 0 starts them.

  Microbatches go in groups of S; a group makes all R passes round the ring
  before the next group starts, so the output of stage S-1 for (m, r) reaches
  stage 0 exactly when it starts (m, r+1): no storage for the wrap-around.
  With R = 1 this is plain microbatch order.
  """
  i = np.arange(num_microbatches * repeats)
  group_size = num_stages if repeats > 1 else num_microbatches
  group, rest = np.divmod(i, group_size * repeats)
  repeat, offset = np.divmod(rest, group_size)
  return group * group_size + offset, repeat


def tick_table(
  schedule: str, num_stages: int, num_microbatches: int, repeats: int = 1
) -> TickTable:
  """The tick table of a schedule.

  * gpipe / circular: stage s runs work item `t - s` at tick t, one scan of
    `M * R + S - 1` ticks; activations hop one stage per tick (stage S-1 ->
    stage 0 for the next repeat). The backward is the reverse-mode transpose
    of this scan (mirrored timeline).
  * 1f1b (R = 1): forward of m on stage s at tick `m + s`; backward at tick
    `m + 2 (S - 1) - s` (the last stage runs the backward of m in the tick of
    its forward, cotangents hop one stage back per tick). `M + 2 S - 2` ticks:
    `S - 1` warm-up ticks (forward only), `M` steady ticks (one forward and
    one backward), `S - 1` cool-down ticks (backward only).

  Args:
    schedule: one of `SCHEDULES`.
    num_stages: S >= 1.
    num_microbatches: M >= 1; a multiple of S for circular.
    repeats: R; 1 for gpipe and 1f1b, >= 2 for circular.

  Returns:
    `TickTable`.

  Raises:
    ValueError: unknown schedule or inconsistent S, M, R.

  Example:
    >>> tick_table("gpipe", 2, 2).fwd_microbatch.tolist()
    [[0, -1], [1, 0], [-1, 1]]
  """
  _checks.check_choice("schedule", schedule, SCHEDULES)
  s = _checks.check_positive_int("num_stages", num_stages)
  m = _checks.check_positive_int("num_microbatches", num_microbatches)
  r = _checks.check_positive_int("repeats", repeats)
  if schedule == "circular":
    if r < 2:
      raise ValueError(
        f"`repeats` must be >= 2 for schedule='circular', got "
        f"{r} (use 'gpipe' for one pass)."
      )
    if m % s:
      raise ValueError(
        f"`num_microbatches` must be a multiple of num_stages "
        f"= {s} for schedule='circular', got {m}."
      )
  elif r != 1:
    raise ValueError(
      f"`repeats` must be 1 for schedule={schedule!r}, got "
      f"{r} (interleaving is schedule='circular')."
    )
  stage = np.arange(s)
  if schedule == "1f1b":
    ticks = m + 2 * s - 2
    t = np.arange(ticks)[:, None]
    fwd = t - stage
    bwd = t - 2 * (s - 1) + stage
    fwd_mb = np.where((fwd >= 0) & (fwd < m), fwd, -1)
    bwd_mb = np.where((bwd >= 0) & (bwd < m), bwd, -1)
    zeros = np.zeros_like(fwd_mb)
    return TickTable(
      schedule,
      s,
      m,
      r,
      fwd_mb.astype(np.int32),
      np.where(fwd_mb >= 0, zeros, -1).astype(np.int32),
      bwd_mb.astype(np.int32),
      np.where(bwd_mb >= 0, zeros, -1).astype(np.int32),
    )
  item_mb, item_rep = _forward_items(s, m, r)
  ticks = m * r + s - 1
  item = np.arange(ticks)[:, None] - stage
  valid = (item >= 0) & (item < m * r)
  safe = np.clip(item, 0, m * r - 1)
  none = np.full((ticks, s), -1, np.int32)
  return TickTable(
    schedule,
    s,
    m,
    r,
    np.where(valid, item_mb[safe], -1).astype(np.int32),
    np.where(valid, item_rep[safe], -1).astype(np.int32),
    none,
    none.copy(),
  )
