r"""MaskLLM figures: validation loss of dense, magnitude 2:4 and learned 2:4.

Loads a model trained by `tools.train` (`training.load_model`), prunes its
attention and MLP matrices to 2:4 by magnitude, and trains MaskLLM logits
(weights frozen, the magnitude mask as prior) for `--steps` steps on the
run's training data; prints the validation loss of each on the same
`--eval_batches` validation batches and the fraction of the magnitude -> dense
gap the learned masks close.

Usage (from the repository root):
  python -m tools.train --steps=300 --workdir=/tmp/mask_base --eval_every=100
  python -m tools.bench_maskllm --workdir=/tmp/mask_base --steps=200
"""

from absl import app
from absl import flags
import jax
import numpy as np

from lightning_jax import adapt
from lightning_jax import models
from lightning_jax import training
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


def _datasets(record: dict):
  """The run's train and validation datasets (its data, batch, seq_len)."""

  def make(split):
    return training.make_dataset(
      record["data"],
      seq_len=record["seq_len"],
      global_batch_size=record["batch_size"],
      seed=_SEED.value,
      split=split,
    )

  return make("train"), make("validation")


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
  train_data, eval_data = _datasets(record)
  batches = [eval_data.batch(i) for i in range(_EVAL_BATCHES.value)]
  eval_loss = _eval_loss(cfg, batches)
  mask_cfg = adapt.MaskConfig(total_steps=_STEPS.value)

  key = jax.random.key(_SEED.value)
  params = {"base": base, "mask": maskllm.init(key, base, mask_cfg)}
  optim = training.OptimConfig(
    lr=_LR.value, total_steps=_STEPS.value, warmup_steps=0, weight_decay=0.0
  )
  opt = maskllm.freeze_base(training.make_optimizer(optim))
  step = jax.jit(
    maskllm.make_train_step(
      opt,
      training.learning_rate(optim),
      training.default_grad_fn(cfg, training.LossConfig()),
      mask_cfg,
    )
  )
  state = training.init_train_state(params, opt, key)
  initial = maskllm.apply(base, params["mask"], mask_cfg)
  for i in range(_STEPS.value):
    state, metrics = step(state, train_data.batch(i))
    if (i + 1) % 50 == 0 or i + 1 == _STEPS.value:
      print(
        f"step {i + 1}: loss {float(metrics['loss']):.4f} "
        f"tau {float(metrics['mask/temperature']):.3f}"
      )

  magnitude = maskllm.magnitude_masks(base, mask_cfg)
  learned = maskllm.masks(base, state.params["mask"], mask_cfg)
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
    "MaskLLM 2:4, step 0 (prior)": eval_loss(initial),
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
