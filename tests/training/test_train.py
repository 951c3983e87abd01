"""The training loop end to end (in-process), across presets, meshes and
microbatching, plus NaN stops and flag validation.

Shapes are tiny and every run is a few steps: these tests check plumbing and
exact equivalences, not model quality.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from lightning_jax import models
from lightning_jax import training
from tests import tool_testing

REPO = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
TINY = dict(
  d_model=16,
  num_layers=2,
  num_heads=2,
  head_dim=8,
  d_ff=32,
  moe_d_ff=16,
  num_experts=4,
  chunk_size=8,
)


def _config(tmp_path, model="tiny-hybrid", num_layers=2, **kwargs):
  steps = kwargs.pop("steps", 4)
  optim = training.OptimConfig(
    lr=kwargs.pop("lr", 1e-2),
    total_steps=steps,
    warmup_steps=kwargs.pop("warmup_steps", 1),
  )
  defaults = dict(
    steps=steps,
    batch_size=8,
    seq_len=16,
    checkpoint_every=0,
    log_every=1,
    optim=optim,
  )
  return training.TrainConfig(
    model=models.get_preset(model, **dict(TINY, num_layers=num_layers)),
    workdir=str(tmp_path),
    **{**defaults, **kwargs},
  )


def test_training_run_loss_falls_and_writes_metrics_and_checkpoints(tmp_path):
  config = _config(
    tmp_path,
    steps=20,
    checkpoint_every=10,
    log_every=5,
    batch_size=16,
    seq_len=32,
    eval_every=10,
    eval_batches=2,
    profile_steps=(6, 2),
  )
  result = training.train(config)
  losses = [row["loss"] for row in result.history]
  assert [row["step"] for row in result.history] == [1, 5, 10, 15, 20]
  assert losses[-1] < losses[0] - 1.0, losses
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [r["loss"] for r in rows] == losses
  for key in ("step", "loss", "lr", "tokens_per_sec", "grad_norm"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-2, 0.2)
  manager = training.checkpoint.CheckpointManager(str(tmp_path / "checkpoints"))
  assert manager.all_steps() == [10, 20]
  assert int(result.state.step) == 20 == int(result.state.data_position)
  # Compile time, model FLOPs and the compiled step's memory once;
  # evaluations at 10 and the last step.
  once = ("compile_s", "flops_per_token", "compiled/peak_mb")
  assert [tuple(k in r for k in once) for r in rows] == [(True,) * 3] + [
    (False,) * 3
  ] * 4
  assert rows[0]["flops_per_token"] == models.flops_per_token(config.model, 32)
  assert 0 < rows[0]["compiled/arguments_mb"] < rows[0]["compiled/peak_mb"]
  assert [r["step"] for r in rows if "eval/loss" in r] == [10, 20]
  assert rows[-1]["eval/loss"] < rows[2]["eval/loss"]
  # The last evaluation, recomputed: the first 2 validation batches under
  # the final params.
  ce = hits = count = 0.0
  for i in range(2):
    batch = training.make_dataset(
      "corpus", seq_len=32, global_batch_size=16, seed=0, split="validation"
    ).batch(i)
    logits, _ = models.forward(
      result.state.params, batch["inputs"], config.model
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    target = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    ce -= float(np.sum(target * batch["mask"]))
    hits += float(
      np.sum((np.argmax(logits, -1) == batch["targets"]) * batch["mask"])
    )
    count += float(np.sum(batch["mask"]))
  assert rows[-1]["eval/loss"] == pytest.approx(ce / count, rel=1e-5)
  assert rows[-1]["eval/perplexity"] == pytest.approx(np.exp(ce / count), 1e-5)
  assert rows[-1]["eval/accuracy"] == hits / count
  traces = list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1, traces


# Timing and memory fields: they differ between any two runs.
_MEASURED = (
  "compile_s",
  "step_time",
  "tokens_per_sec",
  "host_memory_gb",
  "device_memory_gb",
)


def _computed(history):
  return [{k: v for k, v in r.items() if k not in _MEASURED} for r in history]


class _Plain:
  """A dataset of the protocol only: not one of the library's classes."""

  def __init__(self, dataset):
    self.vocab_size = dataset.vocab_size
    self._dataset = dataset

  def batch(self, step):
    return dict(self._dataset.batch(step))


