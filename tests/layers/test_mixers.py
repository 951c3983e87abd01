"""The mixer registry: a toy mixer registered here, outside the package,
trains (on a pipelined mesh), pipelines (== the sequential gradient) and
decodes (== forward) with no library change; errors list the kinds."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import inference
from lightning_jax import layers
from lightning_jax import models
from lightning_jax import parallel
from lightning_jax import training
from lightning_jax.layers import mixers
from lightning_jax.parallel import pipeline
from tests import mixer_testing as mt

TOY = "toy_ema"


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """An exponential moving average of a projection, `s_t = a s_{t-1} +
  (1 - a) x_t W_in`, `y_t = s_t W_out`."""

  d_model: int
  width: int
  decay: float = 0.5


def _toy_init(key, cfg, *, layer, num_layers):
  del layer, num_layers
  k_in, k_out = jax.random.split(key)
  return {
    "w_in": layers.dense_init(k_in, (cfg.d_model, cfg.width), jnp.float32),
    "w_out": layers.dense_init(k_out, (cfg.width, cfg.d_model), jnp.float32),
  }


def _toy_empty_state(cfg, batch, max_len, dtype):
  del max_len, dtype
  return jnp.zeros((batch, cfg.width), jnp.float32)


def _toy_apply(params, x_BxTxD, cfg, state=None, decoding=None):
  valid, unshift = jnp.ones(x_BxTxD.shape[:2], bool), lambda y: y
  if decoding is not None and x_BxTxD.shape[1] > 1:
    x_BxTxD, valid, unshift = mixers.left_align(x_BxTxD, decoding.lengths_B)
  u = jnp.einsum("btd,dc->btc", x_BxTxD, params["w_in"]).astype(jnp.float32)
  if state is None:  # from the input: varies over the same mesh axes
    state = jnp.zeros_like(u[:, 0])

  def step(s, inputs):
    u_t, valid_t = inputs
    s = jnp.where(valid_t[:, None], cfg.decay * s + (1 - cfg.decay) * u_t, s)
    return s, s

  state, s_BxTxC = jax.lax.scan(
    step, state, (jnp.swapaxes(u, 0, 1), jnp.swapaxes(valid, 0, 1))
  )
  y = jnp.einsum(
    "btc,cd->btd",
    jnp.swapaxes(s_BxTxC, 0, 1).astype(x_BxTxD.dtype),
    params["w_out"],
  )
  return unshift(y), state


def _toy_config(spec):
  return mixers.with_options(ToyConfig(spec.model.d_model, 8), spec.options)


if TOY not in mixers.kinds():  # the module may be imported twice
  mixers.register(
    mixers.Mixer(
      name=TOY,
      config=_toy_config,
      init=_toy_init,
      apply=_toy_apply,
      empty_state=_toy_empty_state,
      flops=lambda cfg, seq_len: 3.0 * cfg.d_model,  # decay, mix, add
      rules=((("w_in",), ("embed", None)), (("w_out",), (None, "embed"))),
      doc="A toy exponential moving average, registered by a test.",
    )
  )

CFG = models.get_preset(
  "transformer",
  pattern=(TOY, "attention"),
  num_layers=4,
  vocab_size=256,
  d_model=16,
  num_heads=2,
  head_dim=8,
  d_ff=16,
  mixer_options=(f"{TOY}.decay=0.75",),
)


def test_options_reach_the_toy_config_and_unknown_kinds_list_the_registry():
  assert models.block_configs(CFG)[0].mixer == ToyConfig(16, 8, 0.75)
  with pytest.raises(ValueError, match=f"registered mixers: .*{TOY}"):
    mixers.get("rwkv")
  with pytest.raises(ValueError, match="Unknown mixer option.*colour"):
    models.block_configs(
      dataclasses.replace(CFG, mixer_options=(f"{TOY}.colour=1",))
    )
  with pytest.raises(ValueError, match="already registered"):
    mixers.register(mixers.get(TOY))


def test_toy_mixer_decodes_like_forward():
  params = models.init(jax.random.key(0), CFG)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 256)
  lengths = jnp.array([6, 3])
  logits, state = inference.prefill(params, tokens[:, :6], lengths, CFG, 9)
  got = [logits]
  for i in range(2):
    token = jnp.take_along_axis(tokens, (lengths + i)[:, None], 1)[:, 0]
    logits, state = inference.decode_step(params, state, token, CFG)
    got.append(logits)
  full = models.forward(params, tokens, CFG)[0]
  want = jnp.take_along_axis(
    full, (lengths[:, None] - 1 + jnp.arange(3)[None])[..., None], axis=1
  )
  np.testing.assert_allclose(jnp.stack(got, 1), want, atol=2e-5, rtol=2e-5)


def test_toy_mixer_pipelines_like_the_sequential_model():
  params = models.init(jax.random.key(0), CFG)
  batch = {
    "inputs": jax.random.randint(jax.random.key(1), (4, 8), 0, 256),
    "targets": jax.random.randint(jax.random.key(2), (4, 8), 0, 256),
    "mask": jnp.ones((4, 8)),
  }
  loss_cfg = training.LossConfig()
  want = jax.jit(
    jax.value_and_grad(
      functools.partial(training.loss_fn, model_cfg=CFG, loss_cfg=loss_cfg),
      has_aux=True,
    )
  )(params, batch, jax.random.key(0))
  mesh = parallel.make_mesh({"pipe": 2}, devices=jax.devices()[:2])
  grad_fn = pipeline.pipeline_grad_fn(
    CFG, loss_cfg, mesh, schedule="1f1b", num_microbatches=2
  )
  (loss, _), grads = jax.jit(grad_fn)(
    pipeline.to_pipeline_params(params, 2), batch, jax.random.key(0)
  )
  np.testing.assert_allclose(loss, want[0][0], rtol=1e-5)
  for g, w in zip(
    jax.tree.leaves(pipeline.from_pipeline_params(grads)),
    jax.tree.leaves(want[1]),
    strict=True,
  ):
    np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_toy_mixer_trains_on_a_pipelined_mesh(tmp_path):
  result = training.train(
    training.TrainConfig(
      model=CFG,
      workdir=str(tmp_path),
      steps=6,
      batch_size=8,
      seq_len=16,
      mesh="data=4,pipe=2",
      microbatches=2,
      checkpoint_every=0,
      log_every=1,
      optim=training.OptimConfig(total_steps=6, warmup_steps=0),
    )
  )
  losses = [row["loss"] for row in result.history]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


class EveryMixerTest(chex.TestCase):
  """Registry-wide: the training call equals a prefill of full-length rows
  from the empty state, with and without `jit` (chex variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_training_call_equals_full_length_prefill(self):
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    for kind in mixers.kinds():
      cfg = models.get_preset(
        "transformer",
        pattern=(kind,),
        num_layers=1,
        d_model=16,
        num_heads=2,
        head_dim=8,
        chunk_size=4,
        **mt.overrides(kind, 1, 2),
      )
      block = models.block_configs(cfg)[0]
      mixer = mixers.get(kind)
      params = mixer.init(jax.random.key(0), block.mixer, layer=0, num_layers=1)
      empty = mixer.empty_state(block.mixer, 2, 8, jnp.float32)
      apply = self.variant(functools.partial(mixer.apply, cfg=block.mixer))
      want, _ = apply(params, x)
      got, state = apply(
        params,
        x,
        state=empty,
        decoding=layers.Decoding(jnp.full((2,), 6, jnp.int32)),
      )
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=kind)
      chex.assert_trees_all_equal_shapes_and_dtypes(state, empty)


def test_recurrent_impl_auto_is_chunked_to_train_and_recurrent_to_prefill():
  prefill = mixers.Decoding(jnp.array([5, 3]))
  assert mixers.recurrent_impl("auto", 8, None) == "chunked"
  assert jax.default_backend() == "cpu"  # the suite's backend
  assert mixers.recurrent_impl("auto", 8, prefill) == "recurrent"
  assert mixers.recurrent_impl("chunked", 8, prefill) == "chunked"
  for impl in mixers.RECURRENT_IMPLS:  # one token: the recurrent step
    assert mixers.recurrent_impl(impl, 1, prefill) == "recurrent"
  with pytest.raises(ValueError, match="recurrent_impl"):
    models.get_preset("deltanet", recurrent_impl="fast")
