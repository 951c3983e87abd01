"""MaskLLM: learnable 2:4 semi-structured sparsity (Fang et al., 2024,
arXiv 2409.17481; reference code github.com/NVlabs/MaskLLM).

**Groups.** A target weight used as `x @ W`, viewed as matrices
`W [*batch, in, out]` (`paths.matrix_view`), is cut along its input dim into
groups of 4 consecutive inputs `W[..., 4g : 4g + 4, o]`: the reduction dim
of `x @ W`, the dim NVIDIA's 2:4 sparse tensor cores compress and the one
the reference groups (rows of torch's `Linear.weight [out, in]`, flattened
by 4). Group layout: `[*batch, in / 4, out, 4]` (`to_groups`).

**Masks.** Each group picks one of the 6 two-of-four `CANDIDATES [6, 4]`
through logits `pi [*batch, in / 4, out, 6]`:

    training (soft): m = softmax((kappa pi + g) / tau) @ CANDIDATES,
                     g ~ Gumbel(0, 1)
    export (hard):   m = CANDIDATES[argmax pi]   (exactly 2 of 4 kept)

and the model runs on `W * m` with `W` frozen. `tau` and `kappa` move
linearly from their start to end values over `total_steps` (`annealing`).
Initialisation `pi ~ N(0, 0.01^2)` plus the prior mask `M0`:

    pi_k += alpha * std(pi) * (<CANDIDATES_k, M0_group> - 1)

(+alpha std for the prior's own candidate, 0 for those sharing one kept
weight, -alpha std for its complement). The objective adds the sparse
weight regulariser `-lambda(t) sum ||W * m||^2` (keep large weights),
`lambda` decaying linearly to 0. Numbers and sources: docs/adapt.md.
Training params are `{"base": frozen, "mask": logits}` (`frozen`).
"""

import dataclasses
import itertools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lightning_jax import _checks
from lightning_jax.adapt import frozen
from lightning_jax.adapt import paths
from lightning_jax.parallel import mesh as mesh_lib
from lightning_jax.parallel import sharding
from lightning_jax.training import checkpoint

P = jax.sharding.PartitionSpec

MASK = "mask"
GROUP = 4
# The 2-of-4 patterns, in the order of itertools.combinations (the
# reference's order): 1100, 1010, 1001, 0110, 0101, 0011.
CANDIDATES = np.array(
  [
    [float(i in kept) for i in range(GROUP)]
    for kept in itertools.combinations(range(GROUP), 2)
  ],
  np.float32,
)
# Leaves left dense whatever the targets: the embedding and the output
# layer (the paper keeps the LM head dense; tied models share `embed`).
DENSE = r"(embed|unembed)"


def _check_pair(name: str, pair) -> tuple[float, float]:
  if (
    not isinstance(pair, (tuple, list))
    or len(pair) != 2
    or not all(0 < float(v) < math.inf for v in pair)
  ):
    raise ValueError(
      f"`{name}` must be a (start, end) pair of finite values > 0, got "
      f"{pair!r}."
    )
  return float(pair[0]), float(pair[1])


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """MaskLLM hyper-parameters (defaults: the paper's LLaMA-2 recipe).

  Attributes:
    total_steps: length T of the annealing schedules (the mask-training run).
    targets: regular expressions over leaf names (`paths`); each must match
      a matrix whose input size is divisible by 4; `embed` / `unembed` stay
      dense.
    temperature: Gumbel-softmax temperature tau, (start, end), linear in
      step / T.
    logit_scale: kappa multiplying the logits, (start, end), linear.
    prior_strength: alpha of the prior mask in `init`; 0 disables the prior.
    weight_reg: lambda at step 0 of the sparse weight regulariser; it
      decays linearly to 0 at step T.
    init_std: standard deviation of the logits before the prior.
  """

  total_steps: int
  targets: tuple[str, ...] = (paths.ATTENTION, paths.MLP)
  temperature: tuple[float, float] = (4.0, 0.05)
  logit_scale: tuple[float, float] = (1e2, 5e2)
  prior_strength: float = 3.0
  weight_reg: float = 1e-5
  init_std: float = 0.01

  def __post_init__(self):
    _checks.check_positive_int("total_steps", self.total_steps)
    object.__setattr__(self, "targets", paths.check_targets(self.targets))
    for name in ("temperature", "logit_scale"):
      object.__setattr__(self, name, _check_pair(name, getattr(self, name)))
    for name in ("prior_strength", "weight_reg"):
      if not 0 <= getattr(self, name) < math.inf:
        raise ValueError(
          f"`{name}` must be finite and >= 0, got {getattr(self, name)}."
        )
    if not 0 < self.init_std < math.inf:
      raise ValueError(
        f"`init_std` must be finite and > 0, got {self.init_std}."
      )


