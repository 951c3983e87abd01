"""Metric writers: JSONL rows, process 0 only, progress line,
TensorBoard extra."""

import importlib.util
import io
import json

import jax.numpy as jnp
import pytest

from lightning_jax import training
from lightning_jax.training import metrics as metrics_lib


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_jsonl_rows_and_progress_line(tmp_path):
  terminal = _Terminal()
  writer = training.MetricWriter(
    str(tmp_path),
    total_steps=10,
    tokens_per_step=64,
    stream=terminal,
    process_index=0,
  )
  host = metrics_lib.fetch(
    {
      "loss": jnp.float32(2.5),
      "lr": jnp.float32(0.1),
      "grad_norm": jnp.float32(1.0),
      "moe/1/expert_load": jnp.array([0.25, 0.75]),
    }
  )
  writer.write(2, host)
  writer.write(4, dict(host, loss=2.0))
  writer.close()
  rows = [
    json.loads(line)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in rows] == [2, 4]
  assert [r["loss"] for r in rows] == [2.5, 2.0]
  assert rows[0]["moe/1/expert_load"] == [0.25, 0.75]
  assert all(r["tokens_per_sec"] > 0 for r in rows)
  shown = terminal.getvalue()
  assert shown.startswith("\rstep 2/10 | loss 2.5000 | ")
  assert "\rstep 4/10 | loss 2.0000 | " in shown and "ETA 0m00s" in shown
  assert shown.endswith("\n")


def test_step_time_leaves_out_pauses_and_gives_mfu(tmp_path, monkeypatch):
  clock = iter([0.0, 10.0, 16.0])
  monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: next(clock))
  writer = training.MetricWriter(
    str(tmp_path),
    total_steps=10,
    tokens_per_step=100,
    flops_per_token=6.0,
    peak_flops=1000.0,
    process_index=0,
    stream=io.StringIO(),
  )
  writer.exclude(2.0)  # e.g. an evaluation inside the interval
  row = writer.write(4, {"loss": 1.0})
  assert row["step_time"] == 2.0  # (10 - 2) s over 4 steps
  assert row["tokens_per_sec"] == 50.0
  assert row["mfu"] == 6.0 * 50.0 / 1000.0
  assert 0 < row["host_memory_gb"] < 1024
  assert writer.write(6, {"loss": 1.0})["step_time"] == 3.0  # reset
  writer.close()


def test_tensorboard_gets_scalars_and_vector_histograms(tmp_path, monkeypatch):
  calls = []

  class Recorder:
    def add_scalar(self, name, value, step):
      calls.append(("scalar", name, step))

    def add_histogram(self, name, values, step):
      calls.append(("histogram", name, tuple(values), step))

    def close(self):
      calls.append(("close",))

  monkeypatch.setattr(metrics_lib, "_tensorboard_writer", lambda _: Recorder())
  writer = training.MetricWriter(
    str(tmp_path),
    total_steps=1,
    tokens_per_step=1,
    tensorboard=True,
    process_index=0,
    stream=io.StringIO(),
  )
  writer.write(1, {"loss": 1.0, "moe/0/expert_load": [0.5, 1.5]})
  writer.close()
  assert ("scalar", "loss", 1) in calls
  assert ("histogram", "moe/0/expert_load", (0.5, 1.5), 1) in calls
  assert calls[-1] == ("close",)


def test_only_process_zero_writes(tmp_path):
  writer = training.MetricWriter(
    str(tmp_path), total_steps=1, tokens_per_step=1, process_index=1
  )
  row = writer.write(1, {"loss": 1.0})
  writer.close()
  assert row["loss"] == 1.0
  assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.skipif(
  importlib.util.find_spec("tensorboardX") is not None,
  reason="tensorboardX is installed",
)
def test_tensorboard_without_the_extra_is_a_clear_error(tmp_path):
  with pytest.raises(ImportError, match=r"pip install -e '\.\[tensorboard\]'"):
    training.MetricWriter(
      str(tmp_path),
      total_steps=1,
      tokens_per_step=1,
      tensorboard=True,
      process_index=0,
    )