def test_train_takes_any_dataset_of_the_protocol(tmp_path):
  config = _config(tmp_path / "a", num_layers=1, steps=2, eval_every=2)
  split = dict(seq_len=16, global_batch_size=8, seed=0)
  own = training.train(
    config,
    dataset=_Plain(training.make_dataset("corpus", **split)),
    eval_dataset=_Plain(
      training.make_dataset("corpus", split="validation", **split)
    ),
  )
  default = training.train(
    dataclasses.replace(config, workdir=str(tmp_path / "b"))
  )
  assert _computed(own.history) == _computed(default.history)
  assert [r["step"] for r in own.history if "eval/loss" in r] == [2]
  with pytest.raises(ValueError, match="`eval_dataset` is required"):
    training.train(
      config, dataset=_Plain(training.make_dataset("corpus", **split))
    )
  short = training.make_dataset("corpus", **dict(split, seq_len=8))
  with pytest.raises(
    ValueError,
    match=r"`dataset.batch\(0\)\['inputs'\]` must have shape .* \[8, 16\], "
    r"got \[8, 8\]",
  ):
    training.train(dataclasses.replace(config, eval_every=0), dataset=short)
  with pytest.raises(ValueError, match="`dataset` must have `vocab_size`"):
    training.train(config, dataset=object(), eval_dataset=object())


def _batch(key, cfg, batch_size=8, seq_len=16):
  tokens = jax.random.randint(key, (batch_size, seq_len + 1), 0, cfg.vocab_size)
  mask = (
    jax.random.uniform(jax.random.fold_in(key, 1), (batch_size, seq_len)) < 0.9
  ).astype(jnp.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


# tiny-hybrid and moe-hybrid train in the loop tests (end to end, meshes).
@pytest.mark.parametrize(
  "preset", sorted(set(models.preset_names()) - {"tiny-hybrid", "moe-hybrid"})
)
def test_each_preset_initialises_and_takes_a_step(preset):
  cfg = models.get_preset(preset, **TINY)
  if len(cfg.pattern) == 1 and len(cfg.ffn_pattern) == 1:
    cfg = dataclasses.replace(cfg, num_layers=1)  # every layer is alike
  params = models.init(jax.random.key(0), cfg)
  optim = training.OptimConfig(total_steps=10, warmup_steps=0)
  optimizer = training.make_optimizer(optim)
  state = training.init_train_state(params, optimizer, jax.random.key(1))
  step = jax.jit(
    training.make_train_step(
      optimizer,
      training.learning_rate(optim),
      training.default_grad_fn(cfg, training.LossConfig()),
    )
  )
  new_state, metrics = step(state, _batch(jax.random.key(2), cfg))
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
  assert int(new_state.step) == 1 == int(new_state.data_position)
  moved = jax.tree.map(
    lambda a, b: bool(jnp.any(a != b)), params, new_state.params
  )
  assert any(jax.tree.leaves(moved)), preset


def test_grad_accumulation_equals_one_batch_with_exact_global_lbl():
  """k=2 microbatches == one batch: CE, exact global LBL, z-loss, grads."""
  cfg = models.get_preset("moe-hybrid", **dict(TINY, num_layers=1))
  assert cfg.lbl_scope == "global" and cfg.ffns == ("moe",)
  params = models.init(jax.random.key(0), cfg)
  batch = _batch(jax.random.key(1), cfg)
  loss_cfg = training.LossConfig(lbl_coef=1.0, z_coef=0.1)
  key = jax.random.key(2)
  (l1, m1), g1 = jax.jit(training.default_grad_fn(cfg, loss_cfg, 1))(
    params, batch, key
  )
  (l2, m2), g2 = jax.jit(training.default_grad_fn(cfg, loss_cfg, 2))(
    params, batch, key
  )
  for name in ("loss", "ce_loss", "lbl_loss", "z_loss", "num_targets"):
    np.testing.assert_allclose(m2[name], m1[name], rtol=2e-6, err_msg=name)
  np.testing.assert_allclose(l2, l1, rtol=2e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g2, g1
  )
  # The test has teeth: per-microbatch f (a plain accumulation loop) differs.
  halves = training.split_microbatches(batch, 2)
  loss = jax.jit(training.loss_fn, static_argnums=(3, 4))
  naive = np.mean(
    [
      loss(params, half, key, cfg, loss_cfg)[1]["lbl_loss"]
      for half in (
        jax.tree.map(lambda x: x[0], halves),
        jax.tree.map(lambda x: x[1], halves),
      )
    ]
  )
  assert abs(naive - m1["lbl_loss"]) > 1e-4


def test_split_microbatches_strides_rows():
  x = jnp.arange(8)[:, None] * jnp.ones((1, 3), jnp.int32)
  split = training.split_microbatches({"inputs": x}, 2)["inputs"]
  np.testing.assert_array_equal(split[:, :, 0], [[0, 2, 4, 6], [1, 3, 5, 7]])
  with pytest.raises(ValueError, match="num_microbatches"):
    training.split_microbatches({"inputs": x}, 3)


# Per model: the run settings and the data=8 reference run's loss curve.
_CURVE_RUNS = {
  "moe-hybrid": dict(steps=4),
  "tiny-hybrid": dict(steps=3, seq_len=24),
  "transformer": dict(steps=3, pipeline_schedule="1f1b"),
}


@functools.cache
def _loss_curve(model, mesh, microbatches=1):
  with tempfile.TemporaryDirectory() as workdir:
    config = _config(
      workdir,
      model=model,
      mesh=mesh,
      microbatches=microbatches,
      **_CURVE_RUNS[model],
    )
    return [r["loss"] for r in training.train(config).history]


@pytest.mark.parametrize(
  "model, mesh, microbatches",
  [
    # MoE experts, heads, FFN and vocab split.
    ("moe-hybrid", "fsdp=2,tensor=2,expert=2", 1),
    # Sequence parallel: tiny-hybrid's 2 DeltaNet layers, 6 tokens per
    # device, chunks of 8, conv halos across devices (attention and every
    # mixer: tests/parallel/test_sequence_model.py).
    ("tiny-hybrid", "data=2,seq=4", 1),
    ("tiny-hybrid", "fsdp=2,seq=2,tensor=2", 1),
    ("moe-hybrid", "data=2,expert=2,seq=2", 1),
    # Pipeline (1F1B, 2 microbatches, stage-stacked params through the
    # grad_fn hook), and context-parallel attention inside its stages.
    ("transformer", "data=4,pipe=2", 2),
    ("transformer", "data=2,seq=2,pipe=2", 2),
  ],
)
def test_mesh_layouts_give_the_same_loss_curve(model, mesh, microbatches):
  """Same global batch and seed as data=8 (no microbatches): the loss
  curves agree up to fp32 reassociation (rtol 1e-4 over 3 or 4 steps)."""
  want = _loss_curve(model, "data=8")
  assert len(want) == _CURVE_RUNS[model]["steps"]
  np.testing.assert_allclose(
    _loss_curve(model, mesh, microbatches), want, rtol=1e-4
  )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  sane = dict(num_layers=1, warmup_steps=0, checkpoint_every=1)
  training.train(_config(tmp_path, steps=2, **sane))
  # lr 1e30: Adam moves every weight by ~1e30 in step 3 (its loss and
  # gradient, from step 2's params, are finite), so step 4 overflows. The
  # state after step 3 is never saved.
  with pytest.raises(
    training.NonFiniteLossError,
    match=r"at step 4: training stopped; the last good "
    r"checkpoint \(step 2\) is intact",
  ):
    training.train(_config(tmp_path, steps=6, lr=1e30, **sane))
  manager = training.checkpoint.CheckpointManager(str(tmp_path / "checkpoints"))
  assert manager.all_steps() == [1, 2]
  kept, _ = manager.restore(2, None)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(kept["params"]))
  resumed = training.train(_config(tmp_path, steps=4, **sane))
  assert [r["step"] for r in resumed.history] == [3, 4]
  assert all(np.isfinite(r["loss"]) for r in resumed.history)


