"""tools/sweep.py (a tiny 2-run grid, then a re-run that skips both),
tools/scaling.py on synthetic rows and a one-run tools/repro_mqar.py, as
subprocesses."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lightning_jax import scaling
from tests import tool_testing

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRUTH = {"alpha": 80.0, "beta": 500.0, "eta": -0.3, "E": 1.8}


def _run(tool, *args):
  return subprocess.run(
    [sys.executable, "-m", f"tools.{tool}", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
    timeout=300,
  )


def _rows(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def test_sweep_writes_rows_and_skips_finished_runs(tmp_path):
  out = tmp_path / "sweep"
  args = (
    "--archs=tnl",
    "--sizes=32x1",
    "--tokens_per_param=0.002,0.004",  # 1 and 2 steps of 2 x 16 tokens
    "--batch_size=2",
    "--seq_len=16",
    "--eval_batches=1",
    f"--out={out}",
  )
  first = _run("sweep", *args)
  assert first.returncode == 0, first.stderr[-3000:]
  rows = _rows(out / "runs.jsonl")
  assert [r["run"] for r in rows] == ["tnl-32x1-m0.002", "tnl-32x1-m0.004"]
  assert [r["steps"] for r in rows] == [1, 2]
  for r in rows:
    assert r["n_tokens"] == r["steps"] * 2 * 16
    assert r["n_params"] < r["n_params_total"]
    assert r["compute"] == pytest.approx(r["flops_per_token"] * r["n_tokens"])
    assert np.isfinite(r["val_loss"]) and r["val_loss"] > 0
    assert os.path.isdir(r["workdir"])
  again = _run("sweep", *args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "running" not in again.stdout
  assert "0 of 2 runs to do" in again.stdout
  assert len(_rows(out / "runs.jsonl")) == 2


def test_sweep_bad_flags_are_one_error_line(tmp_path):
  # A sweep directory of other settings is not mixed into.
  other = tmp_path / "other"
  other.mkdir()
  (other / "sweep.json").write_text(json.dumps({"lr": 1.0}))
  tool_testing.assert_one_error_line_each(
    "tools.sweep",
    [
      (
        ["--sizes=33x1", "--dry_run", f"--out={tmp_path / 'bad_size'}"],
        "^error: --sizes: d_model 33",
      ),
      (
        ["--archs=tnl", "--sizes=32x1", f"--out={other}"],
        f"^error: --out={other} holds a sweep",
      ),
    ],
  )


def test_scaling_tool_fits_synthetic_rows(tmp_path):
  n = np.repeat([1e5, 3e5, 1e6], 3)
  d = n * np.tile([5.0, 20.0, 80.0], 3)
  runs = tmp_path / "runs.jsonl"
  with open(runs, "w", encoding="utf-8") as f:
    for arch, scale in (("a", 1.0), ("b", 1.05)):
      for ni, di, li in zip(n, d, scaling.predict(TRUTH, n, d), strict=True):
        row = {"arch": arch, "n_params": ni, "n_tokens": di}
        f.write(json.dumps(dict(row, val_loss=scale * li)) + "\n")
    f.write(
      json.dumps(
        {"arch": "c", "n_params": 1e5, "n_tokens": 1e6, "val_loss": 3.0}
      )
      + "\n"
    )
  has_plot = importlib.util.find_spec("matplotlib") is not None
  result = _run(
    "scaling", f"--runs={runs}", "--bootstrap=5", f"--plot={has_plot}"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  text = (tmp_path / "scaling_overtraining.md").read_text()
  lines = text.splitlines()
  assert lines[0].startswith("| arch | runs | alpha | beta | eta | E |")
  row_a = lines[2].split(" | ")
  assert row_a[:2] == ["| a", "9"]
  assert float(row_a[4].split()[0]) == pytest.approx(TRUTH["eta"], rel=1e-3)
  assert "not fitted" in lines[4] and "distinct" in lines[4]
  assert (tmp_path / "scaling_overtraining.png").exists() == has_plot
  missing = _run("scaling", f"--runs={tmp_path / 'none.jsonl'}")
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1].startswith("error: --runs=")


def test_repro_mqar_one_run_writes_its_row_and_table(tmp_path):
  result = _run(
    "repro_mqar",
    "--archs=tnl",
    "--sizes=32x1",
    "--kv_pairs=1",
    "--vocab_size=8",
    "--seq_len=4",
    "--batch_size=2",
    "--eval_batches=1",
    "--checkpoint_every=0",
    "--steps=1",
    f"--out={tmp_path}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = _rows(tmp_path / "mqar.jsonl")
  assert (row["run"], row["kv_pairs"], row["d_model"]) == ("tnl-32x1-k1", 1, 32)
  assert 0.0 <= row["accuracy"] <= 1.0 and row["steps"] == 1
  table = (tmp_path / "mqar.md").read_text().splitlines()
  assert table[0] == "| arch | N 32x1 | 32x1 K=1 |"
  assert table[2].startswith(f"| `tnl` | {row['n_params']:,} | ")
