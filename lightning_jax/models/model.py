"""The decoder LM as pure functions: `init`, `forward`, and the pieces
(`embed`, `run_blocks`, `head`) that the pipeline and the decoder compose.
`run_blocks` is the one loop over blocks, for training, prefill and a decode
step alike; each token mixer comes from the registry (`layers.mixers`).

Block (pre-norm residual):

    h = h + mixer(norm(h));  h = h + ffn(norm(h))        (sequential)
    x = norm(h);  h = h + mixer(x) + ffn(x)               (parallel form)
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax import layers
from lightning_jax.layers import mixers
from lightning_jax.models.config import BlockConfig
from lightning_jax.models.config import block_configs
from lightning_jax.models.config import ModelConfig
from lightning_jax.models.config import moe_lbl_scope


class ModelAux(NamedTuple):
  """Auxiliary outputs of `forward`.

  Attributes:
    moe: per layer, the `layers.MoEAux` of a MoE channel mixer, else None.
  """

  moe: tuple[layers.MoEAux | None, ...]


def compute_dtype(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


def _init_ffn(key, ffn_cfg) -> dict:
  if isinstance(ffn_cfg, layers.MLPConfig):
    return layers.init_mlp(key, ffn_cfg)
  if isinstance(ffn_cfg, layers.MoEConfig):
    return layers.init_moe(key, ffn_cfg)
  return layers.init_mh_moe(key, ffn_cfg)


def init_block(key, block: BlockConfig, *, layer: int, num_layers: int) -> dict:
  """One block's params: `mixer_norm`, `mixer`, `ffn_norm` (not in the
  parallel form) and `ffn`."""
  k_mixer, k_ffn = jax.random.split(key)
  d_model = block.mixer.d_model
  params = {
    "mixer_norm": layers.init_rms_norm(d_model),
    "mixer": mixers.get(block.kind).init(
      k_mixer, block.mixer, layer=layer, num_layers=num_layers
    ),
    "ffn": _init_ffn(k_ffn, block.ffn),
  }
  if not block.parallel:
    params["ffn_norm"] = layers.init_rms_norm(d_model)
  return params


def init(key, cfg: ModelConfig) -> dict:
  """Float32 params `{"embed": [V, D], "layers": (block params, ...),
  "final_norm": {"scale": [D]}, "unembed": [D, V] (untied only)}`.

  Example:
    >>> params = init(jax.random.key(0), ModelConfig(num_layers=2))
    >>> len(params["layers"]), params["embed"].shape
    (2, (256, 128))
  """
  blocks = block_configs(cfg)
  k_embed, k_head, *k_layers = jax.random.split(key, 2 + cfg.num_layers)
  params = {
    "embed": jax.random.normal(k_embed, (cfg.vocab_size, cfg.d_model)),
    "layers": tuple(
      init_block(k, b, layer=i, num_layers=cfg.num_layers)
      for i, (k, b) in enumerate(zip(k_layers, blocks, strict=True))
    ),
    "final_norm": layers.init_rms_norm(cfg.d_model),
  }
  if not cfg.tie_embeddings:
    params["unembed"] = layers.dense_init(
      k_head, (cfg.d_model, cfg.vocab_size), jnp.float32
    )
  return params


def num_params(cfg: ModelConfig) -> int:
  """Parameter count, from shapes only (nothing is allocated)."""
  shapes = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def cast_params(params, dtype):
  """Matrices (>= 2-D) in `dtype` for compute; vectors, scalars (norm scales,
  decays) and MoE routers stay float32."""

  def cast(path, x):
    keep = any(getattr(k, "key", None) == "router" for k in path)
    return x if keep or x.ndim < 2 else x.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


def embed(params, tokens_BxT, cfg: ModelConfig):
  """Token embeddings `[batch, seq, d_model]` in the compute dtype."""
  _checks.check_rank("tokens_BxT", tokens_BxT, 2, "[batch, seq]")
  if not jnp.issubdtype(jnp.asarray(tokens_BxT).dtype, jnp.integer):
    raise ValueError(
      f"`tokens_BxT` must be integer token ids, got dtype "
      f"{jnp.asarray(tokens_BxT).dtype}."
    )
  return jnp.take(params["embed"], tokens_BxT, axis=0).astype(
    compute_dtype(cfg)
  )


def head(params, h_BxTxD, cfg: ModelConfig):
  """Final RMSNorm and unembedding: float32 logits `[batch, seq, vocab]`.

  Tied: `norm(h) E^T / sqrt(D)` (the embedding has unit-variance rows, so
  logits start O(1)); untied: `norm(h) W_unembed`.
  """
  x = layers.rms_norm(params["final_norm"], h_BxTxD, cfg.norm_eps)
  if cfg.tie_embeddings:
    return (
      jnp.einsum(
        "btd,vd->btv",
        x,
        params["embed"].astype(x.dtype),
        preferred_element_type=jnp.float32,
      )
      * cfg.d_model**-0.5
    )
  return jnp.einsum(
    "btd,dv->btv",
    x,
    params["unembed"].astype(x.dtype),
    preferred_element_type=jnp.float32,
  )


def _apply_ffn(params, x_BxTxD, block: BlockConfig, lbl_axis, expert_axis):
  ffn_cfg = block.ffn
  if isinstance(ffn_cfg, layers.MLPConfig):
    return layers.mlp(params, x_BxTxD, ffn_cfg), None
  moe_cfg = ffn_cfg if isinstance(ffn_cfg, layers.MoEConfig) else (ffn_cfg.moe)
  if lbl_axis is not None:
    moe_cfg = dataclasses.replace(
      moe_cfg, lbl_scope=moe_lbl_scope(block.lbl_scope, lbl_axis)
    )
  kw = dict(lbl_axis=lbl_axis, expert_axis=expert_axis)
  if isinstance(ffn_cfg, layers.MoEConfig):
    return layers.moe(params, x_BxTxD, moe_cfg, **kw)
  return layers.mh_moe(
    params, x_BxTxD, layers.MHMoEConfig(ffn_cfg.num_heads, moe_cfg), **kw
  )


def block_with_mixer(
  params,
  h_BxTxD,
  block: BlockConfig,
  mixer_fn: Callable[[Any], tuple[Any, Any]],
  *,
  lbl_axis=None,
  expert_axis=None,
):
  """A block whose token mixer is `mixer_fn(normed x) -> (y, extra)`.

  `apply_block` passes the registered mixer; MoA profiling passes a probed
  attention.

  Returns:
    `(h [batch, seq, d_model], MoEAux or None, extra)`.
  """
  x = layers.rms_norm(params["mixer_norm"], h_BxTxD, block.norm_eps)
  mixed, extra = mixer_fn(x)
  if block.parallel:
    y, aux = _apply_ffn(params["ffn"], x, block, lbl_axis, expert_axis)
    return h_BxTxD + mixed + y, aux, extra
  h = h_BxTxD + mixed
  y, aux = _apply_ffn(
    params["ffn"],
    layers.rms_norm(params["ffn_norm"], h, block.norm_eps),
    block,
    lbl_axis,
    expert_axis,
  )
  return h + y, aux, extra


def apply_block(
  params,
  h_BxTxD,
  block: BlockConfig,
  state=None,
  decoding: layers.Decoding | None = None,
  *,
  lbl_axis=None,
  expert_axis=None,
):
  """One block `[batch, seq, d_model] -> [batch, seq, d_model]`.

  Args:
    params: the block's params (compute dtype, see `cast_params`).
    h_BxTxD: residual stream.
    block: its `BlockConfig`.
    state: the mixer's decoding state (None to train), see `layers.mixers`.
    decoding: the prefill / step context (None to train).
    lbl_axis: mesh axes of an exact global LBL inside `shard_map` (MoE).
    expert_axis: mesh axis sharding the experts inside `shard_map` (MoE).

  Returns:
    `(h, MoEAux or None, the mixer's new state)`.
  """
  apply = mixers.get(block.kind).apply
  return block_with_mixer(
    params,
    h_BxTxD,
    block,
    lambda x: apply(params["mixer"], x, block.mixer, state, decoding),
    lbl_axis=lbl_axis,
    expert_axis=expert_axis,
  )


def run_blocks(
  layer_params,
  h_BxTxD,
  blocks,
  states=None,
  decoding: layers.Decoding | None = None,
  *,
  remat=False,
  lbl_axis=None,
  expert_axis=None,
):
  """Runs blocks in order: training (no states), prefill or a decode step.

  Args:
    layer_params: per-layer params (compute dtype).
    h_BxTxD: residual stream entering the first block.
    blocks: their `BlockConfig`s.
    states: per-layer mixer states (None to train).
    decoding: prefill / step context (None to train).
    remat: rematerialise each block in the backward pass.
    lbl_axis: see `apply_block`.
    expert_axis: see `apply_block`.

  Returns:
    `(h, per-layer MoEAux or None, per-layer new states)`.
  """
  block_fn = apply_block
  if remat:
    block_fn = jax.checkpoint(apply_block, static_argnums=(2,))
  states = (None,) * len(blocks) if states is None else states
  auxes, new_states = [], []
  for params, block, state in zip(layer_params, blocks, states, strict=True):
    h_BxTxD, aux, state = block_fn(
      params,
      h_BxTxD,
      block,
      state,
      decoding,
      lbl_axis=lbl_axis,
      expert_axis=expert_axis,
    )
    auxes.append(aux)
    new_states.append(state)
  return h_BxTxD, tuple(auxes), tuple(new_states)


def forward(
  params, tokens_BxT, cfg: ModelConfig, *, lbl_axis=None, expert_axis=None
):
  """Logits of every position.

  Args:
    params: from `init` (float32; cast to `cfg.dtype` for compute here).
    tokens_BxT: int token ids `[batch, seq]`.
    cfg: the `ModelConfig`.
    lbl_axis: see `apply_block`.
    expert_axis: see `apply_block`.

  Returns:
    `(logits [batch, seq, vocab] float32, ModelAux)`.

  Example:
    >>> cfg = ModelConfig(num_layers=2)
    >>> logits, aux = forward(init(jax.random.key(0), cfg),
    ...                       jnp.zeros((1, 8), jnp.int32), cfg)
    >>> logits.shape
    (1, 8, 256)
  """
  params = cast_params(params, compute_dtype(cfg))
  h, auxes, _ = run_blocks(
    params["layers"],
    embed(params, tokens_BxT, cfg),
    block_configs(cfg),
    remat=cfg.remat,
    lbl_axis=lbl_axis,
    expert_axis=expert_axis,
  )
  return head(params, h, cfg), ModelAux(auxes)
