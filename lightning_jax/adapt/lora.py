"""LoRA on any parameter tree (Hu et al., 2021, arXiv 2106.09685).

Each target weight, viewed as matrices `W [*batch, in, out]`
(`paths.matrix_view`; `x @ W`), gets `A [*batch, *in, r]` and
`B [*batch, r, *out]`:

    W' = W + (alpha / r) A B,      A ~ U(-1/sqrt(in), 1/sqrt(in)),  B = 0

so step 0 is the base model. The forward materialises `W'` for every
target (`apply`) and calls the unchanged model forward on the result; the
cost and the reasons are in docs/adapt.md. Training keeps the params as
`{"base": base, "lora": adapters}`: `freeze_base` gives the optimiser state
to the adapters only, `lora_grad_fn` differentiates the adapters only.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from lightning_jax import _checks
from lightning_jax.adapt import frozen
from lightning_jax.adapt import paths
from lightning_jax.adapt.nf4 import from_nf4
from lightning_jax.training import checkpoint

LORA = "lora"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters.

  Attributes:
    targets: regular expressions over leaf names (`paths`), e.g.
      `paths.ATTENTION`, `paths.MLP`; each must match a matrix.
    rank: r.
    alpha: the delta is scaled by `alpha / rank`.
    dropout: probability of dropping an input feature of `A` (one mask per
      step and matrix, shared by all tokens: the materialised forward has no
      per-token path; docs/adapt.md); 0 disables.
  """

  targets: tuple[str, ...] = (paths.ATTENTION, paths.MLP)
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "targets", paths.check_targets(self.targets))
    _checks.check_positive_int("rank", self.rank)
    if not 0 < self.alpha < math.inf:
      raise ValueError(f"`alpha` must be finite and > 0, got {self.alpha}.")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}.")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def init(key, params, cfg: LoraConfig) -> dict:
  """Adapters `{leaf name: {"a": A, "b": B}}` (float32) for `params`.

  Args:
    key: PRNG key of the `A` initialisation.
    params: the base params (arrays, `ShapeDtypeStruct`s or `NF4Tensor`s).
    cfg: the `LoraConfig`.

  Returns:
    For each target of `shape = [*batch, *in, *out]`: `a [*batch, *in, r]`
    uniform in `+-1/sqrt(prod(in))` and `b [*batch, r, *out]` zero.

  Raises:
    ValueError: a target pattern that matches no matrix (listing them).

  Example:
    >>> ad = init(jax.random.key(0), {"ffn": {"w_up": jnp.ones((8, 16))}},
    ...           LoraConfig(targets=(paths.MLP,), rank=2))
    >>> ad["ffn/w_up"]["a"].shape, ad["ffn/w_up"]["b"].shape
    ((8, 2), (2, 16))
  """
  shapes = dict(paths.leaf_names(params))
  names = paths.match(params, cfg.targets, "LoraConfig.targets")
  adapters = {}
  for i, name in enumerate(names):
    batch, fan_in, out = paths.split_shape(
      shapes[name], paths.matrix_view(name, shapes[name])
    )
    bound = math.prod(fan_in) ** -0.5
    adapters[name] = {
      "a": jax.random.uniform(
        jax.random.fold_in(key, i),
        batch + fan_in + (cfg.rank,),
        minval=-bound,
        maxval=bound,
      ),
      "b": jnp.zeros(batch + (cfg.rank,) + out),
    }
  return adapters


def delta(adapter: dict, name: str, shape, scale: float):
  """`scale * A B` of leaf `name`, float32 `[*shape]`."""
  view = paths.matrix_view(name, shape)
  batch, fan_in, out = paths.split_shape(tuple(shape), view)
  a = adapter["a"].reshape(batch + (math.prod(fan_in), -1))
  b = adapter["b"].reshape(batch + (-1, math.prod(out)))
  return (scale * jnp.matmul(a, b)).reshape(shape)


