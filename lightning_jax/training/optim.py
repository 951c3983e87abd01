"""AdamW or GaLore with linear warmup, cosine decay and global-norm clipping.

Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization" (AdamW);
the warmup + cosine schedule of Radford et al. / Hoffmann et al. (2022);
GaLore (Zhao et al., 2024) in `training.galore`; CO2 (Sun et al., 2024), local
AdamW steps with a stale outer step, in `training.co2`.
"""

import dataclasses
import math

import jax
import optax

from lightning_jax import _checks
from lightning_jax.parallel import pipeline
from lightning_jax.training import galore as galore_lib

ADAMW = "adamw"
GALORE = "galore"
CO2 = "co2"
OPTIMIZERS = (ADAMW, GALORE, CO2)


@dataclasses.dataclass(frozen=True)
class GaLoreConfig:
  """GaLore's hyper-parameters (`training.galore.scale_by_galore`).

  Attributes:
    rank: r, the projection rank of each matrix.
    update_gap: T, steps between projector refreshes.
    scale: alpha, the factor of the projected-back updates (the paper's
      0.25 for LLaMA pre-training).
  """

  rank: int = 32
  update_gap: int = 200
  scale: float = 0.25

  def __post_init__(self):
    galore_lib.check_hparams(
      self.rank, self.update_gap, self.scale, prefix="galore_"
    )


