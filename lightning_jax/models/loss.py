"""The LM loss formula and its cross-entropy, shared by `training.loss` and
the pipeline.

    loss = CE + lbl_coef * sum_l LBL_l + z_coef * sum_l Z_l

over the MoE layers `l`, from statistics summed or stacked over the
microbatches of a step; docs/moe.md and `training.loss` explain the terms.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lightning_jax import moe


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Coefficients of the auxiliary losses.

  Attributes:
    lbl_coef: weight of each MoE layer's load-balancing loss.
    z_coef: weight of each MoE layer's router z-loss.
  """

  lbl_coef: float = 0.01
  z_coef: float = 1e-3

  def __post_init__(self):
    for name in ("lbl_coef", "z_coef"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")


class MoEStats(NamedTuple):
  """What the loss needs from one MoE layer, per microbatch (leading `[M]`).

  Attributes:
    pieces: `moe.LBLPieces` of the microbatch's tokens.
    lbl: shape=(), the layer's own-scope LBL ("micro" / "sequence").
    z: shape=(), router z-loss (mean over the microbatch's tokens).
    dropped: shape=(), share of routing slots dropped by capacity.
  """

  pieces: moe.LBLPieces
  lbl: jax.Array
  z: jax.Array
  dropped: jax.Array

  @classmethod
  def from_aux(cls, aux) -> "MoEStats":
    """From a `layers.MoEAux`."""
    return cls(
      aux.lbl_pieces,
      aux.load_balancing_loss,
      aux.router_z_loss,
      aux.load.dropped_fraction,
    )


def masked_ce_sum(logits_BxTxV, targets_BxT, mask_BxT):
  """`sum(mask * cross_entropy)` of next-token targets, float32 scalar.

  The logits are cast to float32 first (bf16 compute keeps an fp32 loss).
  """
  logits = logits_BxTxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[
    ..., 0
  ]
  return jnp.sum(mask_BxT.astype(jnp.float32) * (lse - target_logit))


def lm_loss(ce_sum, num_targets, moe_stats, model_cfg, loss_cfg):
  """`CE + lbl_coef * sum_l LBL_l + z_coef * sum_l Z_l` and its metrics.

  LBL_l comes from the pieces of all microbatches for
  `model_cfg.lbl_scope == "global"` (the loss of the whole batch), else it
  is the mean of the per-microbatch losses; Z_l is the mean z-loss.

  Args:
    ce_sum: scalar float32 sum of masked token cross-entropies of the batch.
    num_targets: scalar float32 sum of the mask.
    moe_stats: dict from MoE layer index `i` to its `MoEStats` with a leading
      `[microbatches]` axis (empty without MoE layers).
    model_cfg: the `models.ModelConfig` (its `lbl_scope`).
    loss_cfg: the `LossConfig`.

  Returns:
    `(loss, metrics)`: metrics `loss`, `ce_loss`, `lbl_loss`, `z_loss`,
    `num_targets` and per MoE layer i `moe/{i}/lbl`, `moe/{i}/z`,
    `moe/{i}/max_over_mean`, `moe/{i}/dropped_fraction` and the
    `[num_experts]` `moe/{i}/expert_load`, counted over all microbatches.
  """
  ce = ce_sum / jnp.maximum(num_targets, 1.0)
  lbl_total = z_total = jnp.float32(0)
  metrics = {}
  for i, st in moe_stats.items():
    if model_cfg.lbl_scope == "global":
      lbl = moe.load_balancing_loss_from_pieces(st.pieces)
    else:
      lbl = jnp.mean(st.lbl)
    z = jnp.mean(st.z)
    load = moe.load_stats(st.pieces.expert_counts)
    lbl_total, z_total = lbl_total + lbl, z_total + z
    metrics.update(
      {
        f"moe/{i}/lbl": lbl,
        f"moe/{i}/z": z,
        f"moe/{i}/max_over_mean": load.max_over_mean,
        f"moe/{i}/dropped_fraction": jnp.mean(st.dropped),
        f"moe/{i}/expert_load": load.expert_load,
      }
    )
  loss = ce + loss_cfg.lbl_coef * lbl_total + loss_cfg.z_coef * z_total
  metrics.update(
    {
      "loss": loss,
      "ce_loss": ce,
      "lbl_loss": lbl_total,
      "z_loss": z_total,
      "num_targets": num_targets,
    }
  )
  return loss, metrics
