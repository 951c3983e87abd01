r"""MaskLLM figures: validation loss of dense, magnitude 2:4 and learned 2:4.

Loads a model trained by `tools.train` (`training.load_model`), prunes its
attention and MLP matrices to 2:4 by magnitude, and trains MaskLLM logits
(weights frozen, the magnitude mask as prior) for `--steps` steps on the
run's training data through the training loop (`training.train` with
`adapt.finetune.mask_adapter`, as `tools/finetune.py --method=mask24`);
prints the validation loss of each on the same `--eval_batches` validation
batches and the fraction of the magnitude -> dense gap the learned masks
close.

Usage (from the repository root):
  python -m tools.train --steps=300 --workdir=/tmp/mask_base --eval_every=100
  python -m tools.bench_maskllm --workdir=/tmp/mask_base --steps=200
"""

import tempfile

from absl import app
from absl import flags
import jax
import numpy as np

from lightning_jax import adapt
from lightning_jax import models
from lightning_jax import training
from lightning_jax.adapt import finetune
from lightning_jax.adapt import maskllm
from tools import benchlib

_WORKDIR = flags.DEFINE_string(
  "workdir", "/tmp/mask_base", "Run of `tools.train` to sparsify."
)
_STEPS = flags.DEFINE_integer("steps", 200, "Mask-training steps.")
_LR = flags.DEFINE_float("lr", 5e-4, "Peak learning rate of the logits.")
_EVAL_BATCHES = flags.DEFINE_integer(
  "eval_batches", 8, "Validation batches of each evaluation."
)
_SEED = flags.DEFINE_integer("seed", 1, "Seed of the logits and batches.")


def _eval_loss(cfg: models.ModelConfig, batches):
  """`params -> mean validation cross-entropy` over `batches`."""

  @jax.jit
  def sums(params, batch):
    logits, _ = models.forward(params, batch["inputs"], cfg)
    ce = models.masked_ce_sum(logits, batch["targets"], batch["mask"])
    return ce, batch["mask"].sum()

  def loss(params):
    totals = np.sum([jax.device_get(sums(params, b)) for b in batches], 0)
    return float(totals[0] / totals[1])

  return loss


def main(argv):
  del argv
  base, cfg, base_step = training.load_model(_WORKDIR.value)
  record = training.read_run_config(_WORKDIR.value)["train"]
  eval_data = training.make_dataset(
    record["data"],
    seq_len=record["seq_len"],
    global_batch_size=record["batch_size"],
    seed=_SEED.value,
    split="validation",
  )
  batches = [eval_data.batch(i) for i in range(_EVAL_BATCHES.value)]
  eval_loss = _eval_loss(cfg, batches)
  mask_cfg = adapt.MaskConfig(total_steps=_STEPS.value)
  adapter = finetune.mask_adapter(base, mask_cfg)
  with tempfile.TemporaryDirectory() as workdir:
    result = training.train(
      training.TrainConfig(
        model=cfg,
        workdir=workdir,
        steps=_STEPS.value,
        batch_size=record["batch_size"],
        seq_len=record["seq_len"],
        seed=_SEED.value,
        data=record["data"],
        checkpoint_every=0,
        log_every=50,
        optim=training.OptimConfig(
          lr=_LR.value,
          total_steps=_STEPS.value,
          warmup_steps=0,
          weight_decay=0.0,
        ),
      ),
      adapter=adapter,
    )
  for row in result.history:
    print(
      f"step {row['step']}: loss {row['loss']:.4f} "
      f"tau {row['mask/temperature']:.3f} step_time {row['step_time']:.3f} s"
    )
  # A fresh draw of the initial logits (the loop's own is not kept).
  initial = maskllm.init(jax.random.key(_SEED.value), base, mask_cfg)
  magnitude = maskllm.magnitude_masks(base, mask_cfg)
  learned = maskllm.masks(base, result.state.params[maskllm.MASK], mask_cfg)
  changed = np.mean(
    [
      np.mean(
        np.any(
          maskllm.to_groups(learned[n], n)
          != maskllm.to_groups(magnitude[n], n),
          axis=-1,
        )
      )
      for n in learned
    ]
  )
  losses = {
    "dense": eval_loss(base),
    "magnitude 2:4": eval_loss(maskllm.prune(base, magnitude)),
    "MaskLLM 2:4, step 0 (prior)": eval_loss(
      maskllm.apply(base, initial, mask_cfg)
    ),
    f"MaskLLM 2:4, {_STEPS.value} steps": eval_loss(
      maskllm.prune(base, learned)
    ),
  }
  gap = losses["magnitude 2:4"] - losses["dense"]
  rows = [
    {
      "weights": name,
      "eval loss": f"{loss:.4f}",
      "gap closed": f"{(losses['magnitude 2:4'] - loss) / gap:+.1%}",
    }
    for name, loss in losses.items()
  ]
  print(
    f"base {_WORKDIR.value} step {base_step}; {len(learned)} masked "
    f"matrices; groups differing from magnitude: {changed:.1%}"
  )
  print(benchlib.markdown_table(rows))


if __name__ == "__main__":
  app.run(main)
