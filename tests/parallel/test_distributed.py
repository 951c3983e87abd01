"""2 processes x 4 CPU devices == 1 process x 8; a dead peer fails the others.

Each test launches `tests.parallel.distributed_worker` twice (gloo
collectives, coordinator on 127.0.0.1); the reference runs the same `train`
in this process on conftest's 8 devices.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from tests.parallel import distributed_worker

ROOT = pathlib.Path(__file__).resolve().parents[2]
# A hung job fails the test here instead of blocking the suite.
HANG_GUARD_S = 240


def _launch(*extra):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.parallel.distributed_worker",
       f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=HANG_GUARD_S) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs,
                                                            strict=True)]


def test_two_processes_match_one_process():
  results = _launch("--steps=3")
  expected = distributed_worker.train(steps=3)
  for i, (code, out, err) in enumerate(results):
    assert code == 0, f"process {i} failed:\n{err[-3000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["process"] == i and report["devices"] == 8
    np.testing.assert_allclose(report["losses"], expected, rtol=1e-5)


def test_dead_peer_fails_the_others():
  (code0, _, err0), (code1, _, _) = _launch(
      "--steps=3", "--die_after_step=0", "--heartbeat_timeout=3")
  assert code1 == 17  # the crashed host
  assert code0 != 0
  assert "stopped sending heartbeats" in err0, err0[-3000:]
