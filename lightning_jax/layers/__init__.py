"""Parameterised building blocks: pure (init, apply) pairs over dict pytrees."""

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
