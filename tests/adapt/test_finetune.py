"""Fine-tuning through `training.train`: QLoRA resumes exactly, the base
stays frozen, the export loads, and tools/finetune's bad flags are one line."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from lightning_jax import adapt
from lightning_jax import models
from lightning_jax import training
from lightning_jax.adapt import finetune

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL = models.get_preset(
  "tiny-hybrid",
  d_model=32,
  num_layers=1,
  num_heads=2,
  head_dim=16,
  d_ff=64,
)


def _run(workdir, steps):
  return training.TrainConfig(
    model=MODEL,
    workdir=str(workdir),
    steps=steps,
    batch_size=8,
    seq_len=16,
    checkpoint_every=2,
    log_every=1,
    eval_every=2,
    eval_batches=1,
    optim=training.OptimConfig(lr=1e-2, total_steps=4, warmup_steps=0),
  )


def test_qlora_trains_adapters_only_resumes_exactly_and_exports(tmp_path):
  base = models.init(jax.random.key(0), MODEL)
  cfg = adapt.LoraConfig(rank=4)
  adapter = finetune.lora_adapter(base, cfg, MODEL, quantize=True)
  straight = training.train(_run(tmp_path / "a", 4), adapter=adapter)
  training.train(_run(tmp_path / "b", 2), adapter=adapter)
  resumed = training.train(_run(tmp_path / "b", 4), adapter=adapter)
  assert [r["step"] for r in resumed.history] == [3, 4]
  jax.tree.map(
    np.testing.assert_array_equal,
    resumed.state.params,
    straight.state.params,
  )
  losses = [r["loss"] for r in straight.history]
  assert losses[-1] < losses[0], losses
  assert "eval/loss" in straight.history[-1]
  frozen = adapter.init(jax.random.key(1))["base"]
  jax.tree.map(
    np.testing.assert_array_equal, straight.state.params["base"], frozen
  )
  merged = adapter.to_model(straight.state.params)
  finetune.export(str(tmp_path / "merged"), merged, MODEL, 4)
  loaded, loaded_cfg, step = training.load_model(str(tmp_path / "merged"))
  assert (loaded_cfg, step) == (MODEL, 4)
  jax.tree.map(np.testing.assert_array_equal, loaded, merged)


def test_adapters_need_a_mesh_without_pipe(tmp_path):
  base = models.init(jax.random.key(0), MODEL)
  adapter = finetune.lora_adapter(base, adapt.LoraConfig(rank=4), MODEL)
  config = dataclasses.replace(
    _run(tmp_path, 2),
    mesh="data=4,pipe=2",
    model=dataclasses.replace(MODEL, num_layers=2),  # 2 stages
  )
  with pytest.raises(ValueError, match="adapters train without a pipe axis"):
    training.train(config, adapter=adapter)


@pytest.mark.parametrize(
  "flags,match",
  [
    ([], "--base (a tools/train.py run directory) is required"),
    (["--base=/nonexistent"], "--base='/nonexistent': no complete checkpoint"),
  ],
)
def test_finetune_binary_bad_flag_is_one_error_line(tmp_path, flags, match):
  result = subprocess.run(
    [sys.executable, "-m", "tools.finetune", f"--workdir={tmp_path}", *flags],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 2
  errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
  assert len(errors) == 1 and match in errors[0], result.stderr
  assert "Traceback" not in result.stderr


def test_full_fine_tuning_starts_from_the_base_and_trains_every_param(tmp_path):
  base = models.init(jax.random.key(0), MODEL)
  result = training.train(
    _run(tmp_path, 2), adapter=finetune.full_adapter(base)
  )
  # Step 1's loss is the base model's on step 1's batch, before any update.
  batch = training.make_dataset(
    "corpus", seq_len=16, global_batch_size=8, seed=0
  ).batch(0)
  loss, _ = training.loss_fn(
    base, batch, jax.random.key(0), MODEL, training.LossConfig()
  )
  assert result.history[0]["loss"] == pytest.approx(float(loss), rel=1e-6)
  changed = jax.tree.map(
    lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
    result.state.params,
    base,
  )
  assert all(jax.tree.leaves(changed))
