"""Training: train state and step, optimisers, data, checkpoints, metrics,
and the loop that `tools/train.py` runs (docs/training.md)."""

# --- data and checkpoints (ckptdata) ---
from lightning_jax.training import checkpoint
from lightning_jax.training import data
from lightning_jax.training.checkpoint import CheckpointError
from lightning_jax.training.checkpoint import CheckpointManager
from lightning_jax.training.data import Dataset
from lightning_jax.training.data import decode_bytes
from lightning_jax.training.data import encode_bytes
from lightning_jax.training.data import make_dataset
from lightning_jax.training.data import mqar_accuracy
from lightning_jax.training.data import MQARConfig
# --- end data and checkpoints (ckptdata) ---

# --- state, optimiser, loss, step, metrics, loop (traincore) ---
from lightning_jax.training import co2
from lightning_jax.training import galore
from lightning_jax.training.co2 import CO2State
from lightning_jax.training.galore import GaLoreState
from lightning_jax.training.galore import matrix_axes
from lightning_jax.training.galore import MatrixAxes
from lightning_jax.training.galore import scale_by_galore
from lightning_jax.training.loop import Adapter
from lightning_jax.training.loop import CHECKPOINT_DIR
from lightning_jax.training.loop import load_model
from lightning_jax.training.loop import model_config_from_metadata
from lightning_jax.training.loop import NonFiniteLossError
from lightning_jax.training.loop import save_initial_state
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
from lightning_jax.training.overrides import apply_overrides
from lightning_jax.training.overrides import parse_overrides
from lightning_jax.training.optim import default_warmup_steps
from lightning_jax.training.optim import learning_rate
from lightning_jax.training.optim import make_optimizer
from lightning_jax.training.optim import CO2Config
from lightning_jax.training.optim import GaLoreConfig
from lightning_jax.training.optim import OptimConfig
from lightning_jax.training.optim import OPTIMIZERS
from lightning_jax.training.runner import make_runner
from lightning_jax.training.runner import relayout_state
from lightning_jax.training.runner import StepRunner
from lightning_jax.training.state import init_train_state
from lightning_jax.training.state import TrainState
from lightning_jax.training.step import default_grad_fn
from lightning_jax.training.step import make_train_step
from lightning_jax.training.step import microbatched_loss
from lightning_jax.training.step import split_microbatches
from lightning_jax.training.workdir import lock_workdir
from lightning_jax.training.workdir import read_run_config
from lightning_jax.training.workdir import resume_flags
from lightning_jax.training.workdir import WorkdirError
# --- end traincore ---
