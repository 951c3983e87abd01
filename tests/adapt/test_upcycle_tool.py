"""tools/upcycle.py: a run (`training.save_initial_state`) upcycled with
BAM (shared KV) is a step-0 run whose model equals the source's, that
tools/train.py trains and `training.load_model` (tools/generate.py) reads;
bad combinations are one `error:` line each."""

import json
import os
import re
import subprocess
import sys


from tests import tool_testing

_DRIVER = """
import contextlib, io, json, sys
from absl import flags
import jax, numpy as np
from lightning_jax import models, training
from tools import train, upcycle

def run(tool, *argv):
  flags.FLAGS.unparse_flags()
  flags.FLAGS([tool.__name__, *argv])
  tool.main([tool.__name__])

src, dst = sys.argv[1:3]

def source(workdir, override):
  data = training.data.make_dataset("corpus", seq_len=16, global_batch_size=2,
                                    seed=0)
  cfg = train.model_config("transformer", training.parse_overrides([override]),
                           data.vocab_size)
  training.save_initial_state(
    training.TrainConfig(cfg, workdir, flags={"model": "transformer",
                                              "override": [override]}),
    models.init(jax.random.key(0), cfg))

tiny = "d_model=16,num_layers=1,num_heads=2,head_dim=8,d_ff=16"
source(src, tiny)
source(src + "_wide", tiny + ",d_ff=32")
errors = []
for argv in ([f"--from={src}", "--method=btx"],
             [f"--from={src},{src}_wide", "--method=bam"],
             [f"--from={src}", "--method=split", "--num_experts=3"],
             [f"--from={src}", "--method=btx", "--router_init=centroids"],
             [f"--from={src}", "--method=bam", "--split_attention"],
             [f"--from={src}", "--method=btx", "--shared_expert"],
             [f"--from={src}", "--method=split", "--num_experts=3",
              "--partition=cluster", "--router_init=centroids",
              "--split_attention", "--shared_expert", "--seq_len=16",
              "--batch_size=2"]):
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    try:
      run(upcycle, f"--workdir={src}", *argv)
    except SystemExit:
      pass
  errors.append([l for l in stderr.getvalue().splitlines() if "error:" in l])
run(upcycle, f"--from={src},{src}", "--method=bam-shared-kv", "--top_k=1",
    f"--workdir={dst}", "--steps=1", "--batch_size=2", "--seq_len=16",
    "--log_every=1")
tokens = np.arange(8)[None] % 32
(p0, c0, _), (p1, c1, step) = (training.load_model(w) for w in (src, dst))
forward = jax.jit(models.forward, static_argnums=2)
gap = np.abs(forward(p0, tokens, c0)[0] - forward(p1, tokens, c1)[0]).max()
run(train, f"--workdir={dst}")
print(json.dumps({"errors": errors, "gap": float(gap), "step": step,
                  "mixers": c1.mixers, "ffns": c1.ffns,
                  "trained": training.load_model(dst)[2]}))
"""


def test_upcycled_run_starts_as_its_source_and_trains(tmp_path):
  src, dst = tmp_path / "src", tmp_path / "dst"
  proc = subprocess.run(
    [sys.executable, "-c", _DRIVER, str(src), str(dst)],
    cwd=tool_testing.REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.splitlines()[-1])
  assert out["gap"] < 1e-5 and out["step"] == 0 and out["trained"] == 1
  assert out["mixers"] == ["attention_experts"]
  assert out["ffns"] == ["moe"]
  want = [
    "btx takes >= 2 models",
    "differ in model config",
    r"num_experts.*must divide d_ff",
    "router_init=centroids is for split",
    "split_attention is for split",
    "shared_expert is for split",
    "already holds a run",
  ]
  for lines, match in zip(out["errors"], want, strict=True):
    assert len(lines) == 1 and re.search(match, lines[0]), (lines, match)


def test_a_bad_flag_is_one_error_line(tmp_path):
  tool_testing.assert_one_error_line_each(
    "tools.upcycle",
    [
      ([f"--workdir={tmp_path}"], "--from is required"),
      ([f"--workdir={tmp_path}", "--from=/nonexistent"], "no complete"),
    ],
  )