def _dropped(a, rate: float, key):
  """`a [..., r]` with whole input features dropped, kept ones / (1 - p)."""
  keep = jax.random.bernoulli(key, 1 - rate, a.shape[:-1] + (1,))
  return jnp.where(keep, a / (1 - rate), 0.0)


def _add_deltas(params, adapters, cfg, sign, rng, dtype):
  unknown = sorted(set(adapters) - {n for n, _ in paths.leaf_names(params)})
  if unknown:
    raise ValueError(f"`adapters` has leaves {unknown} not in the params.")
  names = sorted(adapters)

  def one(path, leaf):
    w = from_nf4(leaf, dtype) if paths.is_nf4(leaf) else leaf
    name = paths.path_name(path)
    if name not in adapters:
      return w
    adapter = adapters[name]
    if rng is not None and cfg.dropout > 0:
      key = jax.random.fold_in(rng, names.index(name))
      adapter = dict(adapter, a=_dropped(adapter["a"], cfg.dropout, key))
    return w + (sign * delta(adapter, name, w.shape, cfg.scale)).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=paths.is_nf4)


def apply(base, adapters, cfg: LoraConfig, *, rng=None, dtype=jnp.float32):
  """The model params `W + (alpha / r) A B` (the merge), for the unchanged
  model forward.

  Args:
    base: base params; `NF4Tensor` leaves (QLoRA) are dequantised.
    adapters: from `init` (or a subset of its leaves).
    cfg: the `LoraConfig`.
    rng: PRNG key of the adapter dropout (None: no dropout, the merge).
    dtype: dtype of dequantised `NF4Tensor` leaves (the compute dtype);
      dense leaves keep theirs.

  Returns:
    Params with the structure of the dense base.

  Example:
    >>> merged = apply(params, adapters, cfg)   # to export or serve
    >>> logits, _ = models.forward(apply(params, adapters, cfg), tokens, mcfg)
  """
  return _add_deltas(base, adapters, cfg, 1, rng, dtype)


def unmerge(merged, adapters, cfg: LoraConfig):
  """Inverse of `apply` (no dropout) on dense params: `W' - (alpha/r) A B`."""
  return _add_deltas(merged, adapters, cfg, -1, None, None)


def freeze_base(inner: optax.GradientTransformation):
  """`frozen.freeze_base(inner, "lora")`: optimiser state and updates for
  the adapters only; the base stays bitwise unchanged.

  Example:
    >>> opt = freeze_base(optax.adamw(1e-3))
    >>> state = opt.init({"base": base, "lora": adapters})
  """
  return frozen.freeze_base(inner, LORA)


def lora_grad_fn(grad_fn, cfg: LoraConfig, *, dtype=jnp.float32):
  """A `training` grad_fn over `{"base", "lora"}` from one over model params.

  `frozen.transform_grad_fn` with the model params `apply(base, lora,
  rng=fold_in(rng, 1))`: only the adapters are differentiated, the base
  gets zeros (an NF4 base needs no derivative).

  Args:
    grad_fn: `(params, batch, rng) -> ((loss, metrics), grads)`, e.g.
      `training.default_grad_fn(...)`.
    cfg: the `LoraConfig`.
    dtype: see `apply`.

  Returns:
    A grad_fn of the same signature for `training.make_train_step`.
  """
  return frozen.transform_grad_fn(
    grad_fn,
    lambda base, ad, rng: apply(base, ad, cfg, rng=rng, dtype=dtype),
    LORA,
  )


def save_adapters(
  manager: checkpoint.CheckpointManager, step: int, adapters, cfg: LoraConfig
):
  """Saves the adapters alone (with `cfg`) as checkpoint `step`
  (`frozen.save`).

  Returns:
    The committed step directory.
  """
  return frozen.save(manager, step, adapters, cfg, LORA)


def load_adapters(
  manager: checkpoint.CheckpointManager, step: int | None = None, target=None
):
  """`(adapters, LoraConfig)` of checkpoint `step` (None: the latest);
  `target`: abstract adapters with shardings to restore onto (`frozen.load`).
  """
  return frozen.load(manager, LoraConfig, LORA, step, target)
