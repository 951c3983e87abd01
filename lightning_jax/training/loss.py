"""The LM training loss: masked next-token cross-entropy + MoE auxiliary losses.

    loss = CE + lbl_coef * sum_l LBL_l + z_coef * sum_l Z_l

over the MoE layers `l`. CE is the mean over the masked target positions of
the global batch, in float32. `LBL_l` (Fedus et al., 2021; docs/moe.md) has
the scope `model_cfg.lbl_scope`: "sequence" / "micro" from the layer's aux
output, "global" from its `lbl_pieces`, combined over every microbatch of the
step (`moe.load_balancing_loss_from_pieces`), so it is the loss of the whole
global batch whatever the microbatching. `Z_l` is the router z-loss (Zoph et
al., 2022, "ST-MoE", eq. 5).

The loss is built from per-microbatch sufficient statistics (`loss_stats`)
so that gradient accumulation (`training.step`) and pipelines can combine
microbatches exactly: `loss_from_stats` takes statistics stacked on a
leading microbatch axis.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lightning_jax import models
from lightning_jax.models import LossConfig


class LossStats(NamedTuple):
  """Sufficient statistics of the loss of one microbatch (or stacked `[M]`).

  Attributes:
    ce_sum: shape=(), float32 sum of masked token cross-entropies.
    num_targets: shape=(), float32 sum of the mask.
    moe: tuple over layers of `layers.MoEAux` (None for non-MoE layers).
  """

  ce_sum: jax.Array
  num_targets: jax.Array
  moe: tuple


def _check_batch(batch) -> None:
  """ValueError unless `batch` holds `[batch, seq]` inputs/targets/mask."""
  missing = {"inputs", "targets", "mask"} - set(batch)
  if missing:
    raise ValueError(
      f"`batch` must hold 'inputs', 'targets' and 'mask', "
      f"missing {sorted(missing)}."
    )
  shape = batch["inputs"].shape
  for name in ("inputs", "targets", "mask"):
    if batch[name].ndim != 2 or batch[name].shape != shape:
      raise ValueError(
        f"`batch['{name}']` must have shape [batch, seq] = "
        f"{shape}, got {batch[name].shape}."
      )


def loss_stats(params, batch, rng, model_cfg) -> LossStats:
  """Forward pass of one microbatch and its `LossStats`.

  Args:
    params: model parameters (`models.init`).
    batch: dict of `inputs` int32 `[batch, seq]`, `targets` int32
      `[batch, seq]` and `mask` float32 `[batch, seq]` (1 = scored position).
    rng: typed PRNG key; the current models are deterministic, so unused
      (kept so that stochastic models need no signature change).
    model_cfg: the `models.ModelConfig`.

  Returns:
    `LossStats` of this microbatch.
  """
  del rng
  _check_batch(batch)
  logits_BxTxV, aux = models.forward(params, batch["inputs"], model_cfg)
  ce_sum = models.masked_ce_sum(logits_BxTxV, batch["targets"], batch["mask"])
  return LossStats(
    ce_sum=ce_sum,
    num_targets=jnp.sum(batch["mask"].astype(jnp.float32)),
    moe=tuple(aux.moe),
  )


def loss_from_stats(stats: LossStats, model_cfg, loss_cfg: LossConfig):
  """The loss (`models.lm_loss`) of the union of microbatches from their
  stacked statistics.

  Args:
    stats: `LossStats` with a leading `[num_microbatches]` axis on every leaf
      (equal-sized microbatches).
    model_cfg: the `models.ModelConfig` (its `lbl_scope`).
    loss_cfg: `LossConfig`.

  Returns:
    `(loss, metrics)`: scalar float32 loss and a dict of scalars (`loss`,
    `ce_loss`, `lbl_loss`, `z_loss`, `num_targets`) plus per MoE layer `i`:
    `moe/{i}/lbl`, `moe/{i}/max_over_mean`, `moe/{i}/dropped_fraction` and
    the `[num_experts]` `moe/{i}/expert_load`, counted over all microbatches.
  """
  moe_stats = {
    i: models.MoEStats.from_aux(aux)
    for i, aux in enumerate(stats.moe)
    if aux is not None
  }
  return models.lm_loss(
    jnp.sum(stats.ce_sum),
    jnp.sum(stats.num_targets),
    moe_stats,
    model_cfg,
    loss_cfg,
  )


def loss_fn(params, batch, rng, model_cfg, loss_cfg: LossConfig):
  """Loss of one batch: `loss_from_stats` of a single microbatch.

  Args:
    params: model parameters.
    batch: dict of `inputs` / `targets` int32 `[batch, seq]`, `mask` float32
      `[batch, seq]`.
    rng: typed PRNG key (see `loss_stats`).
    model_cfg: the `models.ModelConfig`.
    loss_cfg: `LossConfig`.

  Returns:
    `(loss, metrics)` as `loss_from_stats`.

  Example:
    >>> grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    >>> (loss, metrics), grads = grad_fn(params, batch, key, cfg, LossConfig())
  """
  stats = loss_stats(params, batch, rng, model_cfg)
  return loss_from_stats(
    jax.tree.map(lambda x: x[None], stats), model_cfg, loss_cfg
  )
