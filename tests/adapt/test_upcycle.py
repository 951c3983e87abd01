"""Upcycling: a neuron split with every expert at weight 1 is the dense FFN;
BTX / BAM of N copies of one model and a split with a zero router over all
experts give the dense model's loss; bad inputs name the argument."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import inference
from lightning_jax import layers
from lightning_jax import models
from lightning_jax import moe as moe_lib
from lightning_jax import parallel
from lightning_jax.adapt import upcycle

CFG = models.get_preset(
  "transformer",
  num_layers=2,
  vocab_size=64,
  d_model=16,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  d_ff=24,
)
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)


_forward = jax.jit(models.forward, static_argnums=2)


def _logits_of(params, tokens, cfg):
  return _forward(params, tokens, cfg)[0]


def _logits(params, cfg):
  return _logits_of(params, TOKENS, cfg)


@pytest.mark.parametrize("partition", upcycle.PARTITIONS)
def test_neuron_split_with_every_expert_at_weight_one_is_the_dense_ffn(
  partition,
):
  dense = layers.init_mlp(jax.random.key(0), layers.MLPConfig(16, 24))
  groups = upcycle.neuron_groups(dense["w_up"], 4, partition=partition)
  np.testing.assert_array_equal(np.sort(groups, axis=None), np.arange(24))
  experts = upcycle.split_mlp(dense, groups)
  x = jax.random.normal(jax.random.key(1), (5, 16))
  got = moe_lib.dropless_moe(
    x,
    jnp.ones((5, 4)),
    jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (5, 4)),
    moe_lib.GLUWeights(**experts),
  )
  want = layers.mlp(dense, x[None], layers.MLPConfig(16, 24))[0]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["btx", "bam", "bam-shared-kv"])
def test_copies_of_one_model_give_its_logits(method):
  dense = models.init(jax.random.key(0), CFG)
  params, cfg = upcycle.upcycle(method, [dense] * 3, CFG, top_k=2)
  assert cfg.ffns == ("moe", "moe") and cfg.num_experts == 3
  if method != "btx":
    assert cfg.mixers == ("attention_experts",) * 2
  np.testing.assert_allclose(
    _logits(params, cfg), _logits(dense, CFG), atol=1e-5, rtol=1e-5
  )


def test_split_with_a_zero_router_over_all_experts_is_the_dense_model():
  dense = models.init(jax.random.key(0), CFG)
  params, cfg = upcycle.split(dense, CFG, 4, top_k=4, router_std=0.0)
  assert cfg.moe_d_ff == 6
  np.testing.assert_allclose(
    _logits(params, cfg), _logits(dense, CFG), atol=1e-5, rtol=1e-5
  )


def test_kv_group_experts_at_weight_one_are_the_dense_gqa_attention():
  attn = layers.AttentionConfig(16, 6, 3, 8, impl="reference")
  dense = layers.init_attention(jax.random.key(0), attn)
  experts = upcycle.kv_group_experts(dense, 3)
  assert experts["wq"].shape == (3, 16, 2, 8)
  x = jax.random.normal(jax.random.key(1), (2, 7, 16))
  per_group = layers.AttentionConfig(16, 2, 1, 8, impl="reference")
  attention = jax.jit(layers.attention_layer, static_argnums=2)
  y_E = jax.vmap(attention, in_axes=(0, None, None))(experts, x, per_group)
  want = attention(dense, x, attn)
  np.testing.assert_allclose(y_E.sum(0), want, atol=1e-5, rtol=1e-5)


def test_split_attention_with_zero_routers_over_all_experts_is_dense():
  dense = models.init(jax.random.key(0), CFG)
  params, new_cfg = upcycle.upcycle(
    "split",
    [dense],
    CFG,
    num_experts=2,
    top_k=2,
    split_attention=True,
  )
  assert new_cfg.mixers == ("attention_experts",) * 2
  zero = lambda path, w: 0 * w if "router" in str(path) else w
  params = jax.tree_util.tree_map_with_path(zero, params)
  np.testing.assert_allclose(
    _logits(params, new_cfg), _logits(dense, CFG), atol=1e-5, rtol=1e-5
  )


def test_split_with_a_shared_expert_at_weight_one_is_the_dense_model():
  dense = models.init(jax.random.key(0), CFG)
  params, cfg = upcycle.split(dense, CFG, 3, top_k=3, shared=True, router_std=0)
  assert cfg.moe_d_ff == cfg.moe_shared_d_ff == 6
  assert params["layers"][0]["ffn"]["shared"]["w_down"].shape == (6, 16)
  np.testing.assert_allclose(
    _logits(params, cfg), _logits(dense, CFG), atol=1e-5, rtol=1e-5
  )
  # the shared expert runs for every token: counted whole per token
  without = dataclasses.replace(cfg, moe_shared_d_ff=0)
  shared_params = CFG.num_layers * 3 * 16 * 6
  assert models.active_params(cfg) - models.active_params(without) == (
    shared_params
  )
  # and shards as a dense MLP (tensor-parallel over its width)
  names = ("layers", "0", "ffn", "shared", "w_down")
  assert parallel.sharding.match_rule(names)[1] == ("ffn", "embed")


def test_upcycled_split_decodes_like_its_forward():
  """A split with KV-group attention experts and a shared expert, routed
  top-2 by random routers: greedy decoding (prefill + cached steps) is the
  argmax chain of the full forward pass."""
  dense = models.init(jax.random.key(0), CFG)
  params, cfg = upcycle.split(
    dense, CFG, 3, top_k=2, shared=True, split_attention=True
  )
  prompt, lengths, new_tokens = TOKENS[:, :5], np.array([5, 3], np.int32), 3
  new = inference.generate(
    params,
    prompt,
    lengths,
    cfg,
    max_new_tokens=new_tokens,
    key=jax.random.key(0),
    sampling_cfg=inference.SamplingConfig(temperature=0.0),
  )
  seqs = np.zeros((2, 5 + new_tokens), np.int32)
  for b, n in enumerate(lengths):
    seqs[b, : n + new_tokens] = np.concatenate([prompt[b, :n], new[b]])
  logits = _logits_of(params, seqs, cfg)
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(
      np.argmax(logits[b, n - 1 : n - 1 + new_tokens], axis=-1), new[b]
    )


def test_centroid_router_sends_each_cluster_to_its_centroids_expert():
  means = 10.0 * np.eye(16)[:4]  # 4 well-separated clusters in 16-D
  cluster = np.repeat(np.arange(4), 6)
  noise = jax.random.normal(jax.random.key(0), (24, 16))
  x = means[cluster] + 0.1 * np.asarray(noise)
  router, labels = upcycle.centroid_router(x, 4)
  routed = np.argmax(x @ np.asarray(router), axis=-1)
  np.testing.assert_array_equal(routed, labels)
  # one expert per cluster, a different one for each
  assert len({tuple(np.unique(routed[cluster == c])) for c in range(4)}) == 4
  assert all(len(np.unique(routed[cluster == c])) == 1 for c in range(4))


def test_calibrated_split_routers_are_the_centroids_of_its_ffn_inputs():
  dense = models.init(jax.random.key(0), CFG)
  params, cfg = upcycle.split(
    dense, CFG, 2, top_k=2, partition="cluster", calibration_BxT=TOKENS
  )
  inputs = upcycle.ffn_inputs(dense, TOKENS, CFG)
  assert [x.shape for x in inputs] == [(16, 16)] * 2
  router, _ = upcycle.centroid_router(inputs[1], 2, seed=1)
  np.testing.assert_array_equal(params["layers"][1]["ffn"]["router"], router)
  assert np.isfinite(_logits(params, cfg)).all()


def test_bad_inputs_name_the_argument():
  dense = models.init(jax.random.key(0), CFG)
  with pytest.raises(ValueError, match="num_experts.*divide d_ff"):
    upcycle.upcycle("split", [dense], CFG, num_experts=5)
  with pytest.raises(ValueError, match="params_list.*>= 2"):
    upcycle.upcycle("btx", [dense], CFG)
  with pytest.raises(ValueError, match=r"params_list\[1\]"):
    other = models.init(jax.random.key(0), models.get_preset("transformer"))
    upcycle.upcycle("btx", [dense, other], CFG)
  with pytest.raises(ValueError, match="methods: .*split"):
    upcycle.upcycle("dare", [dense], CFG)
  with pytest.raises(ValueError, match="calibration_BxT.*btx"):
    upcycle.upcycle("btx", [dense] * 2, CFG, calibration_BxT=TOKENS)
  with pytest.raises(ValueError, match=r"num_experts.*\+ 1 shared"):
    upcycle.split(dense, CFG, 4, shared=True)
  with pytest.raises(ValueError, match="num_kv_heads >= 2"):
    mha = dataclasses.replace(CFG, num_heads=2, num_kv_heads=1)
    upcycle.split(
      models.init(jax.random.key(0), mha), mha, 2, split_attention=True
    )
