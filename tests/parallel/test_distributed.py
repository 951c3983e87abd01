"""2 processes x 4 CPU devices == 1 process x 8; a dead peer fails the others.

Each test launches two local processes (gloo collectives, coordinator on
127.0.0.1): `tests.parallel.distributed_worker` (a tiny sharded step) or
`tools.train`; the reference runs the same computation in this process on
conftest's 8 devices.
"""

import functools
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np

from lightning_jax import models
from lightning_jax import training
from tests.parallel import distributed_worker

ROOT = pathlib.Path(__file__).resolve().parents[2]
# A hung job fails the test here instead of blocking the suite.
HANG_GUARD_S = 240


def _start(module, coordinator_flag, *extra):
  """Starts 2 processes of `python -m module` x 4 CPU devices each."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(
    os.environ,
    PYTHONPATH=str(ROOT),
    JAX_PLATFORMS="cpu",
    JAX_NUM_CPU_DEVICES="4",
  )
  return [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        module,
        f"--{coordinator_flag}=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        *extra,
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]


def _wait(procs):
  """[(returncode, stdout, stderr)] of each process; kills them on a hang."""
  try:
    outs = [p.communicate(timeout=HANG_GUARD_S) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [
    (p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)
  ]


def test_dead_peer_fails_the_others():
  """Both processes finish step 0 (== 1 process x 8 devices), then process 1
  dies: process 0 exits with the heartbeat error instead of hanging."""
  procs = _start(
    "tests.parallel.distributed_worker",
    "coordinator",
    "--steps=3",
    "--die_after_step=0",
    "--heartbeat_timeout=3",
  )
  expected = distributed_worker.train(steps=1)  # while they run
  (code0, out0, err0), (code1, out1, _) = _wait(procs)
  for i, out in enumerate((out0, out1)):
    # Gloo logs to stdout too, possibly without a newline before ours.
    rows = [json.loads(m) for m in re.findall(r'\{"process".*?\}', out)]
    assert [(r["process"], r["devices"], r["step"]) for r in rows] == [
      (i, 8, 0)
    ]
    np.testing.assert_allclose(rows[0]["loss"], expected[0], rtol=1e-5)
  assert code1 == 17  # the crashed host
  assert code0 != 0
  assert "stopped sending heartbeats" in err0, err0[-3000:]


# tools/train.py flags and the TrainConfig they mean (every optimiser flag
# explicit, so a change of a default cannot make the two runs differ).
_MODEL = dict(
  d_model=16,
  num_layers=2,
  num_heads=2,
  head_dim=8,
  d_ff=32,
  pattern=("deltanet", "attention"),
  recurrent_impl="recurrent",
  attention_impl="reference",
)
# The first mesh axis spans the two processes: fsdp splits every weight
# between them, so each must write its own shards for a complete checkpoint.
_RUN = dict(
  steps=3,
  batch_size=8,
  seq_len=16,
  mesh="fsdp=2,data=2,tensor=2",
  log_every=1,
  checkpoint_every=3,
)
_OPTIM = dict(lr=1e-2, warmup_steps=1, weight_decay=0.1, clip_norm=1.0)


def _flag(value):
  return ",".join(value) if isinstance(value, tuple) else str(value)


def test_train_binary_two_processes_match_one_process(tmp_path):
  """`tools.train` as 2 processes x 4 devices: the loss curve of 1 x 8.

  Process 0 alone writes metrics; each process writes its checkpoint shards:
  the step-3 checkpoint is complete and restores (here, on 1 x 8) to the
  parameters of the one-process run.
  """
  override = ",".join(f"{k}={_flag(v)}" for k, v in _MODEL.items())
  flags = [f"--{k}={v}" for k, v in {**_RUN, **_OPTIM}.items()]
  procs = _start(
    "tools.train",
    "coordinator_address",
    "--model=tiny-hybrid",
    f"--override={override}",
    f"--workdir={tmp_path / 'two'}",
    "--lbl_coef=0.01",
    "--z_coef=0.001",
    *flags,
  )
  model = models.get_preset("tiny-hybrid", vocab_size=256, **_MODEL)
  expected = training.train(
    training.TrainConfig(
      model=model,
      workdir=str(tmp_path / "one"),
      **dict(_RUN, checkpoint_every=0),
      optim=training.OptimConfig(total_steps=_RUN["steps"], **_OPTIM),
      loss=training.LossConfig(lbl_coef=0.01, z_coef=0.001),
    )
  )
  for i, (code, _, err) in enumerate(_wait(procs)):
    assert code == 0, f"process {i} failed:\n{err[-3000:]}"
  with open(tmp_path / "two" / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by process 0
  np.testing.assert_allclose(
    [r["loss"] for r in rows], [r["loss"] for r in expected.history], rtol=1e-5
  )
  manager = training.checkpoint.CheckpointManager(
    str(tmp_path / "two" / "checkpoints")
  )
  assert manager.all_steps() == [3]
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    expected.state,
  )
  restored, _ = manager.restore(3, target)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
    jax.device_get(restored.params),
    jax.device_get(expected.state.params),
  )
