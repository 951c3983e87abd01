"""Decoding: the decode loop, jit and sampling. The caches are the mixers'
states (`layers.KVCache`, `layers.RingKVCache`, SnapKV in `layers.snapkv`),
re-exported here."""

from lightning_jax.layers import snapkv
from lightning_jax.layers.kv_cache import cache_bytes
from lightning_jax.layers.kv_cache import grouped_attention
from lightning_jax.layers.kv_cache import kv_cache_append
from lightning_jax.layers.kv_cache import kv_cache_step
from lightning_jax.layers.kv_cache import kv_cache_from_prompt
from lightning_jax.layers.kv_cache import KVCache
from lightning_jax.layers.kv_cache import ring_cache_append
from lightning_jax.layers.kv_cache import ring_cache_step
from lightning_jax.layers.kv_cache import ring_cache_from_prompt
from lightning_jax.layers.kv_cache import RingKVCache
from lightning_jax.layers.kv_cache import RingLayout
from lightning_jax.layers.snapkv import SnapKVConfig
from lightning_jax.layers.snapkv import compress as snapkv_compress
from lightning_jax.layers.snapkv import observation_scores
from lightning_jax.layers.snapkv import pool1d
from lightning_jax.layers.snapkv import select as snapkv_select
from lightning_jax.inference.sampling import sample
from lightning_jax.inference.sampling import SamplingConfig
from lightning_jax.inference.sampling import top_k_mask
from lightning_jax.inference.sampling import top_p_mask
from lightning_jax.inference.decode import decode_step
from lightning_jax.inference.decode import DecodeState
from lightning_jax.inference.decode import generate
from lightning_jax.inference.decode import generate_stream
from lightning_jax.inference.decode import prefill
from lightning_jax.inference.decode import prefill_jit
