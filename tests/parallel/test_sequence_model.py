"""The model on a mesh with a `seq` axis == the model on one device.

Under a mesh with `seq` > 1 the recurrent mixers run their sequence-parallel
ops (one all-gather of state maps, the short conv's halo by `ppermute`) and
attention (and each attention expert) gathers the keys and values its
windows reach: logits and every parameter gradient equal the unsplit
model's (fp32, atol 1e-5).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import models
from lightning_jax import ops
from lightning_jax import parallel

# 24 tokens over seq=4: 6 per device, not a multiple of the chunk (4); the
# conv's K - 1 = 3 halo tokens come from the previous device.
KINDS = (
  "lightning",
  "deltanet",
  "gated_deltanet",
  "hgrn2",
  "mamba2",
  "cosformer2",
  "attention",
  "attention_experts",
)
CFG = models.ModelConfig(
  vocab_size=64,
  d_model=16,
  num_layers=len(KINDS),
  pattern=KINDS,
  num_heads=2,
  head_dim=8,
  d_ff=32,
  conv_size=4,
  chunk_size=4,
)


# Windows whose keys lie on the previous 2 devices (11: the 10 keys before
# a 6-token chunk, a halo of 2 ppermutes; on device 2 halo and sink meet,
# on device 3 they do not) and on every earlier device (20: the
# all-gather), with a 2-token sink; the conv's 7-token halo also spans 2
# devices.
MOA = dataclasses.replace(
  CFG,
  num_layers=3,
  pattern=("deltanet", "moa", "moa"),
  conv_size=8,
  sink=2,
  moa_plan=ops.MoAPlan(
    alphas=((11.0, 3.0), (1.0, 20.0)), betas=((0.0, 0.0),) * 2
  ),
)


def _loss_and_grads(params, tokens, cfg):
  def loss(p):
    logits, _ = models.forward(p, tokens, cfg)
    return jnp.mean(jax.nn.log_softmax(logits)[..., :8] ** 2), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("cfg", [CFG, MOA], ids=["every_kind", "moa_windows"])
def test_sequence_parallel_model_matches_single_device(cfg):
  params = models.init(jax.random.key(0), cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
  (_, want), want_grads = _loss_and_grads(params, tokens, cfg)
  mesh = parallel.make_mesh("data=2,seq=4")
  with jax.set_mesh(mesh):
    (_, got), got_grads = _loss_and_grads(params, tokens, cfg)
    hlo = (
      jax.jit(models.forward, static_argnums=2)
      .lower(params, tokens, cfg)
      .as_text()
    )
  # Halo permutes (convs, windows), state-map gathers of the recurrent
  # layers, key / value (and sink) gathers of attention.
  assert "collective_permute" in hlo and "all_gather" in hlo
  np.testing.assert_allclose(got, want, atol=1e-5)
  for (path, g), w in zip(
    jax.tree_util.tree_leaves_with_path(got_grads),
    jax.tree.leaves(want_grads),
    strict=True,
  ):
    np.testing.assert_allclose(
      g, w, atol=1e-5, err_msg=jax.tree_util.keystr(path)
    )


def test_seq_len_not_divisible_by_the_seq_axis_is_one_error():
  params = jax.eval_shape(lambda: models.init(jax.random.key(0), CFG))
  tokens = jax.ShapeDtypeStruct((2, 22), jnp.int32)
  with jax.set_mesh(parallel.make_mesh("data=2,seq=4")):
    with pytest.raises(
      ValueError, match=r"`seq_len` 22 must be divisible by the mesh's 'seq'"
    ):
      jax.eval_shape(lambda p, t: models.forward(p, t, CFG), params, tokens)
