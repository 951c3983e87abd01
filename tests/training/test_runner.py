"""The step runner: which variant a mesh and config choose, one loop step
with each, and checkpoints in one param layout that resume on any mesh."""

import jax
import numpy as np
import pytest

from lightning_jax import models
from lightning_jax import training
from lightning_jax.training import runner as runner_lib

MODEL = models.get_preset(
  "transformer", d_model=16, num_layers=4, num_heads=2, head_dim=8, d_ff=32
)
# (mesh, microbatches, schedule, repeats) -> the runner kind.
VARIANTS = {
  "sequential": ("data=8", 1, "gpipe", 1),
  "accumulation": ("data=8", 2, "gpipe", 1),
  "gpipe": ("data=4,pipe=2", 2, "gpipe", 1),
  "circular": ("data=4,pipe=2", 2, "circular", 2),
  "1f1b": ("data=4,pipe=2", 2, "1f1b", 1),
}


def _config(workdir, kind, steps, **kwargs):
  mesh, micro, schedule, repeats = VARIANTS[kind]
  defaults = dict(
    batch_size=16,
    seq_len=16,
    checkpoint_every=0,
    log_every=1,
    optim=training.OptimConfig(lr=1e-2, total_steps=steps, warmup_steps=0),
  )
  return training.TrainConfig(
    model=MODEL,
    workdir=str(workdir),
    steps=steps,
    mesh=mesh,
    microbatches=micro,
    pipeline_schedule=schedule,
    pipeline_repeats=repeats,
    **{**defaults, **kwargs},
  )


@pytest.mark.parametrize("kind", VARIANTS)
def test_make_runner_chooses_the_variant_and_its_layout(kind):
  config = _config("", kind, steps=1)
  axes = training.validate(config, num_devices=8)
  runner = runner_lib.make_runner(
    config, jax.sharding.AbstractMesh(tuple(axes.values()), tuple(axes))
  )
  assert runner.kind == runner.metadata["kind"] == kind
  assert runner.metadata["microbatches"] == config.microbatches
  params = models.init(jax.random.key(0), MODEL)
  laid_out = runner.to_layout(params)
  if kind in ("sequential", "accumulation"):
    assert laid_out is params
  else:
    assert "stages" in laid_out and "layers" not in laid_out
    assert (runner.metadata["stages"], runner.metadata["repeats"]) == (
      2,
      config.pipeline_repeats,
    )
  jax.tree.map(
    np.testing.assert_array_equal, runner.from_layout(laid_out), params
  )


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
  """A 2-step 1F1B run that checkpoints every step, then a data=8 run that
  resumes it to step 3, and an uninterrupted 3-step data=8 run: their loss
  curves, and the 1F1B run's step-2 checkpoint (state, metadata). Weight
  decay is off: its ndim >= 2 mask differs between stage-stacked and
  per-layer params."""
  workdir = tmp_path_factory.mktemp("runner")
  optim = training.OptimConfig(
    lr=1e-2, total_steps=3, warmup_steps=0, weight_decay=0.0
  )

  def run(name, kind, steps):
    config = _config(
      workdir / name, kind, steps, checkpoint_every=1, optim=optim
    )
    return [r["loss"] for r in training.train(config).history]

  losses = {"1f1b": run("resumed", "1f1b", 2)}
  checkpoint = training.CheckpointManager(
    workdir / "resumed" / "checkpoints"
  ).restore(2)
  losses["resumed"] = run("resumed", "sequential", 3)
  losses["reference"] = run("reference", "sequential", 3)
  return losses, checkpoint


def test_loop_takes_a_step_with_each_runner(tmp_path, pipelined):
  """Step 1's loss (at the initial params) agrees across runners (1F1B's
  and data=8's from the `pipelined` runs)."""
  runs, _ = pipelined
  losses = {
    kind: training.train(_config(tmp_path / kind, kind, 1)).history[0]["loss"]
    for kind in ("accumulation", "gpipe", "circular")
  }
  losses["1f1b"] = runs["1f1b"][0]
  want = runs["reference"][0]
  np.testing.assert_allclose(
    list(losses.values()), [want] * len(losses), rtol=1e-5
  )


def test_pipeline_checkpoint_is_in_the_init_layout_and_resumes_elsewhere(
  pipelined,
):
  """A 1F1B run checkpoints the models.init layout (params and Adam
  moments); a data=8 run resumes from it and continues as an uninterrupted
  data=8 run (rtol 1e-4)."""
  runs, (state, metadata) = pipelined
  init = models.init(jax.random.key(0), MODEL)
  assert state["params"].keys() == init.keys()
  assert [np.shape(x) for x in jax.tree.leaves(state["params"])] == [
    x.shape for x in jax.tree.leaves(init)
  ]
  assert metadata["runner"]["kind"] == "1f1b"
  np.testing.assert_allclose(
    runs["1f1b"] + runs["resumed"], runs["reference"], rtol=1e-4
  )
