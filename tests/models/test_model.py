"""Models: causality of every mixer, block pattern, layer-wise scaling,
presets, parallel blocks, dtypes and errors."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import layers
from lightning_jax import models
from tests import mixer_testing as mt

SMALL = dict(
  vocab_size=32,
  d_model=16,
  num_heads=2,
  head_dim=8,
  d_ff=24,
  moe_d_ff=8,
  num_experts=4,
  chunk_size=4,
)


def _small(name="tiny-hybrid", **overrides):
  return models.get_preset(name, **{**SMALL, **overrides})


# Every registered mixer, the channel mixers cycled over them.
MIXER_FFNS = [
  (kind, models.FFNS[i % len(models.FFNS)]) for i, kind in enumerate(mt.kinds())
]


@pytest.mark.parametrize("mixer,ffn", MIXER_FFNS)
def test_every_mixer_is_causal(mixer, ffn):
  """d logits[:, t] / d inputs[:, s] is exactly 0 for every s > t."""
  cfg = _small(
    pattern=(mixer,),
    ffn_pattern=(ffn,),
    num_layers=1,
    **mt.overrides(mixer, 1, 2),
  )
  params = models.init(jax.random.key(0), cfg)
  block = models.block_configs(cfg)[0]
  t = 6

  @jax.jit
  def grad_wrt_inputs(h):
    def logit_sum(h):
      out, _, _ = models.apply_block(params["layers"][0], h, block)
      return jnp.sum(models.head(params, out, cfg)[:, t])

    return jax.grad(logit_sum)(h)

  h = jax.random.normal(jax.random.key(1), (2, 13, cfg.d_model))
  g = grad_wrt_inputs(h)
  assert np.all(g[:, t + 1 :] == 0.0), f"{mixer}: future leaks into t={t}"
  assert np.any(g[:, : t + 1] != 0.0)


def test_pattern_repeats_and_layerwise_scaling_grows_widths():
  cfg = _small(
    pattern=("deltanet", "deltanet", "attention"),
    num_layers=6,
    d_model=32,
    num_heads=4,
    layerwise_heads=(0.5, 1.0),
    layerwise_ffn=(0.5, 4.0),
  )
  assert cfg.mixers == ("deltanet", "deltanet", "attention") * 2
  widths = models.layer_widths(cfg)
  heads = [w[0] for w in widths]
  d_ffs = [w[2] for w in widths]
  # OpenELM: alpha from 0.5 to 1 of d_model / head_dim = 4 heads; beta from
  # 0.5 to 4 of d_model = 32.
  assert heads == [2, 2, 3, 3, 4, 4] and d_ffs == [16, 38, 61, 83, 106, 128]
  params = models.init(jax.random.key(0), cfg)
  assert params["layers"][5]["mixer"]["wq"].shape == (32, 4, 8)
  assert params["layers"][2]["mixer"]["wk"].shape == (32, 3, 8)
  assert params["layers"][0]["ffn"]["w_up"].shape == (32, 16)
  logits, _ = jax.eval_shape(
    lambda p, x: models.forward(p, x, cfg), params, jnp.zeros((1, 5), jnp.int32)
  )
  assert logits.shape == (1, 5, 32)


def test_moe_aux_per_layer_and_parallel_block():
  cfg = _small("moe-hybrid", num_layers=2, parallel_block=True)
  params = models.init(jax.random.key(0), cfg)
  assert "ffn_norm" not in params["layers"][0]
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
  logits, aux = jax.jit(models.forward, static_argnums=2)(params, tokens, cfg)
  assert len(aux.moe) == 2
  assert aux.moe[0].lbl_pieces.expert_counts.shape == (4,)
  np.testing.assert_allclose(
    jnp.sum(aux.moe[0].lbl_pieces.expert_counts), 2 * 8 * cfg.top_k
  )
  assert logits.dtype == jnp.float32


def test_one_function_maps_the_model_lbl_scope_to_the_layers():
  assert [models.moe_lbl_scope(s) for s in ("global", "micro", "sequence")] == [
    "micro",
    "micro",
    "sequence",
  ]
  assert models.moe_lbl_scope("global", "data") == "global"
  for scope in ("micro", "sequence"):
    cfg = _small("moe-hybrid", num_layers=1, lbl_scope=scope)
    assert models.block_configs(cfg)[0].ffn.lbl_scope == scope
    # A global count over mesh axes only makes sense for a global loss.
    with pytest.raises(ValueError, match="lbl_axis"):
      models.forward(
        models.init(jax.random.key(0), cfg),
        jnp.zeros((2, 4), jnp.int32),
        cfg,
        lbl_axis="data",
      )


def test_bf16_compute_close_to_fp32_and_untied_head():
  cfg = _small("transformer", num_layers=2, tie_embeddings=False)
  params = models.init(jax.random.key(0), cfg)
  assert params["unembed"].shape == (16, 32)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
  fwd = jax.jit(models.forward, static_argnums=2)
  ref, _ = fwd(params, tokens, cfg)
  got, _ = fwd(params, tokens, dataclasses.replace(cfg, dtype="bfloat16"))
  assert got.dtype == jnp.float32
  # bf16 activations: 3% of the logit scale.
  np.testing.assert_allclose(got, ref, atol=0.03 * float(jnp.std(ref)) + 0.02)


def test_presets_exist_and_errors_name_the_field():
  for name in ("tiny-hybrid", "tnl", "deltanet", "transformer", "moe-hybrid"):
    assert name in models.preset_names()
  assert models.get_preset("moe-hybrid").lbl_scope == "global"
  with pytest.raises(ValueError, match="preset"):
    models.get_preset("gpt5")
  with pytest.raises(ValueError, match="d_modle"):
    models.get_preset("tnl", d_modle=3)
  with pytest.raises(ValueError, match="registered mixers: .*deltanet"):
    models.ModelConfig(pattern=("rwkv",))
  with pytest.raises(ValueError, match="moa_plan"):
    models.ModelConfig(pattern=("moa",))
  with pytest.raises(ValueError, match="layerwise_heads"):
    models.ModelConfig(layerwise_heads=(1.0, 0.5))
  with pytest.raises(ValueError, match="tokens_BxT"):
    models.embed({"embed": jnp.ones((4, 2))}, jnp.ones((2, 3)), _small())


def test_moa_plan_rows_are_layers_and_columns_heads():
  """Checked with the config (before any init), and named correctly."""
  plan = mt.moa_plan
  cfg = functools.partial(
    models.ModelConfig, pattern=("moa", "deltanet"), num_layers=4
  )
  cfg(moa_plan=plan(2, 4))  # attention layers 0 and 2, 4 heads each
  for rows in (1, 3):
    with pytest.raises(
      ValueError,
      match=r"one row per softmax-attention layer: the model has 2 "
      rf"\(layers \[0, 2\]\), the plan {rows} rows",
    ):
      cfg(moa_plan=plan(rows, 4))
  with pytest.raises(
    ValueError,
    match=r"`moa_plan` row 0 has 2 heads, but attention layer 0 \(layer 0\) "
    "has 4",
  ):
    cfg(moa_plan=plan(2, 2))


def test_config_round_trips_through_json():
  cfg = _small(
    "moe-hybrid",
    layerwise_heads=(0.5, 1.0),
    mixer_options=("deltanet.value_dim=8",),
  )
  text = json.dumps(cfg.to_dict())
  assert models.ModelConfig.from_dict(json.loads(text)) == cfg
  moa = _small("transformer", pattern=("moa",), **mt.overrides("moa", 4, 2))
  assert (
    models.ModelConfig.from_dict(json.loads(json.dumps(moa.to_dict()))) == moa
  )
  with pytest.raises(ValueError, match="colour"):
    models.ModelConfig.from_dict({"colour": 1})


def test_recurrent_layers_of_a_kind_stack():
  """Same kind => same param structure and shapes (pipeline stages)."""
  cfg = _small("tnl", num_layers=3)
  params = models.init(jax.random.key(0), cfg)
  structs = {jax.tree.structure(p) for p in params["layers"]}
  assert len(structs) == 1
  assert len({b for b in models.block_configs(cfg)}) == 1
  assert isinstance(models.block_configs(cfg)[0].mixer, layers.RecurrentConfig)


def test_one_head_gla_model_compiles_its_gradient():
  """XLA:CPU 0.10 crashed (segmentation fault) compiling this gradient when
  GLA's sub-block math kept the size-1 head axis between the batch and
  chunk axes (`[4, 1, n, C, D]`); found by the scaling sweep's hgrn2-32x2
  run. `ops.drop_unit_axes` drops it."""
  cfg = _small("hgrn2", num_heads=1, head_dim=16, chunk_size=16, num_layers=2)
  params = models.init(jax.random.key(0), cfg)
  tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, 32)
  loss = lambda p: jnp.mean(models.forward(p, tokens, cfg)[0] ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert all(jnp.isfinite(g).all() for g in jax.tree.leaves(grads))
