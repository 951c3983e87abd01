"""Training: train state and step, optax optimiser, loss, data, checkpoints,
metric writers and the loop that `tools/train.py` runs (docs/training.md)."""

# traincore: state, optimiser, loss, step, metrics, loop.
from lightning_jax.training.loop import NonFiniteLossError
from lightning_jax.training.loop import train
from lightning_jax.training.loop import TrainConfig
from lightning_jax.training.loop import TrainResult
from lightning_jax.training.loop import validate
from lightning_jax.training.loss import loss_fn
from lightning_jax.training.loss import loss_from_stats
from lightning_jax.training.loss import loss_stats
from lightning_jax.training.loss import LossConfig
from lightning_jax.training.loss import LossStats
from lightning_jax.training.metrics import MetricWriter
from lightning_jax.training.optim import learning_rate
from lightning_jax.training.optim import make_optimizer
from lightning_jax.training.optim import OptimConfig
from lightning_jax.training.state import init_train_state
from lightning_jax.training.state import TrainState
from lightning_jax.training.step import default_grad_fn
from lightning_jax.training.step import make_train_step
from lightning_jax.training.step import microbatched_loss
from lightning_jax.training.step import split_microbatches