def _bad(tmp_path, **kwargs):
  return dataclasses.replace(_config(tmp_path), **kwargs)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (
      dict(mesh="data=3"),
      r"--mesh='data=3' multiplies to 3 devices, but "
      r"there are 8",
    ),
    (
      dict(mesh="data=2,fsdp=2,tensor=2", batch_size=6),
      r"--batch_size=6 must be divisible by the data-parallel size .* = 4",
    ),
    (
      dict(mesh="data=2,seq=4", seq_len=18),
      r"--seq_len=18 must be divisible by the mesh's seq axis \(4\)",
    ),
    (dict(microbatches=3), r"--microbatches=3 = 24"),
    (
      dict(mesh="data=2,pipe=4"),
      r"num_layers=2 must be divisible by the "
      r"pipeline stages \(mesh pipe=4 x ",
    ),
    (
      dict(mesh="data=4,pipe=2", microbatches=2, pipeline_schedule="circular"),
      r"pipeline.*repeats",
    ),
    (dict(steps=0), r"--steps must be a positive integer"),
    (
      dict(checkpoint_every=1, keep_checkpoints=0),
      r"--keep_checkpoints must be >= 1, got 0",
    ),
    (dict(mesh="data=8,model=1"), r"axis in"),
  ],
)
def test_validate_rejects_bad_flags(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    training.validate(_bad(tmp_path, **kwargs), num_devices=8)


def test_train_binary_bad_flags_are_one_error_line_each(tmp_path):
  """Each bad flag set is one error line, no traceback, in one process. A
  bad MoA plan (missing, non-JSON, wrong row count) fails before
  compiling."""
  (tmp_path / "bad.json").write_text("{")
  (tmp_path / "rows.json").write_text(
    '{"alphas": [[1, 2, 3, 4]], "betas": [[0, 0, 0, 0]]}'
  )
  plan = lambda name: [
    f"--override=pattern=moa,deltanet,moa_plan={tmp_path / name}"
  ]
  cases = [
    (["--steps=1", "--model=nope"], "nope"),
    (
      ["--steps=1", "--override=vocab_size=10"],
      r"vocab_size 256 > the model's .* 10",
    ),
    (["--steps=1", "--lr=inf"], r"`lr` must be finite and > 0, got inf"),
    (
      ["--steps=1", "--optimizer=galore", "--galore_rank=0"],
      r"`galore_rank` must be a positive integer, got 0",
    ),
    (
      ["--steps=1", "--optimizer=co2", "--co2_local_steps=0"],
      r"--co2_local_steps must be a positive integer, got 0",
    ),
    (plan("none.json"), r"moa_plan=.*cannot read MoA plan .*No such file"),
    (plan("bad.json"), r"moa_plan=.*must be JSON"),
    (plan("rows.json"), r"one row per softmax-attention layer.* has 2 "),
  ]
  tool_testing.assert_one_error_line_each(
    "tools.train",
    [
      ([f"--workdir={tmp_path / f'run{i}'}", *flags], match)
      for i, (flags, match) in enumerate(cases)
    ],
  )


def test_overrides_parse_by_field_type():
  items = [
    "d_model=64,pattern=deltanet,attention",
    "window=none",
    "layerwise_ffn=0.5,4",
    "tie_embeddings=false,rope_theta=500",
    "mixer_options=deltanet.conv_size=2,deltanet.value_dim=16,num_layers=2",
  ]
  cfg = training.apply_overrides(
    models.get_preset("tiny-hybrid"), training.parse_overrides(items)
  )
  assert (
    cfg.d_model,
    cfg.pattern,
    cfg.window,
    cfg.layerwise_ffn,
    cfg.tie_embeddings,
    cfg.rope_theta,
    cfg.mixer_options,
    cfg.num_layers,
  ) == (
    64,
    ("deltanet", "attention"),
    None,
    (0.5, 4.0),
    False,
    500.0,
    ("deltanet.conv_size=2", "deltanet.value_dim=16"),
    2,
  )
  for bad, match in (
    (["width=3"], r"unknown field\(s\) \['width'\]"),
    (["d_model=x"], "d_model='x': expected int"),
    (["layerwise_ffn=1,2,3"], "layerwise_ffn"),
    (["=3"], "empty field name"),
  ):
    with pytest.raises(ValueError, match=match):
      training.apply_overrides(
        models.get_preset("tiny-hybrid"), training.parse_overrides(bad)
      )


def test_a_held_or_unwritable_workdir_fails_before_compiling(tmp_path):
  config = _config(tmp_path)
  with training.lock_workdir(str(tmp_path)):
    with pytest.raises(training.WorkdirError, match=r"in use by .* pid \d+"):
      training.train(config)
  with training.lock_workdir(str(tmp_path)):  # released with its holder
    pass
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("")
  with pytest.raises(training.WorkdirError, match="cannot be written"):
    training.train(dataclasses.replace(config, workdir=str(not_a_dir / "w")))
  blocked = tmp_path / "blocked"
  blocked.mkdir()
  (blocked / training.CHECKPOINT_DIR).write_text("")  # in the way
  with pytest.raises(
    training.WorkdirError, match=r"--checkpoint_dir: .* cannot be written"
  ):
    training.train(
      dataclasses.replace(config, workdir=str(blocked), checkpoint_every=1)
    )


def test_a_second_run_on_a_workdir_is_one_error_line_and_the_first_finishes(
  tmp_path,
):
  run = [
    sys.executable,
    "-m",
    "tools.train",
    f"--workdir={tmp_path}",
    "--batch_size=4",
    "--seq_len=16",
    "--checkpoint_every=0",
    "--log_every=50",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  first = subprocess.Popen(
    run + ["--steps=200"],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  lock = tmp_path / training.workdir.LOCK_FILE
  while f"pid {first.pid}" not in (lock.read_text() if lock.exists() else ""):
    assert first.poll() is None, first.communicate()
    time.sleep(0.05)
  second = subprocess.run(
    run + ["--steps=3"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err
  errors = [
    line for line in second.stderr.splitlines() if line.startswith("error:")
  ]
  assert second.returncode != 0 and len(errors) == 1, second.stderr
  assert "in use by another run" in errors[0]
  rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(row)["step"] for row in rows]
  assert steps == [1, 50, 100, 150, 200]


def test_resume_flags_take_saved_values_and_refuse_frozen_changes():
  saved = {"seed": 3, "lr": 0.02, "steps": 4, "log_every": 1, "override": []}
  given = {"seed": 0, "lr": 0.003, "steps": 8, "log_every": 5, "override": []}
  frozen = {"seed", "lr", "steps", "override"}
  kwargs = dict(frozen=frozen, growing={"steps"})
  values = training.resume_flags(saved, given, {"steps", "log_every"}, **kwargs)
  assert values == {**saved, "steps": 8, "log_every": 5}
  explicit = {"seed", "lr", "steps"}
  shrink = dict(given, steps=2)
  with pytest.raises(
    ValueError, match=r"--seed=3 -> 0, --lr=0.02 -> 0.003, --steps=4 -> 2; "
  ):
    training.resume_flags(saved, shrink, explicit, **kwargs)
  assert training.resume_flags(
    saved, shrink, explicit, allow_change=True, **kwargs
  ) == dict(shrink, log_every=1)


def test_rerun_on_a_workdir_takes_its_config_and_refuses_changes(tmp_path):
  def run(*flags):
    return subprocess.run(
      [sys.executable, "-m", "tools.train", f"--workdir={tmp_path}", *flags],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )

  first = run(
    "--override=d_model=16,num_layers=1,num_heads=2,head_dim=8,d_ff=32",
    "--steps=2",
    "--batch_size=4",
    "--seq_len=16",
    "--seed=3",
    "--lr=0.02",
    "--eval_every=0",
    "--log_every=1",
    "--checkpoint_every=1",
  )
  assert first.returncode == 0, first.stderr
  assert run("--steps=3").returncode == 0  # the rest from config.json
  saved = json.loads((tmp_path / "config.json").read_text())
  assert {k: saved["flags"][k] for k in ("steps", "seed", "lr", "seq_len")} == {
    "steps": 3,
    "seed": 3,
    "lr": 0.02,
    "seq_len": 16,
  }
  assert saved["train"]["optim"]["lr"] == 0.02
  rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
  changed = run("--steps=4", "--seed=4", "--seq_len=32")
  assert changed.returncode == 2
  assert changed.stderr.strip().splitlines() == [
    "error: this workdir's run was started with other values: --seq_len=16 "
    "-> 32, --seed=3 -> 4; rerun without them, pass --allow_config_change, "
    "or use a fresh --workdir."
  ]


def test_async_checkpoints_to_a_url_store_resume_and_load(tmp_path):
  url = "memory://test_train/ckpt/"
  config = _config(
    tmp_path,
    num_layers=1,
    steps=3,
    checkpoint_every=1,
    checkpoint_dir=url,
    metrics_dir="memory://test_train/metrics",
  )
  first = training.train(config)
  # A row reports the stall of the save before it, and the write time of
  # the save before that.
  assert "checkpoint/stall_s" in first.history[2]
  assert not (tmp_path / training.CHECKPOINT_DIR).exists()
  manager = training.CheckpointManager(url)
  assert manager.all_steps() == [1, 2, 3]
  resumed = training.train(dataclasses.replace(config, steps=5))
  assert [r["step"] for r in resumed.history] == [4, 5]
  assert manager.all_steps() == [3, 4, 5]
  params, _, step = training.load_model(str(tmp_path))
  assert step == 5
  metrics = ts.KvStore.open(
    "memory://test_train/metrics/", context=training.checkpoint.CONTEXT
  ).result()
  text = metrics.read(training.metrics.METRICS_FILE).result().value.decode()
  assert [json.loads(r)["step"] for r in text.splitlines()] == [1, 2, 3, 4, 5]
  assert not (tmp_path / training.metrics.METRICS_FILE).exists()
  jax.tree.map(np.testing.assert_array_equal, params, resumed.state.params)
