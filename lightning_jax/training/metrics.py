"""Metric writers: `metrics.jsonl`, optional TensorBoard, a progress display.

Only process 0 writes. The loop hands over host values; to keep the device
busy it fetches step t-1's metrics after dispatching step t (`fetch`).
"""

import json
import math
import os
import sys
import time

from absl import logging
import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def fetch(metrics) -> dict:
  """Device metrics -> dict of Python floats (scalars) and lists (vectors).

  Blocks until the step that produced them has finished.
  """
  host = jax.device_get(metrics)
  return {
    k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist())
    for k, v in host.items()
  }


def _duration(seconds: float) -> str:
  """`3725.0 -> '1h02m05s'`."""
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _tensorboard_writer(logdir: str):
  """A tensorboardX writer, or ImportError naming the extra to install."""
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
      "TensorBoard logging needs tensorboardX: pip install -e '.[tensorboard]'"
    ) from e
  return tensorboardX.SummaryWriter(logdir)


class MetricWriter:
  """Writes one JSON object per logged step, and shows progress.

  `workdir/metrics.jsonl` gets `{"step", "loss", "lr", "grad_norm",
  "tokens_per_sec", ...}` per `write`; vectors (expert loads) as lists.
  `tokens_per_sec` is measured between consecutive writes (the first
  interval includes compilation, so its rate is low and no ETA is shown).
  On a terminal a single progress line (step/total, loss, tokens/s, ETA) is
  redrawn; otherwise each write is also
  an absl log line.

  Args:
    workdir: directory of `metrics.jsonl` (and `tensorboard/`).
    total_steps: the run's last step, for the progress display.
    tokens_per_step: tokens in one global batch.
    start_step: step the run starts (or resumes) from.
    tensorboard: also write scalars with tensorboardX (the `tensorboard`
      extra); ImportError if it is not installed.
    process_index: writes only when 0; default `jax.process_index()`.
    stream: where the progress line goes (default stdout).
  """

  def __init__(
    self,
    workdir: str,
    *,
    total_steps: int,
    tokens_per_step: int,
    start_step: int = 0,
    tensorboard: bool = False,
    process_index: int | None = None,
    stream=None,
  ):
    if process_index is None:
      process_index = jax.process_index()
    self._active = process_index == 0
    self._total = total_steps
    self._tokens_per_step = tokens_per_step
    self._start = start_step
    self._last = (start_step, time.perf_counter())
    self._stream = sys.stdout if stream is None else stream
    self._tty = self._stream.isatty()
    self._file = self._tb = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))
      self._file = open(
        os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8"
      )

  def write(self, step: int, metrics: dict) -> dict:
    """Records `metrics` (host values, `fetch`) of `step`; returns the row."""
    now = time.perf_counter()
    last_step, last_time = self._last
    self._last = (step, now)
    seconds_per_step = (now - last_time) / max(step - last_step, 1)
    row = {
      "step": step,
      **metrics,
      "tokens_per_sec": self._tokens_per_step / seconds_per_step,
    }
    if not self._active:
      return row
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and np.ndim(v) == 0:
          self._tb.add_scalar(k, v, step)
    # The first interval includes compilation: no ETA from it.
    eta = (
      "?"
      if last_step == self._start
      else _duration((self._total - step) * seconds_per_step)
    )
    line = (
      f"step {step}/{self._total} | loss {row['loss']:.4f} | "
      f"{row['tokens_per_sec']:,.0f} tok/s | ETA {eta}"
    )
    if self._tty:
      self._stream.write("\r" + line.ljust(79))
      self._stream.flush()
    else:
      logging.info(line)
    return row

  def close(self) -> None:
    """Flushes and closes the files; ends the progress line."""
    if not self._active:
      return
    if self._tty:
      self._stream.write("\n")
    self._file.close()
    if self._tb is not None:
      self._tb.close()