class Annealing(NamedTuple):
  """The schedules' values at one step."""

  temperature: jax.Array  # shape=(), dtype=float32
  logit_scale: jax.Array  # shape=(), dtype=float32
  weight_reg: jax.Array  # shape=(), dtype=float32


def annealing(cfg: MaskConfig, step) -> Annealing:
  """tau, kappa and lambda at `step` (t = step / T clipped to [0, 1]):
  `tau = tau0 + (tau1 - tau0) t`, `kappa = kappa0 + (kappa1 - kappa0) t`,
  `lambda = lambda0 (1 - t)`.

  Example:
    >>> annealing(MaskConfig(total_steps=100), 0).temperature
    Array(4., dtype=float32)
  """
  t = jnp.clip(jnp.asarray(step, jnp.float32) / cfg.total_steps, 0.0, 1.0)

  def lerp(pair):
    return pair[0] + (pair[1] - pair[0]) * t

  return Annealing(
    lerp(cfg.temperature), lerp(cfg.logit_scale), cfg.weight_reg * (1 - t)
  )


def _group_view(name: str, shape) -> tuple[tuple[int, ...], int, int]:
  """`(batch dims, groups, out)` of target `name`, checked."""
  batch, fan_in, out = paths.split_shape(shape, paths.matrix_view(name, shape))
  size_in = math.prod(fan_in)
  if size_in % GROUP:
    raise ValueError(
      f"leaf {name!r} of shape {tuple(shape)} has "
      f"input size {size_in} (dims {fan_in}), which must be divisible by "
      f"{GROUP} for 2:4 groups along the input."
    )
  return batch, size_in // GROUP, math.prod(out)


def to_groups(w, name: str):
  """`w [*shape]` of leaf `name` as groups `[*batch, in / 4, out, 4]`."""
  batch, groups, out = _group_view(name, w.shape)
  return jnp.swapaxes(w.reshape(batch + (groups, GROUP, out)), -1, -2)


def from_groups(groups, name: str, shape):
  """Inverse of `to_groups`: `[*batch, in / 4, out, 4]` -> `[*shape]`."""
  _group_view(name, shape)
  return jnp.swapaxes(groups, -1, -2).reshape(shape)


def hard_mask(logits):
  """`CANDIDATES[argmax logits]`: `[..., 6]` -> 0/1 `[..., 4]`, two ones."""
  return jnp.asarray(CANDIDATES)[jnp.argmax(logits, axis=-1)]


def soft_mask(logits, key, temperature, logit_scale):
  """Gumbel-softmax mask `softmax((kappa pi + g) / tau) @ CANDIDATES`.

  Args:
    logits: pi `[..., 6]`.
    key: PRNG key of the Gumbel noise g.
    temperature: tau > 0; as tau -> 0 the mask tends to the hard mask of
      `kappa pi + g`.
    logit_scale: kappa.

  Returns:
    float32 `[..., 4]` in [0, 1], each group summing to 2.
  """
  noise = jax.random.gumbel(key, logits.shape, jnp.float32)
  probs = jax.nn.softmax((logit_scale * logits + noise) / temperature, axis=-1)
  return probs @ jnp.asarray(CANDIDATES)


def magnitude_groups(w_groups):
  """Magnitude 2:4: per group `[..., 4]` keep the two largest |w| (the
  candidate of largest kept |w| sum; ties to the first candidate)."""
  score = jnp.abs(w_groups.astype(jnp.float32)) @ jnp.asarray(CANDIDATES).T
  return hard_mask(score)


def targets(
  params, cfg: MaskConfig, what: str = "MaskConfig.targets"
) -> tuple[str, ...]:
  """Target leaf names of `cfg` in `params`, checked (tree order).

  Args:
    params: the dense base params.
    cfg: the `MaskConfig`.
    what: the name of the targets in errors (e.g. a flag).

  Raises:
    ValueError: a pattern matching nothing or a non-matrix, an embedding /
      output leaf, an NF4 leaf, or an input size not divisible by 4.
  """
  names = paths.match(params, cfg.targets, what)
  dense = [n for n in names if re.fullmatch(DENSE, n)]
  if dense:
    raise ValueError(
      f"`{what}` match {dense}: the embedding and the output layer stay "
      "dense (as in MaskLLM); target the block weights."
    )
  flat = paths.named_leaves(params)
  for name in names:
    if paths.is_nf4(flat[name]):
      raise ValueError(
        f"`{what}` match the NF4 leaf {name!r}; mask a dense base "
        "(dequantise it first)."
      )
    try:
      _group_view(name, paths.shape_of(flat[name]))
    except ValueError as err:
      raise ValueError(f"`{what}`: {err}") from None
  return names


