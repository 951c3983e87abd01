"""Parameterised building blocks: pure (init, apply) pairs over dict pytrees."""

from lightning_jax.layers.attention import apply_rope
from lightning_jax.layers.attention import attention_layer
from lightning_jax.layers.attention import attention_layer_probed
from lightning_jax.layers.attention import AttentionConfig
from lightning_jax.layers.attention import init_attention
from lightning_jax.layers.attention import with_moa_plan
from lightning_jax.layers.mlp import init_mlp
from lightning_jax.layers.mlp import mlp
from lightning_jax.layers.mlp import MLPConfig
from lightning_jax.layers.moa_profile import attention_influence
from lightning_jax.layers.moe import init_mh_moe
from lightning_jax.layers.moe import init_moe
from lightning_jax.layers.moe import MHMoEConfig
from lightning_jax.layers.moe import mh_moe
from lightning_jax.layers.moe import moe
from lightning_jax.layers.moe import MoEAux
from lightning_jax.layers.moe import MoEConfig
from lightning_jax.layers.norms import init_rms_norm
from lightning_jax.layers.norms import rms_norm
from lightning_jax.layers.norms import simple_rms_norm
from lightning_jax.layers.recurrent import init_recurrent
from lightning_jax.layers.recurrent import init_recurrent_state
from lightning_jax.layers.recurrent import recurrent_layer
from lightning_jax.layers.recurrent import RecurrentConfig
from lightning_jax.layers.recurrent import RecurrentState
from lightning_jax.layers.recurrent import short_conv
from lightning_jax.layers.recurrent import IMPLS as RECURRENT_IMPLS
from lightning_jax.layers.recurrent import KINDS as RECURRENT_KINDS
from lightning_jax.layers.attention import IMPLS as ATTENTION_IMPLS
from lightning_jax.layers.mlp import dense_init
