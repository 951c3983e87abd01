"""Training: train state and step, optimisers, data, checkpoints, metrics."""

# --- data and checkpoints (ckptdata) ---
from lightning_jax.training import checkpoint
from lightning_jax.training import data
from lightning_jax.training.checkpoint import CheckpointError
from lightning_jax.training.checkpoint import CheckpointManager
from lightning_jax.training.data import decode_bytes
from lightning_jax.training.data import encode_bytes
from lightning_jax.training.data import make_dataset
from lightning_jax.training.data import mqar_accuracy
from lightning_jax.training.data import MQARConfig
# --- end data and checkpoints (ckptdata) ---
