"""Runs a tools/ binary's `main` on several bad flag sets in ONE subprocess.

Importing JAX and the library dominates a binary's start-up, so the cases
share one process: each parses its flags afresh and calls `main`, which must
exit non-zero with exactly one `error:` line on stderr and no traceback.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

_DRIVER = """
import contextlib, importlib, io, json, sys
from absl import flags
tool = importlib.import_module(sys.argv[1])
results = []
for argv in json.loads(sys.argv[2]):
  flags.FLAGS.unparse_flags()
  err, status = io.StringIO(), 0
  with contextlib.redirect_stderr(err):
    try:
      flags.FLAGS([sys.argv[1], *argv])
      tool.main([sys.argv[1]])
    except SystemExit as e:
      status = e.code
    except Exception:
      import traceback
      traceback.print_exc()
      status = "Traceback"
  results.append([status, err.getvalue()])
print(json.dumps(results))
"""


def assert_one_error_line_each(module: str, cases) -> None:
  """`cases`: `(flags, regex)` pairs; each run's error line matches regex."""
  proc = subprocess.run(
    [sys.executable, "-c", _DRIVER, module, json.dumps([f for f, _ in cases])],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr
  results = json.loads(proc.stdout.splitlines()[-1])
  for (flags, match), (status, stderr) in zip(cases, results, strict=True):
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert status not in (0, None, "Traceback"), (flags, stderr)
    assert len(errors) == 1, (flags, stderr)
    assert re.search(match, errors[0]), (flags, match, errors[0])
    assert "Traceback" not in stderr, (flags, stderr)
