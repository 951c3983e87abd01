"""Model configuration: the block pattern, layer-wise scaling and per-layer
block configs."""

import dataclasses
from typing import Any

from lightning_jax import _checks
from lightning_jax import layers
from lightning_jax import ops
from lightning_jax.layers import mixers

FFNS = ("mlp", "moe", "mhmoe")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder LM: embedding, `num_layers` pre-norm blocks, head.

  Layer l uses mixer `pattern[l % len(pattern)]` and channel mixer
  `ffn_pattern[l % len(ffn_pattern)]`: `pattern=("deltanet",) * 3 +
  ("attention",)` gives three DeltaNet layers then one attention layer,
  repeated.

  Attributes:
    vocab_size: vocabulary size V.
    d_model: residual width D.
    num_layers: number of blocks L.
    pattern: token mixers, among the registered `layers.mixers.kinds()`,
      cycled over layers.
    ffn_pattern: channel mixers, among `FFNS`, cycled over layers.
    num_heads: heads of every mixer (the last layer's with layer-wise
      scaling).
    num_kv_heads: key/value heads of attention (GQA); None = `num_heads`.
    head_dim: per-head width (key width of recurrent mixers).
    d_ff: hidden width of the MLP (the last layer's with layer-wise scaling).
    layerwise_heads: OpenELM (Mehta et al., 2024, arXiv 2404.14619) scaling
      `(alpha_min, alpha_max)`: layer l has `alpha_l * d_model / head_dim`
      heads, `alpha_l` linear in l from min to max. None: `num_heads`.
    layerwise_ffn: OpenELM `(beta_min, beta_max)`: layer l's MLP width is
      `beta_l * d_model`. None: `d_ff`.
    conv_size: short-conv kernel of the mixers that take one (DeltaNet,
      Gated DeltaNet, Mamba-2; 0 disables).
    chunk_size: chunk of the linear-recurrence kernels.
    recurrent_impl: "chunked", "recurrent" or "auto" (chunked for training,
      the fastest form per backend for prefill: `layers.recurrent_impl`).
    attention_impl: "blocked" or "reference".
    rope_theta: RoPE base of attention mixers.
    window: sliding window of "attention" mixers (None: full causal).
    sink: attention-sink tokens with `window` or a MoA plan.
    moa_plan: the MoA rules (`ops.MoAPlan`, per layer and head), required
      by "moa" mixers; part of the config, so a checkpoint is
      self-contained (`ops.MoAPlan.load` imports the authors' JSON). Its
      rows are the softmax-attention layers in order: the i-th "attention"
      / "moa" layer uses row i (every row of a pure transformer, as the
      MoA authors' plans).
    mixer_options: per-kind layer-config overrides, `"kind.field=value"`
      (e.g. `"mamba2.state_dim=64"`), see `layers.mixers.parse_options`.
    num_experts, top_k, moe_d_ff, router_score: MoE channel mixers (dropless
      top-k GLU experts).
    moe_shared_d_ff: width of the always-on shared expert of "moe" FFNs
      (0: none), see `layers.MoEConfig.shared_d_ff`.
    lbl_scope: load-balancing loss scope, "sequence", "micro" or "global".
      With "global" the layers report micro-batch pieces
      (`MoEAux.lbl_pieces`) and the loss assembles the exact global-batch
      LBL from them (docs/moe.md).
    mhmoe_heads: sub-tokens per token of "mhmoe" channel mixers.
    parallel_block: attention and FFN read the same normed input and add to
      the residual together (GPT-J / BAM form) instead of in sequence.
    tie_embeddings: the head is the embedding transposed.
    dtype: compute dtype ("float32" or "bfloat16"); params stay float32,
      logits are float32.
    norm_eps: RMSNorm epsilon.
    remat: rematerialise each block in the backward pass.
  """

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 4
  pattern: tuple[str, ...] = ("deltanet", "deltanet", "deltanet", "attention")
  ffn_pattern: tuple[str, ...] = ("mlp",)
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int = 32
  d_ff: int = 384
  layerwise_heads: tuple[float, float] | None = None
  layerwise_ffn: tuple[float, float] | None = None
  conv_size: int = 4
  chunk_size: int = 64
  recurrent_impl: str = "auto"
  attention_impl: str = "blocked"
  rope_theta: float = 10_000.0
  window: int | None = None
  sink: int = 0
  moa_plan: ops.MoAPlan | None = None
  mixer_options: tuple[str, ...] = ()
  num_experts: int = 8
  top_k: int = 2
  moe_d_ff: int = 128
  moe_shared_d_ff: int = 0
  router_score: str = "softmax"
  lbl_scope: str = "global"
  mhmoe_heads: int = 2
  parallel_block: bool = False
  tie_embeddings: bool = True
  dtype: str = "float32"
  norm_eps: float = 1e-6
  remat: bool = False

  def __post_init__(self):
    for name in (
      "vocab_size",
      "d_model",
      "num_layers",
      "num_heads",
      "head_dim",
      "d_ff",
      "chunk_size",
      "num_experts",
      "top_k",
      "moe_d_ff",
      "mhmoe_heads",
    ):
      _checks.check_positive_int(name, getattr(self, name))
    if self.moe_shared_d_ff:
      _checks.check_positive_int("moe_shared_d_ff", self.moe_shared_d_ff)
      if "mhmoe" in self.ffn_pattern:
        raise ValueError(
          "`moe_shared_d_ff` is for 'moe' FFNs; `ffn_pattern` has 'mhmoe'."
        )
    for name in ("pattern", "ffn_pattern"):
      value = getattr(self, name)
      if not isinstance(value, tuple) or not value:
        raise ValueError(f"`{name}` must be a non-empty tuple, got {value!r}.")
    for kind in self.pattern:
      mixers.get(kind)
    for ffn in self.ffn_pattern:
      _checks.check_choice("ffn_pattern", ffn, FFNS)
    mixers.parse_options(self.mixer_options)
    _checks.check_choice("dtype", self.dtype, DTYPES)
    _checks.check_choice(
      "recurrent_impl", self.recurrent_impl, layers.RECURRENT_IMPLS
    )
    _checks.check_choice(
      "attention_impl", self.attention_impl, layers.ATTENTION_IMPLS
    )
    kv = self.num_kv_heads or self.num_heads
    if self.num_heads % kv:
      raise ValueError(
        f"`num_kv_heads` ({kv}) must divide `num_heads` ({self.num_heads})."
      )
    for name in ("layerwise_heads", "layerwise_ffn"):
      bounds = getattr(self, name)
      if bounds is not None and not (
        len(bounds) == 2 and 0 < bounds[0] <= bounds[1]
      ):
        raise ValueError(
          f"`{name}` must be (min, max) with 0 < min <= max, got {bounds!r}."
        )
    if "moa" in self.pattern:
      if not isinstance(self.moa_plan, ops.MoAPlan):
        raise ValueError(
          '`moa_plan` (an `ops.MoAPlan`) is required by "moa" '
          f"mixers in `pattern`, got {self.moa_plan!r}."
        )
      block_configs(self)  # the plan's rows and heads against the layers

  def to_dict(self) -> dict:
    """JSON-ready fields (tuples as lists), e.g. for checkpoint metadata."""
    return _json_ready(dataclasses.asdict(self))

  @classmethod
  def from_dict(cls, fields: dict) -> "ModelConfig":
    """Inverse of `to_dict`; ValueError naming unknown fields."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(
        f"Unknown model config field(s) {unknown}; fields: {sorted(known)}."
      )
    fields = {k: _tuples(v) for k, v in fields.items()}
    if isinstance(fields.get("moa_plan"), dict):
      fields["moa_plan"] = ops.MoAPlan(**fields["moa_plan"])
    return cls(**fields)

  @property
  def mixers(self) -> tuple[str, ...]:
    """The token mixer of each layer."""
    return tuple(
      self.pattern[i % len(self.pattern)] for i in range(self.num_layers)
    )

  @property
  def attention_layers(self) -> tuple[int, ...]:
    """Indices of the softmax-attention layers (`Mixer.softmax`)."""
    return tuple(i for i, m in enumerate(self.mixers) if mixers.get(m).softmax)

  @property
  def ffns(self) -> tuple[str, ...]:
    """The channel mixer of each layer."""
    return tuple(
      self.ffn_pattern[i % len(self.ffn_pattern)]
      for i in range(self.num_layers)
    )


def _json_ready(value):
  if isinstance(value, (tuple, list)):
    return [_json_ready(v) for v in value]
  if isinstance(value, dict):
    return {k: _json_ready(v) for k, v in value.items()}
  return value


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Static config of one block.

  Attributes:
    kind: the token mixer's registered kind (`layers.mixers.get(kind)`).
    mixer: its layer config (built by the record's `config`).
    ffn: `MLPConfig`, `MoEConfig` or `MHMoEConfig`.
    parallel: the parallel-block form.
    norm_eps: RMSNorm epsilon.
    lbl_scope: the model's `lbl_scope` (`moe_lbl_scope` maps it to the MoE
      layer's).
  """

  kind: str
  mixer: Any
  ffn: layers.MLPConfig | layers.MoEConfig | layers.MHMoEConfig
  parallel: bool = False
  norm_eps: float = 1e-6
  lbl_scope: str = "global"


def _linear(bounds, layer: int, num_layers: int) -> float:
  lo, hi = bounds
  return lo if num_layers == 1 else lo + (hi - lo) * layer / (num_layers - 1)


def layer_widths(cfg: ModelConfig) -> list[tuple[int, int, int]]:
  """`(num_heads, num_kv_heads, d_ff)` of each layer (OpenELM scaling).

  Heads round to a multiple of the GQA group size `num_heads /
  num_kv_heads`; the group size stays fixed across layers.
  """
  group = cfg.num_heads // (cfg.num_kv_heads or cfg.num_heads)
  widths = []
  for layer in range(cfg.num_layers):
    heads, d_ff = cfg.num_heads, cfg.d_ff
    if cfg.layerwise_heads is not None:
      alpha = _linear(cfg.layerwise_heads, layer, cfg.num_layers)
      heads = max(
        group, group * round(alpha * cfg.d_model / cfg.head_dim / group)
      )
    if cfg.layerwise_ffn is not None:
      d_ff = max(
        1,
        round(_linear(cfg.layerwise_ffn, layer, cfg.num_layers) * cfg.d_model),
      )
    widths.append((heads, heads // group, d_ff))
  return widths


def moe_lbl_scope(model_scope: str, lbl_axis=None) -> str:
  """The scope at which each MoE layer computes its own LBL: the one place
  that maps a model's `lbl_scope` to its layers'.

  "sequence" and "micro" are the layer's own. A model's "global" LBL is the
  loss of the whole batch: inside `shard_map` over the batch (`lbl_axis`
  given) each layer counts experts over those axes itself ("global");
  otherwise a layer call sees one microbatch ("micro"), and `lm_loss`
  combines the layers' `lbl_pieces` over every microbatch.

  Raises:
    ValueError: `lbl_axis` with a model scope other than "global".
  """
  if lbl_axis is None:
    return "micro" if model_scope == "global" else model_scope
  if model_scope != "global":
    raise ValueError(
      f"`lbl_axis` ({lbl_axis!r}) counts a global LBL, but the model's "
      f"`lbl_scope` is {model_scope!r}."
    )
  return "global"


def _ffn_config(cfg: ModelConfig, ffn: str, d_ff: int):
  if ffn == "mlp":
    return layers.MLPConfig(cfg.d_model, d_ff)
  moe = layers.MoEConfig(
    cfg.d_model,
    cfg.moe_d_ff,
    cfg.num_experts,
    top_k=cfg.top_k,
    score=cfg.router_score,
    lbl_scope=moe_lbl_scope(cfg.lbl_scope),
    shared_d_ff=cfg.moe_shared_d_ff if ffn == "moe" else 0,
  )
  if ffn == "moe":
    return moe
  return layers.MHMoEConfig(cfg.mhmoe_heads, moe)


def block_configs(cfg: ModelConfig) -> tuple[BlockConfig, ...]:
  """The static `BlockConfig` of each layer.

  Example:
    >>> [type(b.mixer).__name__ for b in block_configs(ModelConfig())]
    ['RecurrentConfig', 'RecurrentConfig', 'RecurrentConfig', 'AttentionConfig']
  """
  options = mixers.parse_options(cfg.mixer_options)
  return tuple(
    BlockConfig(
      kind,
      mixers.get(kind).config(
        mixers.LayerSpec(cfg, layer, heads, kv, options.get(kind, {}))
      ),
      _ffn_config(cfg, ffn, d_ff),
      cfg.parallel_block,
      cfg.norm_eps,
      cfg.lbl_scope,
    )
    for layer, (kind, ffn, (heads, kv, d_ff)) in enumerate(
      zip(cfg.mixers, cfg.ffns, layer_widths(cfg), strict=True)
    )
  )
