"""Kill-and-resume: a run SIGKILLed while writing a checkpoint, or stopped by
SIGTERM, and restarted continues exactly (bitwise) as an uninterrupted run
with the same flags.

`tools/train.py` processes: uninterrupted (shared by the tests); killed
inside the save of step `KILL_AT` (after its arrays are written, before the
commit; the loop writes it after step `KILL_AT + 1`), via a driver that wraps
the checkpoint writer; sent SIGTERM while it reads a batch; restarted with
the plain binary.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lightning_jax import training

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS, EVERY, KILL_AT = 6, 2, 4
FLAGS = [
  "--model=tiny-hybrid",
  "--override=d_model=16,num_layers=1,num_heads=2,head_dim=8,d_ff=32",
  f"--steps={STEPS}",
  "--batch_size=4",
  "--seq_len=16",
  f"--checkpoint_every={EVERY}",
  "--log_every=1",
  "--lr=1e-2",
]

# Runs tools/train.py, but hangs inside the checkpoint save of step KILL_AT
# once its arrays are in the temporary directory (the commit never happens).
_DRIVER = """
import pathlib, sys, time
from absl import app
from lightning_jax.training import checkpoint
from tools import train

kill_at, marker = sys.argv[1], pathlib.Path(sys.argv[2])
write_leaves = checkpoint._write_leaves

def write_then_hang(root, leaves, primary):
  write_leaves(root, leaves, primary)
  if root.parent.name.startswith(f"tmp-{kill_at}-"):
    marker.write_text("arrays written")
    time.sleep(600)

checkpoint._write_leaves = write_then_hang
app.run(train.main, argv=["train", *sys.argv[3:]])
"""


# Runs tools/train.py and sends itself SIGTERM while reading the batch of
# data position sys.argv[1] (after dispatching that step).
_TERM_DRIVER = """
import os, signal, sys
from absl import app
from lightning_jax.training import data
from tools import train

term_at = int(sys.argv[1])
batch = data.TokenStreamDataset.batch

def batch_then_term(self, step):
  if step == term_at and self.split == "train":
    os.kill(os.getpid(), signal.SIGTERM)
  return batch(self, step)

data.TokenStreamDataset.batch = batch_then_term
app.run(train.main, argv=["train", *sys.argv[2:]])
"""


def _env():
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_NUM_CPU_DEVICES="2",
    PYTHONPATH=str(REPO),
  )


def _train(workdir):
  subprocess.run(
    [sys.executable, "-m", "tools.train", *FLAGS, f"--workdir={workdir}"],
    cwd=REPO,
    env=_env(),
    check=True,
    capture_output=True,
    timeout=300,
  )


def _rows(workdir) -> list[dict]:
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _losses(workdir) -> dict[int, float]:
  """Step -> loss; a re-run step keeps its last logged value."""
  return {row["step"]: row["loss"] for row in _rows(workdir)}


def _final_state(workdir):
  manager = training.CheckpointManager(workdir / "checkpoints")
  assert manager.latest_step() == STEPS
  state, _ = manager.restore(STEPS)
  return state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The workdir of the uninterrupted run."""
  workdir = tmp_path_factory.mktemp("reference")
  _train(workdir)
  return workdir


def test_sigterm_saves_exits_0_and_resumes_bitwise_exact(tmp_path, reference):
  driver = tmp_path / "driver.py"
  driver.write_text(_TERM_DRIVER)
  # SIGTERM arrives while the loop reads the batch of position 2, after
  # step 2: step 3 runs, then the run stops and saves.
  stopped = subprocess.run(
    [sys.executable, str(driver), "2", *FLAGS, f"--workdir={tmp_path}"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert stopped.returncode == 0, stopped.stderr
  assert "preempted after step 3: the state is saved" in stopped.stdout
  manager = training.CheckpointManager(tmp_path / "checkpoints")
  assert manager.all_steps() == [EVERY, 3]
  _train(tmp_path)
  assert [r["step"] for r in _rows(tmp_path)] == list(range(1, STEPS + 1))
  assert _losses(tmp_path) == _losses(reference)
  jax.tree.map(
    np.testing.assert_array_equal,
    _final_state(tmp_path),
    _final_state(reference),
  )


def test_sigkill_during_checkpoint_write_then_resume_is_bitwise_exact(
  tmp_path, reference
):
  killed = tmp_path / "killed"
  marker = tmp_path / "marker"
  driver = tmp_path / "driver.py"
  driver.write_text(_DRIVER)
  proc = subprocess.Popen(
    [
      sys.executable,
      str(driver),
      str(KILL_AT),
      str(marker),
      *FLAGS,
      f"--workdir={killed}",
    ],
    cwd=REPO,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.monotonic() + 300
    while not marker.exists():
      assert proc.poll() is None, "the driver exited before the kill"
      assert time.monotonic() < deadline
      time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    proc.kill()
  manager = training.CheckpointManager(killed / "checkpoints")
  assert manager.all_steps() == [EVERY]
  assert any(
    p.name.startswith(f"tmp-{KILL_AT}-")
    for p in (killed / "checkpoints").iterdir()
  )
  _train(killed)  # resumes from step 2, ignoring the half-written step 4
  resumed_from = EVERY
  # Step KILL_AT's state is saved once step KILL_AT + 1 (its loss, from
  # those params) is checked, so that step was logged before the kill; the
  # save runs in the background, so the run may have logged more meanwhile.
  steps = [r["step"] for r in _rows(killed)]
  restart = steps.index(resumed_from + 1, resumed_from + 1)
  assert KILL_AT + 1 <= restart <= STEPS
  assert steps == [*range(1, restart + 1), *range(resumed_from + 1, STEPS + 1)]
  assert _losses(killed) == _losses(reference)
  assert sorted(_losses(reference)) == list(range(1, STEPS + 1))
  jax.tree.map(
    np.testing.assert_array_equal, _final_state(killed), _final_state(reference)
  )
