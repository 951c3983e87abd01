"""MoA profiling of a model: the attention influence of every softmax
attention layer's heads.

MoA (Fu et al., 2024, arXiv 2406.14909, Sec. 4). The influence formula is in
`moa.influence`. Recurrent mixers, MLPs and MoE layers run unchanged; each
dense attention layer exposes its weights A through a zero probe whose
gradient is dL/dA.
"""

import jax
import jax.numpy as jnp

from lightning_jax import layers
from lightning_jax import models
from lightning_jax.layers import mixers
from lightning_jax.moa import influence


def next_token_loss(logits_BxTxV, tokens_BxT):
  """Mean cross-entropy of predicting `tokens[:, t + 1]` from position t."""
  logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), -1)
  target = tokens_BxT[:, 1:, None]
  return -jnp.mean(jnp.take_along_axis(logp, target, axis=-1))


def _check_profilable(cfg: models.ModelConfig):
  if not cfg.attention_layers:
    raise ValueError(
      f"`cfg` has no softmax-attention layer to profile (mixers {cfg.mixers})."
    )
  for i in cfg.attention_layers:
    if cfg.mixers[i] != "attention" or cfg.window is not None:
      raise ValueError(
        "Profile the dense model: every softmax-attention "
        f"layer must be a dense 'attention' mixer (layer {i}: "
        f"{cfg.mixers[i]!r}, window {cfg.window})."
      )


def loss_probed(params, tokens_BxT, cfg: models.ModelConfig, probes):
  """The LM loss with `probes[i]` `[B, H, T, T]` added to the weights of the
  i-th attention layer.

  Returns:
    `(loss, [A_i [B, H, T, T] per attention layer])`.
  """
  params = models.cast_params(params, models.compute_dtype(cfg))
  h = models.embed(params, tokens_BxT, cfg)
  probes, weights = iter(probes), []
  for layer_params, block in zip(
    params["layers"], models.block_configs(cfg), strict=True
  ):
    if mixers.get(block.kind).softmax:
      probe = next(probes)
      mixer = lambda x, b=block, p=layer_params, pr=probe: (
        layers.attention_layer_probed(p["mixer"], x, b.mixer, pr)
      )
      h, _, a = models.block_with_mixer(layer_params, h, block, mixer)
      weights.append(a)
    else:
      h, _, _ = models.apply_block(layer_params, h, block)
  return next_token_loss(models.head(params, h, cfg), tokens_BxT), weights


def profile_model(params, tokens_BxT, cfg: models.ModelConfig, block: int):
  """Block influence `[attention layers, heads, n_blocks, n_blocks]` on one
  batch.

  Example:
    >>> e = profile_model(params, tokens, models.get_preset("transformer"), 16)
  """
  _check_profilable(cfg)
  batch, seq = tokens_BxT.shape
  zeros = [
    jnp.zeros((batch, models.block_configs(cfg)[i].mixer.num_heads, seq, seq))
    for i in cfg.attention_layers
  ]
  grads, weights = jax.grad(loss_probed, argnums=3, has_aux=True)(
    params, tokens_BxT, cfg, zeros
  )
  return jnp.stack(
    [
      influence.attention_influence(a, g, block)
      for a, g in zip(weights, grads, strict=True)
    ]
  )
