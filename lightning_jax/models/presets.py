"""Named model presets; every field can be overridden.

`PRESETS` holds the hand-written ones; every registered mixer with a
`Mixer.preset` adds one more, named like its kind with "-" for "_".
"""

import dataclasses

from lightning_jax.layers import mixers
from lightning_jax.models.config import ModelConfig

PRESETS = {
  # Three DeltaNet layers then softmax attention; trains on 2 CPU cores in
  # minutes.
  "tiny-hybrid": ModelConfig(),
  # TransNormerLLM: Lightning Attention with fixed per-head decays.
  "tnl": ModelConfig(pattern=("lightning",), num_layers=4),
  "transformer": ModelConfig(pattern=("attention",), num_layers=4),
  # DeltaNet / attention with dropless top-2-of-8 MoE FFNs and the exact
  # global-batch load-balancing loss.
  "moe-hybrid": ModelConfig(
    pattern=("deltanet", "attention"),
    ffn_pattern=("moe",),
    num_layers=4,
    num_experts=8,
    top_k=2,
    moe_d_ff=128,
    lbl_scope="global",
  ),
}


def _mixer_presets() -> dict[str, ModelConfig]:
  return {
    kind.replace("_", "-"): ModelConfig(
      pattern=(kind,), **mixers.get(kind).preset
    )
    for kind in mixers.kinds()
    if mixers.get(kind).preset is not None
  }


def preset_names() -> tuple[str, ...]:
  """Every preset name, sorted (hand-written and per registered mixer)."""
  return tuple(sorted({**_mixer_presets(), **PRESETS}))


def get_preset(name: str, **overrides) -> ModelConfig:
  """The preset `name` with fields replaced by `overrides`.

  Raises:
    ValueError: unknown preset or field (names the accepted ones).

  Example:
    >>> get_preset("tnl", d_model=64).d_model
    64
  """
  presets = {**_mixer_presets(), **PRESETS}
  if name not in presets:
    raise ValueError(
      f"Unknown model preset {name!r}; presets: {list(preset_names())}."
    )
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
      f"Unknown model config field(s) {unknown}; fields: {sorted(fields)}."
    )
  return dataclasses.replace(presets[name], **overrides)
