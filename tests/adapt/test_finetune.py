"""Fine-tuning through `training.train`: QLoRA and MaskLLM train their
params only, MaskLLM resumes exactly (its annealing at the restored step),
the exports load, and tools/finetune's bad flags are one line."""

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
from lightning_jax.adapt import maskllm
from tests import tool_testing
from tests.adapt import adapt_testing

base = adapt_testing.base

REPO = pathlib.Path(__file__).resolve().parents[2]
CFG = models.get_preset(
  "tiny-hybrid",
  d_model=32,
  num_layers=1,
  num_heads=2,
  head_dim=16,
  d_ff=64,
)


def _run(workdir, steps, eval_every=0):
  """A 4-step run (`steps` of them now); no evaluation unless asked (each
  compiles one more function)."""
  return training.TrainConfig(
    model=CFG,
    workdir=str(workdir),
    steps=steps,
    batch_size=8,
    seq_len=16,
    checkpoint_every=2,
    log_every=1,
    eval_every=eval_every,
    eval_batches=1,
    optim=training.OptimConfig(lr=1e-2, total_steps=4, warmup_steps=0),
  )


def test_qlora_trains_adapters_only_and_exports(base, tmp_path):
  cfg = adapt.LoraConfig(rank=4)
  adapter = finetune.lora_adapter(base, cfg, CFG, quantize=True)
  result = training.train(_run(tmp_path / "a", 4), adapter=adapter)
  losses = [r["loss"] for r in result.history]
  assert losses[-1] < losses[0], losses
  frozen = adapter.init(jax.random.key(1))["base"]
  jax.tree.map(
    np.testing.assert_array_equal, result.state.params["base"], frozen
  )
  merged = adapter.to_model(result.state.params)
  finetune.export(str(tmp_path / "merged"), merged, CFG, 4)
  loaded, loaded_cfg, step = training.load_model(str(tmp_path / "merged"))
  assert (loaded_cfg, step) == (CFG, 4)
  jax.tree.map(np.testing.assert_array_equal, loaded, merged)


def test_mask24_resumes_exactly_and_exports_two_of_four(base, tmp_path):
  """A run stopped at step 2 and resumed equals an uninterrupted one
  bitwise (the annealing follows the restored step); the weights stay
  frozen; the export keeps exactly 2 of every 4 masked weights."""
  cfg = adapt.MaskConfig(total_steps=4)
  adapter = finetune.mask_adapter(base, cfg)
  straight = training.train(_run(tmp_path / "a", 4, 4), adapter=adapter)
  training.train(_run(tmp_path / "b", 2), adapter=adapter)
  resumed = training.train(_run(tmp_path / "b", 4, 4), adapter=adapter)
  assert [r["step"] for r in resumed.history] == [3, 4]
  jax.tree.map(
    np.testing.assert_array_equal, resumed.state.params, straight.state.params
  )
  temperatures = [r["mask/temperature"] for r in straight.history]
  np.testing.assert_allclose(temperatures, 4 - 3.95 * np.arange(4) / 4)
  jax.tree.map(
    np.testing.assert_array_equal, straight.state.params["base"], base
  )
  sparse = adapter.to_model(straight.state.params)
  finetune.export(str(tmp_path / "sparse"), sparse, CFG, 4)
  loaded, _, _ = training.load_model(str(tmp_path / "sparse"))
  flat = adapt.paths.named_leaves(loaded)
  for name in straight.state.params["mask"]:
    groups = maskllm.to_groups(flat[name], name)
    np.testing.assert_array_equal(np.sum(groups != 0, -1), 2, err_msg=name)
  assert straight.history[-1]["eval/loss"] == resumed.history[-1]["eval/loss"]


def test_adapters_need_a_mesh_without_pipe(base, tmp_path):
  adapter = finetune.lora_adapter(base, adapt.LoraConfig(rank=4), CFG)
  config = dataclasses.replace(
    _run(tmp_path, 2),
    mesh="data=4,pipe=2",
    model=dataclasses.replace(CFG, num_layers=2),  # 2 stages
  )
  with pytest.raises(ValueError, match="adapters train without a pipe axis"):
    training.train(config, adapter=adapter)


def test_finetune_binary_bad_flags_are_one_error_line(base, tmp_path):
  run = str(tmp_path / "base")
  finetune.export(run, base, CFG, 0)
  ft = [f"--workdir={tmp_path / 'ft'}", f"--base={run}"]
  mask = [*ft, "--method=mask24"]
  tool_testing.assert_one_error_line_each(
    "tools.finetune",
    [
      (
        [f"--workdir={tmp_path}"],
        r"--base \(a tools/train.py run directory\) is required",
      ),
      (
        [f"--workdir={tmp_path}", "--base=/nonexistent"],
        "--base='/nonexistent': no complete checkpoint",
      ),
      ([*ft, "--lora_rank=0"], "--lora_rank must be a positive"),
      ([*mask, "--mask_temperature=4"], "--mask_temperature must be START,END"),
      ([*mask, "--mask_logit_scale=1,x"], "--mask_logit_scale must be a comma"),
      ([*mask, "--mask_prior_strength=-1"], "--mask_prior_strength must be"),
      ([*mask, "--mask_targets=embed"], "--mask_targets.*stay dense"),
      ([*mask, "--mask_targets=nope"], "--mask_targets. pattern 'nope'"),
      ([*mask, "--steps=0"], "--steps must be a positive"),
      ([*mask, "--lora_rank=4"], "--lora_rank is not used by --method=mask24"),
      ([*ft, "--mask_weight_reg=1"], "--mask_weight_reg is not used by --meth"),
    ],
  )


def test_finetune_binary_mask24_exports_a_two_of_four_model(base, tmp_path):
  """tools/finetune.py --method=mask24, shrunken: the export loads and its
  masked matrices keep 2 of every 4 weights; the rest is the base's."""
  run, out = str(tmp_path / "base"), str(tmp_path / "sparse")
  finetune.export(run, base, CFG, 0)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "tools.finetune",
      f"--base={run}",
      "--method=mask24",
      "--mask_targets=mlp",
      "--steps=2",
      "--batch_size=4",
      "--seq_len=16",
      "--eval_every=0",
      "--checkpoint_every=0",
      f"--workdir={tmp_path / 'ft'}",
      f"--export={out}",
    ],
    cwd=tool_testing.REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr
  sparse, cfg, step = training.load_model(out)
  assert (cfg, step) == (CFG, 2)
  flat, dense = adapt.paths.named_leaves(sparse), adapt.paths.named_leaves(base)
  masked = adapt.paths.match(base, (adapt.MLP,), "mlp")
  for name, w in flat.items():
    if name in masked:
      groups = maskllm.to_groups(w, name)
      np.testing.assert_array_equal(np.sum(groups != 0, -1), 2, err_msg=name)
    else:
      np.testing.assert_array_equal(w, dense[name], err_msg=name)


def test_full_fine_tuning_starts_from_the_base_and_trains_every_param(
  base, tmp_path
):
  result = training.train(
    _run(tmp_path, 2), adapter=finetune.full_adapter(base)
  )
  # Step 1's loss is the base model's on step 1's batch, before any update.
  batch = training.make_dataset(
    "corpus", seq_len=16, global_batch_size=8, seed=0
  ).batch(0)
  loss, _ = training.loss_fn(
    base, batch, jax.random.key(0), CFG, training.LossConfig()
  )
  assert result.history[0]["loss"] == pytest.approx(float(loss), rel=1e-6)
  changed = jax.tree.map(
    lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
    result.state.params,
    base,
  )
  assert all(jax.tree.leaves(changed))