@dataclasses.dataclass(frozen=True)
class CO2Config:
  """CO2's hyper-parameters (`training.co2`), named as in Sun et al. (2024).

  Attributes:
    local_steps: tau, inner (AdamW) steps per round on each data replica.
    outer_lr: eta, the outer learning rate.
    outer_momentum: beta, the outer momentum, in [0, 1).
    gap_penalty: lambda, the staleness-gap penalty: the outer step adds
      `delta / lambda` to the momentum; 1 is no penalty (docs/training.md,
      "CO2", for where this constant form comes from).
    clip: phi, clip the outer momentum element-wise to [-phi, phi]; 0
      disables.
    staleness: 1 applies round t's replica mean at the end of round t + 1
      (its all-reduce overlaps round t + 1's steps); 0 applies it at once.
  """

  local_steps: int = 4
  outer_lr: float = 1.0
  outer_momentum: float = 0.0
  gap_penalty: float = 1.0
  clip: float = 0.0
  staleness: int = 1

  def __post_init__(self):
    steps = self.local_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
      raise ValueError(
        f"--co2_local_steps must be a positive integer, got {steps!r}."
      )
    if not 0 < self.outer_lr < math.inf:
      raise ValueError(
        f"--co2_outer_lr must be finite and > 0, got {self.outer_lr}."
      )
    if not 0 <= self.outer_momentum < 1:
      raise ValueError(
        f"--co2_outer_momentum must be in [0, 1), got {self.outer_momentum}."
      )
    if not 0 < self.gap_penalty < math.inf:
      raise ValueError(
        f"--co2_gap_penalty must be finite and > 0 (1: no penalty), got "
        f"{self.gap_penalty}."
      )
    if not 0 <= self.clip < math.inf:
      raise ValueError(
        f"--co2_clip must be finite and >= 0 (0 disables), got {self.clip}."
      )
    if self.staleness not in (0, 1):
      raise ValueError(f"--co2_staleness must be 0 or 1, got {self.staleness}.")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimiser hyper-parameters.

  Attributes:
    lr: peak learning rate, reached after `warmup_steps`.
    total_steps: length of the schedule (warmup included); the cosine decays
      from `lr` to `lr * min_lr_ratio` at `total_steps`.
    warmup_steps: linear warmup from 0 to `lr`.
    min_lr_ratio: final learning rate as a fraction of `lr`.
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    weight_decay: decoupled weight decay, applied to weights with >= 2 dims
      only (not to norm scales, biases or per-head constants).
    clip_norm: clip the gradient to this global L2 norm; 0 disables.
    optimizer: "adamw", "galore" (Adam on low-rank projected gradients,
      then the same decay and schedule) or "co2" (AdamW steps on each data
      replica, averaged by CO2's outer step).
    galore: `GaLoreConfig` of "galore" (default `GaLoreConfig()`); only
      with "galore".
    co2: `CO2Config` of "co2" (default `CO2Config()`); only with "co2".
  """

  lr: float = 3e-3
  total_steps: int = 1000
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  optimizer: str = ADAMW
  galore: GaLoreConfig | None = None
  co2: CO2Config | None = None

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(
        f"`optimizer` must be one of {', '.join(OPTIMIZERS)}, got "
        f"{self.optimizer!r}."
      )
    if self.galore is not None and self.optimizer != GALORE:
      raise ValueError(
        f"The GaLore options (--galore_*) need --optimizer={GALORE}, got "
        f"--optimizer={self.optimizer}."
      )
    if self.co2 is not None and self.optimizer != CO2:
      raise ValueError(
        f"The CO2 options (--co2_*) need --optimizer={CO2}, got "
        f"--optimizer={self.optimizer}."
      )
    if self.optimizer == GALORE and self.galore is None:
      object.__setattr__(self, "galore", GaLoreConfig())
    if self.optimizer == CO2 and self.co2 is None:
      object.__setattr__(self, "co2", CO2Config())
    _checks.check_positive_int("total_steps", self.total_steps)
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(
        f"`warmup_steps` must be in [0, total_steps = "
        f"{self.total_steps}], got {self.warmup_steps}."
      )
    if not 0 < self.lr < math.inf:
      raise ValueError(f"`lr` must be finite and > 0, got {self.lr}.")
    if not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(
        f"`min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio}."
      )
    for name in ("weight_decay", "clip_norm"):
      if not 0 <= getattr(self, name) < math.inf:
        raise ValueError(
          f"`{name}` must be finite and >= 0, got {getattr(self, name)}."
        )


def default_warmup_steps(total_steps: int) -> int:
  """The warmup when none is given: `min(100, total_steps // 10)`."""
  return min(100, total_steps // 10)


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
  """The schedule `step -> lr`: linear warmup from 0, then cosine decay.

  Example:
    >>> sched = learning_rate(OptimConfig(lr=1.0, total_steps=10,
    ...                                   warmup_steps=2, min_lr_ratio=0.0))
    >>> float(sched(2)), float(sched(10))
    (1.0, 0.0)
  """
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=cfg.warmup_steps,
    decay_steps=cfg.total_steps,
    end_value=cfg.lr * cfg.min_lr_ratio,
  )


def decay_mask(params):
  """True for the leaves that get weight decay: arrays with >= 2 dims.

  The stage axes of pipeline-stacked params (`pipeline.own_ndim`) do not
  count, so a pipelined run decays the same weights as an unpipelined one.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, p: pipeline.own_ndim(path, p) >= 2, params
  )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW on the `learning_rate(cfg)` schedule.

  AdamW is `chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)`
  (what `optax.adamw` is, state included); "galore" wraps its
  `scale_by_adam` in `scale_by_galore`, so decay and schedule act on the
  full-rank update, as in the paper's reference code; "co2" is AdamW, its
  inner optimiser (`training.co2` adds the outer step). The optimiser state is
  a pytree; its step count drives the schedule, so a restored state
  continues the schedule exactly.

  Example:
    >>> opt = make_optimizer(OptimConfig())
    >>> params = {"w": jnp.ones((2, 2)), "scale": jnp.ones(2)}
    >>> updates, state = opt.update(params, opt.init(params), params)
  """
  scaling = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.optimizer == GALORE:
    scaling = galore_lib.scale_by_galore(
      scaling,
      rank=cfg.galore.rank,
      update_gap=cfg.galore.update_gap,
      scale=cfg.galore.scale,
    )
  adamw = optax.chain(
    scaling,
    optax.add_decayed_weights(cfg.weight_decay, decay_mask),
    optax.scale_by_learning_rate(learning_rate(cfg)),
  )
  if cfg.clip_norm == 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
