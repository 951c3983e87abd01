"""tools/generate.py: restore params + config from a checkpoint, stream text."""

import dataclasses
import io

import jax
import numpy as np
import pytest

from lightning_jax import inference
from lightning_jax import models
from lightning_jax import training
from lightning_jax.parallel import pipeline
from tests import tool_testing
from tools import generate

CFG = models.get_preset(
  "tnl",
  num_layers=2,
  d_model=32,
  num_heads=2,
  head_dim=16,
  d_ff=64,
  chunk_size=4,
)


def _jsonable(cfg):
  return {
    k: list(v) if isinstance(v, tuple) else v
    for k, v in dataclasses.asdict(cfg).items()
  }


def test_restores_and_streams_greedy_text(tmp_path):
  params = models.init(jax.random.key(0), CFG)
  manager = training.CheckpointManager(tmp_path / generate.CHECKPOINT_DIR)
  manager.save(
    7, {"params": params, "step": np.int32(7)}, {"model_config": _jsonable(CFG)}
  )
  restored, cfg, step = generate.load_model(tmp_path)
  assert cfg == CFG and step == 7
  for a, b in zip(
    jax.tree.leaves(restored), jax.tree.leaves(params), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  out = io.StringIO()
  greedy = inference.SamplingConfig(temperature=0.0)
  prompt = generate.encode_prompt("ab", cfg.vocab_size)
  new, stats = generate.run(
    restored,
    cfg,
    prompt,
    max_new_tokens=4,
    key=jax.random.key(0),
    sampling_cfg=greedy,
    out=out,
  )
  want = inference.generate(
    params,
    prompt[None],
    np.array([2]),
    CFG,
    max_new_tokens=4,
    key=jax.random.key(1),
    sampling_cfg=greedy,
  )[0]
  np.testing.assert_array_equal(new, want)
  assert out.getvalue() == bytes(new.tolist()).decode("utf-8", "replace") + "\n"
  assert stats["prefill_tokens"] == 2 and stats["cache_bytes"] > 0


def test_restores_a_pipeline_checkpoint(tmp_path):
  # A mesh pipe=2 run saves stage-stacked params and a "pipeline" entry.
  params = models.init(jax.random.key(0), CFG)
  manager = training.CheckpointManager(tmp_path / generate.CHECKPOINT_DIR)
  manager.save(
    3,
    {"params": pipeline.to_pipeline_params(params, 2), "step": np.int32(3)},
    {"model_config": _jsonable(CFG), "pipeline": {"stages": 2, "repeats": 1}},
  )
  restored, cfg, step = generate.load_model(tmp_path)
  assert cfg == CFG and step == 3
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  for a, b in zip(
    jax.tree.leaves(restored), jax.tree.leaves(params), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_bad_metadata():
  with pytest.raises(ValueError, match="model_config"):
    generate.model_config_from_metadata({})
  with pytest.raises(ValueError, match="(?i)unknown"):
    generate.model_config_from_metadata({"model_config": {"bogus": 1}})


def test_bad_workdir_or_flag_is_one_error_line(tmp_path):
  """Missing / file / empty workdir, no or corrupt checkpoint, bad flags."""
  (tmp_path / "file").write_text("")
  (tmp_path / "empty" / generate.CHECKPOINT_DIR).mkdir(parents=True)
  manager = training.CheckpointManager(
    tmp_path / "bad" / generate.CHECKPOINT_DIR
  )
  manager.save(
    1, {"params": {}, "step": np.int32(1)}, {"model_config": {"x": 1}}
  )
  manager = training.CheckpointManager(
    tmp_path / "ok" / generate.CHECKPOINT_DIR
  )
  params = models.init(jax.random.key(0), CFG)
  manager.save(1, {"params": params}, {"model_config": _jsonable(CFG)})
  ok = f"--workdir={tmp_path / 'ok'}"
  tool_testing.assert_one_error_line_each(
    "tools.generate",
    [
      ([], "--workdir is required"),
      ([f"--workdir={tmp_path / 'none'}"], "does not exist"),
      ([f"--workdir={tmp_path / 'file'}"], "is not a directory"),
      ([f"--workdir={tmp_path}"], "no complete checkpoint"),
      ([f"--workdir={tmp_path / 'empty'}"], "no complete checkpoint"),
      ([f"--workdir={tmp_path / 'bad'}"], "(?i)unknown"),
      ([ok, "--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
      ([ok, "--top_p=2"], "top_p"),
      ([ok, "--step=5"], "5"),
    ],
  )
