"""QLoRA == LoRA over the dequantised base; sharded == single device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import adapt
from lightning_jax import models
from lightning_jax import parallel
from lightning_jax.adapt import lora
from lightning_jax.adapt import qlora
from tests.adapt import adapt_testing

CFG = models.get_preset(
  "moe-hybrid",
  pattern=("attention",),
  d_model=64,
  num_layers=1,
  num_heads=4,
  head_dim=16,
  num_experts=4,
  moe_d_ff=64,
  vocab_size=64,
)
LORA = adapt.LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def setup():
  base = adapt_testing.init_params(CFG)
  adapters = adapt_testing.random_b(lora.init(jax.random.key(1), base, LORA), 2)
  tokens = jax.random.randint(jax.random.key(3), (4, 8), 0, CFG.vocab_size)
  return jax.jit(qlora.quantize)(base), adapters, tokens


def _logits(frozen, adapters, tokens):
  return models.forward(lora.apply(frozen, adapters, LORA), tokens, CFG)[0]


def test_qlora_equals_lora_over_the_dequantised_base(setup):
  quantized, adapters, tokens = setup
  assert isinstance(quantized["layers"][0]["mixer"]["wo"], adapt.NF4Tensor)
  assert not isinstance(quantized["embed"], adapt.NF4Tensor)
  dense = qlora.dequantize(quantized)
  logits = jax.jit(_logits)
  np.testing.assert_array_equal(
    logits(quantized, adapters, tokens), logits(dense, adapters, tokens)
  )


def test_sharded_qlora_equals_single_device(setup):
  """On data=2 x fsdp=2 x tensor=2: NF4 leaves sharded like the weights
  they replace; logits equal one device's up to reassociation."""
  quantized, adapters, tokens = setup
  mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
  shardings = qlora.shardings(quantized, mesh)
  wq = shardings["layers"][0]["mixer"]["wq"]  # [64, 4, 16] on (fsdp, tensor)
  dense_spec = parallel.param_partition_specs(
    {"mixer": {"wq": jnp.zeros((64, 4, 16))}}, mesh
  )["mixer"]["wq"]
  assert tuple(wq.packed.spec) == tuple(dense_spec) == ("fsdp", "tensor", None)
  # A 64-element block spans all 4 heads of 16: absmax [64, 1] keeps fsdp.
  assert tuple(wq.absmax_codes.spec) == ("fsdp", None)
  experts = shardings["layers"][0]["ffn"]["experts"]["w_up"]
  assert experts.packed.spec[-1] is not None  # [E, D, F / 2]: F split
  placed = jax.device_put(quantized, shardings)
  placed_ad = jax.device_put(adapters, parallel.param_shardings(adapters, mesh))
  placed_tokens = jax.device_put(tokens, parallel.batch_sharding(mesh))
  sharded = jax.jit(_logits)(placed, placed_ad, placed_tokens)
  single = jax.jit(_logits)(quantized, adapters, tokens)
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)


def test_quantize_errors(setup):
  quantized, _, _ = setup
  base = qlora.dequantize(quantized)
  with pytest.raises(ValueError, match="`patterns` pattern .* matches no"):
    qlora.quantize(base, patterns=(r".*mixer/in_proj",))
  with pytest.raises(ValueError, match="leaf 'layers/0/mixer/wk'.* = 6 "):
    qlora.quantize(base, patterns=(adapt.ATTENTION,), block_size=6)
