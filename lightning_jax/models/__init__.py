"""Decoder LMs from a per-layer block pattern, with presets."""

from lightning_jax.models.config import block_configs
from lightning_jax.models.config import BlockConfig
from lightning_jax.models.config import FFNS
from lightning_jax.models.config import layer_widths
from lightning_jax.models.config import ModelConfig
from lightning_jax.models.config import moe_lbl_scope
from lightning_jax.models.loss import lm_loss
from lightning_jax.models.loss import LossConfig
from lightning_jax.models.loss import masked_ce_sum
from lightning_jax.models.loss import MoEStats
from lightning_jax.models.model import apply_block
from lightning_jax.models.model import block_with_mixer
from lightning_jax.models.model import cast_params
from lightning_jax.models.model import compute_dtype
from lightning_jax.models.model import embed
from lightning_jax.models.model import forward
from lightning_jax.models.model import head
from lightning_jax.models.model import init
from lightning_jax.models.model import init_block
from lightning_jax.models.model import ModelAux
from lightning_jax.models.model import num_params
from lightning_jax.models.model import run_blocks
from lightning_jax.models.presets import get_preset
from lightning_jax.models.presets import preset_names
from lightning_jax.models.presets import PRESETS
