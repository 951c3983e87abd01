"""Named model presets; every field can be overridden."""

import dataclasses

from lightning_jax.models.config import ModelConfig

PRESETS = {
    # Three DeltaNet layers then softmax attention; trains on 2 CPU cores in
    # minutes.
    "tiny-hybrid": ModelConfig(),
    # TransNormerLLM: Lightning Attention with fixed per-head decays.
    "tnl": ModelConfig(pattern=("lightning",), num_layers=4),
    "deltanet": ModelConfig(pattern=("deltanet",), num_layers=4),
    "gated-deltanet": ModelConfig(pattern=("gated_deltanet",), num_layers=4),
    "hgrn2": ModelConfig(pattern=("hgrn2",), num_layers=4),
    "transformer": ModelConfig(pattern=("attention",), num_layers=4),
    # DeltaNet / attention with dropless top-2-of-8 MoE FFNs and the exact
    # global-batch load-balancing loss.
    "moe-hybrid": ModelConfig(pattern=("deltanet", "attention"),
                              ffn_pattern=("moe",), num_layers=4,
                              num_experts=8, top_k=2, moe_d_ff=128,
                              lbl_scope="global"),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """The preset `name` with fields replaced by `overrides`.

  Raises:
    ValueError: unknown preset or field (names the accepted ones).

  Example:
    >>> get_preset("tnl", d_model=64).d_model
    64
  """
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; presets: "
                     f"{sorted(PRESETS)}.")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown model config field(s) {unknown}; fields: "
                     f"{sorted(fields)}.")
  return dataclasses.replace(PRESETS[name], **overrides)
