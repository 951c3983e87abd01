"""tools/reprolib.py: planted recall, density matching, MH-MoE matching and
the routes behind the expert-activation statistics."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import models
from lightning_jax import ops
from lightning_jax import training
from tools import reprolib


def test_recall_queries_target_the_value_defined_earlier():
  text = training.make_dataset(
    "corpus", seq_len=64, global_batch_size=4, seed=0
  ).batch(0)
  b = reprolib.recall_batch(text, np.random.default_rng(0), pairs=5)
  byte = training.data.BYTE_VOCAB_SIZE
  np.testing.assert_array_equal(b["recall"].sum(1), 5)
  for row in range(4):
    inputs, targets = b["inputs"][row], b["targets"][row]
    keys = inputs[b["recall"][row] == 1]
    assert len(set(keys)) == 5 and (keys >= byte).all()
    for t in np.flatnonzero(b["recall"][row]):
      key, value = inputs[t] - byte, targets[t] - byte - reprolib.RECALL_KEYS
      assert 0 <= key < reprolib.RECALL_KEYS
      assert 0 <= value < reprolib.RECALL_VALUES
      definition = (
        reprolib.RECALL_VOCAB
        - reprolib.RECALL_KEYS * (reprolib.RECALL_VALUES)
        + key * reprolib.RECALL_VALUES
        + value
      )
      assert (inputs[:t] == definition).sum() == 1
    text_pos = b["text"][row] == 1
    assert (inputs[text_pos] < byte).all() and (targets[text_pos] < byte).all()


def test_uniform_window_has_the_plan_density():
  plan = ops.MoAPlan(alphas=((0.0, 16.0, 64.0),), betas=((0.5, 0.0, 0.125),))
  for n in (128, 512):
    density = reprolib.plan_density(plan, n, sink=4)
    w = reprolib.uniform_window(density, n, sink=4)
    uniform = reprolib.uniform_plan(w, plan)
    np.testing.assert_array_equal(uniform.windows(0, n), [w] * 3)
    # Neighbouring windows' densities differ by < 2 / n.
    assert abs(reprolib.plan_density(uniform, n, 4) - density) < 1 / n


def test_matched_mhmoe_and_its_routes():
  moe_cfg = models.get_preset(
    "transformer",
    vocab_size=32,
    d_model=16,
    num_layers=1,
    num_heads=2,
    head_dim=8,
    ffn_pattern=("moe",),
    num_experts=4,
    top_k=1,
    moe_d_ff=64,
  )
  mh, dp, df = reprolib.matched_mhmoe(moe_cfg, heads=2, seq_len=8)
  assert abs(dp) < 0.02 and abs(df) < 0.02
  assert mh.ffn_pattern == ("mhmoe",) and mh.mhmoe_heads == 2
  np.testing.assert_allclose(
    models.num_params(mh), models.num_params(moe_cfg) * (1 + dp)
  )
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 32, (2, 8)))
  for cfg, slots in ((moe_cfg, 1), (mh, 2)):
    # Random params of init's shapes (cheaper than running init).
    params = jax.tree.map(
      lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
      jax.eval_shape(functools.partial(models.init, jax.random.key(0), cfg)),
    )
    (experts,) = jax.jit(reprolib.expert_routes, static_argnums=2)(
      params, tokens, cfg
    )
    assert experts.shape == (2, 8, slots)
    # The replayed routes are the ones the model's layer counted.
    counts = reprolib.forward(params, tokens, cfg)[1].moe[0].lbl_pieces
    np.testing.assert_array_equal(
      jnp.bincount(experts.ravel(), length=cfg.num_experts),
      counts.expert_counts,
    )
    stats = reprolib.expert_activation(experts, cfg.num_experts)
    assert 1 <= stats["experts_per_token"] <= slots
    assert stats["token"] <= stats["sequence"] <= stats["batch"] <= 1
  moe_stats = reprolib.expert_activation(
    jnp.array([[[0], [1]], [[0], [0]]]), num_experts=4
  )
  assert moe_stats == {
    "experts_per_token": 1.0,
    "token": 0.25,
    "sequence": 0.375,
    "batch": 0.5,
  }


def test_sparse_config_runs_the_plan_on_every_attention_layer():
  cfg = models.get_preset("transformer", num_layers=2, num_heads=2)
  plan = reprolib.uniform_plan(
    8, ops.MoAPlan(((0.0, 0.0),) * 2, ((1.0, 1.0),) * 2)
  )
  sparse = reprolib.sparse_config(cfg, plan, sink=2)
  assert sparse.mixers == ("moa", "moa") and sparse.sink == 2
  assert (
    dataclasses.replace(sparse, pattern=cfg.pattern, moa_plan=None, sink=0)
    == cfg
  )
