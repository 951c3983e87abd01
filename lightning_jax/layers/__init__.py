"""Parameterised building blocks: pure (init, apply) pairs over dict pytrees."""

import importlib
import pkgutil

from lightning_jax.layers import mixers
from lightning_jax.layers.attention import apply_rope
from lightning_jax.layers.attention import attention_mixer
from lightning_jax.layers.attention import AttentionState
from lightning_jax.layers.attention import init_attention_state
from lightning_jax.layers.attention import attention_layer
from lightning_jax.layers.attention import attention_layer_probed
from lightning_jax.layers.attention import AttentionConfig
from lightning_jax.layers.attention import init_attention
from lightning_jax.layers.attention import with_moa_plan
from lightning_jax.layers.attention_experts import attention_experts_mixer
from lightning_jax.layers.attention_experts import AttentionExpertsConfig
from lightning_jax.layers.attention_experts import init_attention_experts
from lightning_jax.layers.kv_cache import cache_bytes
from lightning_jax.layers.kv_cache import grouped_attention
from lightning_jax.layers.kv_cache import kv_cache_append
from lightning_jax.layers.kv_cache import kv_cache_from_prompt
from lightning_jax.layers.kv_cache import kv_cache_step
from lightning_jax.layers.kv_cache import KVCache
from lightning_jax.layers.kv_cache import ring_cache_append
from lightning_jax.layers.kv_cache import ring_cache_from_prompt
from lightning_jax.layers.kv_cache import ring_cache_step
from lightning_jax.layers.kv_cache import RingKVCache
from lightning_jax.layers.kv_cache import RingLayout
from lightning_jax.layers.mixers import Decoding
from lightning_jax.layers.mixers import LayerSpec
from lightning_jax.layers.mixers import Mixer
from lightning_jax.layers.mixers import RECURRENT_IMPLS
from lightning_jax.layers.mixers import recurrent_impl
from lightning_jax.layers.mlp import init_mlp
from lightning_jax.layers.mlp import mlp
from lightning_jax.layers.mlp import MLPConfig
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
from lightning_jax.layers.recurrent import l2_normalize
from lightning_jax.layers.recurrent import Recurrence
from lightning_jax.layers.recurrent import register_recurrence
from lightning_jax.layers.recurrent import init_recurrent_state
from lightning_jax.layers.recurrent import recurrent_layer
from lightning_jax.layers.recurrent import RecurrentConfig
from lightning_jax.layers.recurrent import RecurrentState
from lightning_jax.layers.recurrent import short_conv
from lightning_jax.layers.recurrent import kinds as recurrent_kinds
from lightning_jax.layers.attention import IMPLS as ATTENTION_IMPLS
from lightning_jax.layers.mlp import dense_init
from lightning_jax.layers.snapkv import SnapKVConfig

# Import every module of this package, so that a mixer's file registers it
# (`layers.mixers.register`) without being named anywhere else.
for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")
