"""Parameterised building blocks as pure (init, apply) pairs over dicts."""

from lightning_jax.layers.attention import apply_rope
from lightning_jax.layers.attention import attention_layer
from lightning_jax.layers.attention import attention_layer_probed
from lightning_jax.layers.attention import AttentionConfig
from lightning_jax.layers.attention import init_attention
from lightning_jax.layers.attention import with_moa_plan
from lightning_jax.layers.moa_profile import attention_influence
from lightning_jax.layers.moa_profile import attention_lm_loss
from lightning_jax.layers.moa_profile import attention_lm_loss_probed
from lightning_jax.layers.moa_profile import AttentionLMConfig
from lightning_jax.layers.moa_profile import init_attention_lm
from lightning_jax.layers.moa_profile import PlanSearch
from lightning_jax.layers.moa_profile import profile_attention_lm
from lightning_jax.layers.moa_profile import search_attention_lm_plan
