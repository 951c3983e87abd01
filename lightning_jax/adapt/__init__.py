"""Transforms of trained params: NF4 / QLoRA with bitsandbytes-compatible
bytes, LoRA on any parameter tree, MaskLLM learnable 2:4 sparsity
(docs/adapt.md); upcycling dense models into MoEs (docs/upcycling.md)."""

from lightning_jax.adapt.nf4 import absmax_of
from lightning_jax.adapt.nf4 import bits_per_param
from lightning_jax.adapt.nf4 import DYNAMIC_MAP
from lightning_jax.adapt.nf4 import dynamic_dequantize
from lightning_jax.adapt.nf4 import dynamic_quantize
from lightning_jax.adapt.nf4 import folded_shape
from lightning_jax.adapt.nf4 import from_nf4
from lightning_jax.adapt.nf4 import NF4_LEVELS
from lightning_jax.adapt.nf4 import nf4_dequantize
from lightning_jax.adapt.nf4 import nf4_quantize
from lightning_jax.adapt.nf4 import NF4Tensor
from lightning_jax.adapt.nf4 import to_nf4
from lightning_jax.adapt.paths import ATTENTION
from lightning_jax.adapt.paths import MatrixView
from lightning_jax.adapt.paths import matrix_view
from lightning_jax.adapt.paths import MIXER
from lightning_jax.adapt.paths import MLP
from lightning_jax.adapt import frozen
from lightning_jax.adapt import lora
from lightning_jax.adapt import maskllm
from lightning_jax.adapt import qlora
from lightning_jax.adapt import upcycle
from lightning_jax.adapt.lora import LoraConfig
from lightning_jax.adapt.maskllm import MaskConfig