def magnitude_masks(params, cfg: MaskConfig) -> dict:
  """The magnitude 2:4 baseline: `{target name: 0/1 mask [*shape]}`."""
  flat = paths.named_leaves(params)
  return {
    n: from_groups(magnitude_groups(to_groups(flat[n], n)), n, flat[n].shape)
    for n in targets(params, cfg)
  }


def init(key, params, cfg: MaskConfig, prior: dict | None = None) -> dict:
  """Mask logits `{target name: pi [*batch, in / 4, out, 6]}` (float32).

  `pi ~ N(0, init_std^2)`, then, with `prior_strength` alpha > 0, the prior
  mask `M0` is transferred (the paper's prior initialisation):
  `pi_k += alpha * std(pi) * (<CANDIDATES_k, M0_group> - 1)`, `std` over
  each matrix's logits.

  Args:
    key: PRNG key of the logits.
    params: the dense base params.
    cfg: the `MaskConfig`.
    prior: `{target name: 0/1 2:4 mask [*shape]}`; default the magnitude
      masks (`magnitude_masks`).

  Raises:
    ValueError: bad targets (`targets`), or a prior missing a target or of
      the wrong shape.

  Example:
    >>> logits = init(jax.random.key(0), params, MaskConfig(total_steps=500))
  """
  names = targets(params, cfg)
  flat = paths.named_leaves(params)
  if cfg.prior_strength > 0 and prior is None:
    prior = magnitude_masks(params, cfg)
  logits = {}
  for i, name in enumerate(names):
    shape = tuple(flat[name].shape)
    batch, groups, out = _group_view(name, shape)
    pi = cfg.init_std * jax.random.normal(
      jax.random.fold_in(key, i), batch + (groups, out, len(CANDIDATES))
    )
    if cfg.prior_strength > 0:
      if name not in prior:
        raise ValueError(f"`prior` has no mask for target {name!r}.")
      _checks.check_shape(f"prior[{name!r}]", prior[name], shape, "[*shape]")
      overlap = to_groups(jnp.asarray(prior[name], jnp.float32), name)
      overlap = overlap @ jnp.asarray(CANDIDATES).T
      axes = tuple(range(len(batch), pi.ndim))
      sigma = jnp.std(pi, axis=axes, keepdims=True, ddof=1)
      pi = pi + cfg.prior_strength * sigma * (overlap - 1)
    logits[name] = pi
  return logits


def masks(params, logits: dict, cfg: MaskConfig, *, rng=None, step=0) -> dict:
  """`{target name: mask [*shape]}`: soft (Gumbel-softmax at `step`'s
  annealing) when `rng` is given, else hard (argmax: export, evaluation).

  Raises:
    ValueError: a logits entry that is not a target of the params or whose
      shape is not `[*batch, in / 4, out, 6]`.
  """
  flat = paths.named_leaves(params)
  unknown = sorted(set(logits) - set(flat))
  if unknown:
    raise ValueError(f"`logits` has leaves {unknown} not in the params.")
  anneal = annealing(cfg, step)
  out = {}
  for i, name in enumerate(sorted(logits)):
    shape = paths.shape_of(flat[name])
    batch, groups, size_out = _group_view(name, shape)
    _checks.check_shape(
      f"logits[{name!r}]",
      logits[name],
      batch + (groups, size_out, len(CANDIDATES)),
      "[*batch, in / 4, out, 6]",
    )
    if rng is None:
      group_mask = hard_mask(logits[name])
    else:
      group_mask = soft_mask(
        logits[name],
        jax.random.fold_in(rng, i),
        anneal.temperature,
        anneal.logit_scale,
      )
    out[name] = from_groups(group_mask, name, shape)
  return out


def prune(params, leaf_masks: dict):
  """Params with `W * mask` for every leaf of `leaf_masks` (dtype kept)."""

  def one(path, w):
    m = leaf_masks.get(paths.path_name(path))
    return w if m is None else (w * m).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(one, params)


def apply(base, logits: dict, cfg: MaskConfig, *, rng=None, step=0):
  """The model params `W * m`: soft masks when `rng` is given (training),
  hard argmax masks otherwise (the exported 2:4 model).

  Example:
    >>> sparse = apply(base, logits, cfg)  # export: 2 of every 4 kept
    >>> logits_, _ = models.forward(sparse, tokens, model_cfg)
  """
  return prune(base, masks(base, logits, cfg, rng=rng, step=step))


