"""Metric writers: `metrics.jsonl`, optional TensorBoard, a progress display.

Only process 0 writes. The loop hands over host values; to keep the device
busy it fetches step t-1's metrics after dispatching step t (`fetch`).

Per logged interval the writer adds what it measures itself: `step_time`
(wall seconds per step, without the pauses the loop reports through
`exclude`: compilation, evaluation, checkpoint stalls, profiling),
`tokens_per_sec`, `mfu` when the peak is known (`models.flops_per_token`
times tokens per second over the devices' peak), and the memory in use
(`host_memory_gb`, the process's resident set; `device_memory_gb`, the
largest `bytes_in_use` of the local devices, where the backend reports it).
The loop adds the compiled step's memory (`compiled_memory`) to the first
row.
"""

import json
import math
import os
import resource
import sys
import time

from absl import logging
import jax
import numpy as np
import tensorstore as ts

from lightning_jax.training import checkpoint

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


def host_memory_bytes() -> int:
  """This process's resident set size (its peak where /proc is missing)."""
  try:
    with open("/proc/self/statm", encoding="ascii") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory_bytes() -> int | None:
  """Largest `bytes_in_use` over the local devices; None if not reported."""
  used = [
    (d.memory_stats() or {}).get("bytes_in_use") for d in jax.local_devices()
  ]
  used = [u for u in used if u is not None]
  return max(used) if used else None


def compiled_memory(compiled) -> dict:
  """Memory of a compiled step per device, from XLA's `memory_analysis()`
  (nothing is run): `compiled/arguments_mb`, `compiled/temp_mb` and
  `compiled/peak_mb` = arguments + outputs + temporaries - aliased
  (donated) bytes; empty where the backend does not report it."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  peak = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  )
  return {
    "compiled/arguments_mb": mem.argument_size_in_bytes / 2**20,
    "compiled/temp_mb": mem.temp_size_in_bytes / 2**20,
    "compiled/peak_mb": peak / 2**20,
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


class _Rows:
  """Appends lines to `<directory>/metrics.jsonl`: a local file, or a
  tensorstore kvstore URL (no appends there: the whole file is rewritten,
  which is cheap for metric rows)."""

  def __init__(self, directory: str):
    if "://" not in directory:
      os.makedirs(directory, exist_ok=True)
      self._file = open(
        os.path.join(directory, METRICS_FILE), "a", encoding="utf-8"
      )
      return
    self._file = None
    url = directory if directory.endswith("/") else directory + "/"
    self._kv = ts.KvStore.open(url, context=checkpoint.CONTEXT).result()
    existing = self._kv.read(METRICS_FILE).result()
    self._text = existing.value.decode() if existing.state == "value" else ""

  def append(self, line: str) -> None:
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._text += line
      self._kv.write(METRICS_FILE, self._text.encode()).result()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class MetricWriter:
  """Writes one JSON object per logged step, and shows progress.

  `workdir/metrics.jsonl` gets `{"step", "loss", "lr", "grad_norm",
  "step_time", "tokens_per_sec", ...}` per `write` (the measured fields are
  listed in the module docstring); vectors (expert loads) as lists, which
  TensorBoard gets as histograms. On a terminal a single progress line
  (step/total, loss, tokens/s, ETA) is redrawn; otherwise each write is also
  an absl log line.

  Args:
    workdir: directory of `metrics.jsonl` (and `tensorboard/`): a local
      path or a tensorstore kvstore URL (`gs://bucket/run/`; TensorBoard
      needs a local path).
    total_steps: the run's last step, for the progress display.
    tokens_per_step: tokens in one global batch.
    start_step: step the run starts (or resumes) from.
    flops_per_token: model FLOPs per trained token, for `mfu`.
    peak_flops: FLOP/s of all the run's devices together; None leaves `mfu`
      out.
    tensorboard: also write scalars and histograms with tensorboardX (the
      `tensorboard` extra); ImportError if it is not installed.
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
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    tensorboard: bool = False,
    process_index: int | None = None,
    stream=None,
  ):
    if process_index is None:
      process_index = jax.process_index()
    self._active = process_index == 0
    self._total = total_steps
    self._tokens_per_step = tokens_per_step
    self._flops_per_token = flops_per_token
    self._peak_flops = peak_flops
    self._last = (start_step, time.perf_counter())
    self._excluded = 0.0
    self._stream = sys.stdout if stream is None else stream
    self._tty = self._stream.isatty()
    self._rows = self._tb = None
    if self._active:
      if tensorboard and "://" in workdir:
        raise ValueError(
          f"--tensorboard needs a local metrics directory, got {workdir!r}."
        )
      if tensorboard:
        self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))
      self._rows = _Rows(workdir)

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` of the current interval out of its `step_time`."""
    self._excluded += seconds

  def _measured(self, step: int) -> dict:
    """The interval's timing, throughput and memory fields."""
    now = time.perf_counter()
    last_step, last_time = self._last
    self._last = (step, now)
    busy = max(now - last_time - self._excluded, 1e-9)
    self._excluded = 0.0
    step_time = busy / max(step - last_step, 1)
    row = {
      "step_time": step_time,
      "tokens_per_sec": self._tokens_per_step / step_time,
    }
    if self._flops_per_token is not None and self._peak_flops:
      row["mfu"] = (
        self._flops_per_token * row["tokens_per_sec"] / self._peak_flops
      )
    row["host_memory_gb"] = host_memory_bytes() / 2**30
    device = device_memory_bytes()
    if device is not None:
      row["device_memory_gb"] = device / 2**30
    return row

  def write(self, step: int, metrics: dict) -> dict:
    """Records `metrics` (host values, `fetch`) of `step`; returns the row."""
    row = {"step": step, **metrics, **self._measured(step)}
    if not self._active:
      return row
    self._rows.append(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k == "step":
          continue
        if np.ndim(v) == 0:
          self._tb.add_scalar(k, v, step)
        else:
          self._tb.add_histogram(k, np.asarray(v), step)
    eta = _duration((self._total - step) * row["step_time"])
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
    self._rows.close()
    if self._tb is not None:
      self._tb.close()
