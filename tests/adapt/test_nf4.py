"""NF4 and double quantisation == a NumPy transcription of bitsandbytes.

The reference below transcribes bitsandbytes' CUDA kernels element by
element (`csrc/kernels.cu`: `kQuantizeBlockwise`, `dQuantizeNF4`'s decision
tree, `dQuantize<0>`'s binary search) and `functional.quantize_4bit(...,
compress_statistics=True)`; the library computes the same vectorised.
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import adapt
from lightning_jax.adapt import nf4

F32 = np.float32


def _tree_nf4(x: float) -> int:
  """`dQuantizeNF4` (kernels.cu), branch by branch."""
  t = lambda v: float(F32(v))  # noqa: E731 (the kernel's float literals)
  if x > t(0.03979014977812767):
    if x > t(0.3893125355243683):
      if x > t(0.6427869200706482):
        return 0b1111 if x > t(0.8614784181118011) else 0b1110
      return 0b1101 if x > t(0.5016634166240692) else 0b1100
    if x > t(0.2035212516784668):
      return 0b1011 if x > t(0.2920137718319893) else 0b1010
    return 0b1001 if x > t(0.1202552504837513) else 0b1000
  if x > t(-0.33967943489551544):
    if x > t(-0.13791173323988914):
      return 0b0111 if x > t(-0.045525018125772476) else 0b0110
    return 0b0101 if x > t(-0.23460740596055984) else 0b0100
  if x > t(-0.6106329262256622):
    return 0b0011 if x > t(-0.4599952697753906) else 0b0010
  return 0b0001 if x > t(-0.8480964004993439) else 0b0000


def _search_8bit(code, x: float) -> int:
  """`dQuantize<0>` (kernels.cu), statement by statement."""
  pivot, upper_pivot, lower_pivot = 127, 255, 0
  lower, upper = -1.0, 1.0
  val = float(code[pivot])
  i = 64
  while i > 0:
    if x > val:
      lower_pivot, lower, pivot = pivot, val, pivot + i
    else:
      upper_pivot, upper, pivot = pivot, val, pivot - i
    val = float(code[pivot])
    i >>= 1
  if upper_pivot == 255:
    upper = float(code[upper_pivot])
  if lower_pivot == 0:
    lower = float(code[lower_pivot])
  if x > val:
    return upper_pivot if x > float(F32((upper + val) * 0.5)) else pivot
  return lower_pivot if x < float(F32((lower + val) * 0.5)) else pivot


def _blockwise(flat, block, quantize_one):
  """`kQuantizeBlockwise`: absmax of the valid items, `x * (1 / absmax)`."""
  codes, absmax = [], []
  with np.errstate(divide="ignore", invalid="ignore"):
    for start in range(0, flat.size, block):
      vals = flat[start : start + block]
      amax = F32(np.max(np.abs(vals)))
      inv = F32(1) / amax
      absmax.append(amax)
      codes += [quantize_one(float(F32(v * inv))) for v in vals]
  return np.array(codes, np.uint8), np.array(absmax, F32)


def bnb_quantize_4bit(x, blocksize, compress_statistics=False, offset=None):
  """`functional.quantize_4bit(x, blocksize, quant_type="nf4")`.

  `offset`: the float32 `absmax.mean()` to use. Its last bits depend on the
  reduction order (torch's on the GPU, XLA's in the library), so the byte
  comparison passes the library's; None: the correctly rounded mean.
  """
  codes, absmax = _blockwise(x.reshape(-1).astype(F32), blocksize, _tree_nf4)
  packed = (codes[0::2] << 4) | codes[1::2]
  if not compress_statistics:
    return packed, absmax
  if offset is None:
    offset = F32(np.mean(absmax, dtype=np.float64))
  code = nf4.DYNAMIC_MAP
  qabsmax, absmax2 = _blockwise(
    absmax - offset, 256, lambda v: _search_8bit(code, v)
  )
  return packed, (qabsmax, absmax2, offset)


def bnb_dequantize_4bit(packed, qabsmax, absmax2, offset, blocksize):
  absmax = nf4.DYNAMIC_MAP[qabsmax] * np.repeat(absmax2, 256)[: qabsmax.size]
  absmax = absmax + offset
  codes = np.stack([packed >> 4, packed & 15], -1).reshape(-1)
  return nf4.NF4_LEVELS[codes] * np.repeat(absmax, blocksize)


@st.composite
def tensors(draw, layouts=(((2, 96), 64), ((256,), 32), ((3, 128), 128))):
  """(x float32: normals times a scale, in one of `layouts`, block size).

  Few shapes (each compiles once), many values."""
  shape, block = draw(st.sampled_from(layouts))
  scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  return (scale * rng.standard_normal(shape)).astype(F32), block


@hypothesis.given(tensors())
def test_nf4_bytes_equal_bitsandbytes(case):
  x, block = case
  packed, absmax = adapt.nf4_quantize(x, block)
  ref_packed, ref_absmax = bnb_quantize_4bit(x, block)
  np.testing.assert_array_equal(np.asarray(packed).reshape(-1), ref_packed)
  np.testing.assert_array_equal(np.asarray(absmax).reshape(-1), ref_absmax)


def test_nf4_ties_zero_blocks_and_nibble_order():
  """A value on a threshold takes the lower code; a zero block codes 0
  (0 * inf = NaN fails every test of the tree); element 2j is the high
  nibble."""
  on = np.concatenate([nf4.NF4_THRESHOLDS, nf4.NF4_LEVELS, [1.0]])
  x = np.zeros(64, F32)
  x[: on.size] = on
  x = np.concatenate([x, np.zeros(64, F32)])
  packed, absmax = adapt.nf4_quantize(x, 64)
  ref_packed, _ = bnb_quantize_4bit(x, 64)
  np.testing.assert_array_equal(np.asarray(packed), ref_packed)
  codes = np.stack([ref_packed >> 4, ref_packed & 15], -1).reshape(-1)
  np.testing.assert_array_equal(codes[:15], np.arange(15))  # ties go down
  np.testing.assert_array_equal(codes[15:31], np.arange(16))
  assert (np.asarray(packed)[32:] == 0).all() and float(absmax[1]) == 0.0


@hypothesis.settings(max_examples=4)
@hypothesis.given(tensors(layouts=(((20, 640), 32),)))  # 400 absmax blocks
def test_double_quant_bytes_equal_bitsandbytes(case):
  x, block = case
  t = adapt.to_nf4(x, block)
  exact_mean = bnb_quantize_4bit(x, block, compress_statistics=True)[1][2]
  np.testing.assert_allclose(t.absmax_offset, exact_mean, rtol=6e-7)
  ref_packed, (ref_q, ref_scales, ref_offset) = bnb_quantize_4bit(
    x, block, compress_statistics=True, offset=F32(t.absmax_offset)
  )
  np.testing.assert_array_equal(np.asarray(t.packed).reshape(-1), ref_packed)
  np.testing.assert_array_equal(np.asarray(t.absmax_codes).reshape(-1), ref_q)
  np.testing.assert_array_equal(t.absmax_scales, ref_scales)
  ref = bnb_dequantize_4bit(ref_packed, ref_q, ref_scales, ref_offset, block)
  np.testing.assert_allclose(
    np.asarray(adapt.from_nf4(t)).reshape(-1), ref, rtol=1e-6, atol=1e-30
  )


def test_dynamic_map_equals_published_bitsandbytes_values():
  """Entries of `create_dynamic_map()` as torch computes them (published
  dumps of the map); index 20 and 92 are where a naive float32 linspace
  (two roundings) differs by an ulp."""
  m = nf4.DYNAMIC_MAP
  assert m.dtype == F32 and m.shape == (256,) and (np.diff(m) > 0).all()
  expected = {
    0: -0.992968738079071,
    20: -0.7117187976837158,
    92: -0.019843751564621925,
    116: -0.000493750034365803,
    126: -5.500000384017767e-07,
    127: 0.0,
    234: 0.7117187976837158,
    255: 1.0,
  }
  for i, v in expected.items():
    assert m[i] == F32(v), (i, m[i], v)
  np.testing.assert_array_equal(m[128:255], -m[126::-1])


@hypothesis.given(tensors())
def test_roundtrip_error_within_half_the_largest_gap(case):
  x, block = case
  packed, absmax = adapt.nf4_quantize(x, block)
  y = adapt.nf4_dequantize(packed, absmax, x.shape, block)
  half_gap = np.max(np.diff(nf4.NF4_LEVELS)) / 2
  err = np.abs(np.asarray(y) - x).reshape(-1, block)
  bound = np.asarray(absmax).reshape(-1, 1) * half_gap * (1 + 1e-6)
  assert (err <= bound).all()


def test_packing_round_trips_every_code():
  """Blocks holding exactly `levels * absmax` come back bit for bit, in any
  layout (the 4-D one folds three trailing dims into the absmax axis)."""
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 16, (2, 4, 2, 32))
  codes[..., 0] = 15  # each 64-element block holds level 1.0 -> absmax 2
  x = (2 * nf4.NF4_LEVELS[codes]).astype(F32)
  packed, absmax = adapt.nf4_quantize(x, 64)
  assert packed.shape == (2, 4, 2, 16) and absmax.shape == (2, 4, 1)
  np.testing.assert_array_equal(np.asarray(absmax), 2.0)
  y = adapt.nf4_dequantize(packed, absmax, x.shape, 64)
  np.testing.assert_array_equal(np.asarray(y), x)


def test_quantize_under_jit_and_bf16_output():
  x = jax.random.normal(jax.random.key(0), (8, 128))
  t = jax.jit(adapt.to_nf4)(x)
  eager = adapt.to_nf4(x)
  np.testing.assert_array_equal(t.packed, eager.packed)
  y = adapt.from_nf4(t, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape


@pytest.mark.parametrize(
  "x, block, match",
  [
    (np.ones((3, 10), F32), 64, "multiple of `block_size`"),
    (np.ones((4, 64), F32), 63, "`block_size` must be even"),
    (np.ones((4, 64), F32), 0, "`block_size` must be a positive"),
    (np.full((1, 64), np.nan, F32), 64, "`x` must be finite"),
    (np.ones((1, 64), np.int32), 64, "`x` must be a float"),
  ],
)
def test_bad_inputs(x, block, match):
  with pytest.raises(ValueError, match=match):
    adapt.nf4_quantize(x, block)


def test_dequantize_checks_shapes():
  packed, absmax = adapt.nf4_quantize(np.ones((4, 64), F32))
  with pytest.raises(ValueError, match="`absmax` must have shape"):
    adapt.nf4_dequantize(packed, absmax[:2], (4, 64))
  with pytest.raises(ValueError, match="`packed` must have shape"):
    adapt.nf4_dequantize(packed, absmax, (2, 128))