def weight_norm(params, names) -> jax.Array:
  """`sum ||W_n||^2` over leaves `names` (float32): on masked params the
  regulariser's `sum ||W * m||^2`."""
  flat = paths.named_leaves(params)
  return sum(jnp.sum(jnp.square(flat[n].astype(jnp.float32))) for n in names)


def shardings(params, mesh, *, stage_axis: int = sharding.STAGE_AXIS):
  """`NamedSharding`s of `{"base": W, "mask": logits}`.

  The base follows the partition rules (`parallel.param_shardings`). A
  logits leaf `[*batch, in / 4, out, 6]` follows the weight it masks, so
  each device holds the logits of its own shard of `W`: the batch dims keep
  the weight's axes, the group dim `in / 4` those of the weight's first
  input dim and `out` those of its first output dim (`paths.merged_axes`:
  when the other merged dims are whole and the sizes divide, else
  replicated); the 6 candidates stay whole.
  """
  sizes = mesh_lib.mesh_axis_sizes(mesh)
  base = params[frozen.BASE]
  flat = paths.named_leaves(base)

  def logits_spec(name):
    shape = paths.shape_of(flat[name])
    spec = sharding.plan_leaf(
      tuple(name.split("/")), shape, sizes, stage_axis
    ).spec
    axes = tuple(spec) + (None,) * (len(shape) - len(spec))
    batch, fan_in, out = paths.split_shape(axes, paths.matrix_view(name, shape))
    _, groups, size_out = _group_view(name, shape)
    return P(
      *batch,
      paths.merged_axes(fan_in, groups, sizes),
      paths.merged_axes(out, size_out, sizes),
      None,
    )

  named = lambda spec: jax.sharding.NamedSharding(mesh, spec)  # noqa: E731
  return {
    frozen.BASE: sharding.param_shardings(base, mesh, stage_axis=stage_axis),
    MASK: {name: named(logits_spec(name)) for name in params[MASK]},
  }


def save_logits(
  manager: checkpoint.CheckpointManager, step: int, logits, cfg: MaskConfig
):
  """Saves the logits alone (with `cfg`) as checkpoint `step`
  (`frozen.save`): 1.5 float32 per masked weight.

  Returns:
    The committed step directory.
  """
  return frozen.save(manager, step, logits, cfg, MASK)


def load_logits(
  manager: checkpoint.CheckpointManager, step: int | None = None, target=None
):
  """`(logits, MaskConfig)` of checkpoint `step` (None: the latest);
  `target`: abstract logits with shardings to restore onto (`frozen.load`).
  """
  return frozen.load(manager, MaskConfig, MASK, step, target)


def freeze_base(inner: optax.GradientTransformation):
  """`frozen.freeze_base(inner, "mask")`: only the logits train."""
  return frozen.freeze_base(inner, MASK)


def mask_grad_fn(grad_fn, cfg: MaskConfig, step):
  """A `training` grad_fn over `{"base", "mask"}` at `step`.

  The model params are `apply(base, logits, rng=fold_in(rng, 1), step)`;
  the objective is `grad_fn`'s loss `- lambda(step) sum ||W * m||^2`
  (`weight_norm` of the masked targets, reported as
  `sparse_weight_norm`, beside the annealing values `mask/temperature`,
  `mask/logit_scale`, `mask/weight_reg`); only the logits get gradients
  (`frozen.transform_grad_fn`).

  Args:
    grad_fn: `(params, batch, rng) -> ((loss, metrics), grads)` over model
      params, e.g. `training.default_grad_fn(...)`.
    cfg: the `MaskConfig`.
    step: the optimiser step (traced int) of the annealing: the train
      state's (`training.Adapter.grad_fn` receives it).

  Example:
    >>> def train_step(state, batch):  # what `training.train` runs
    ...   grad_fn = mask_grad_fn(model_grad_fn, cfg, state.step)
    ...   return training.make_train_step(opt, sched, grad_fn)(state, batch)
  """
  anneal = annealing(cfg, step)
  anneal_metrics = {f"mask/{k}": v for k, v in anneal._asdict().items()}

  def regularised(params, batch, rng):
    (loss, metrics), grads = grad_fn(params, batch, rng)
    names = targets(params, cfg)
    norm, norm_grads = jax.value_and_grad(weight_norm)(params, names)
    grads = jax.tree.map(
      lambda g, r: g - (anneal.weight_reg * r).astype(g.dtype),
      grads,
      norm_grads,
    )
    loss = loss - anneal.weight_reg * norm
    metrics = dict(metrics, sparse_weight_norm=norm, **anneal_metrics)
    return (loss, metrics), grads

  return frozen.transform_grad_fn(
    regularised,
    lambda base, logits, rng: apply(base, logits, cfg, rng=rng, step=step),
    MASK,
  )
