"""NF4 quantisation with bitsandbytes' bytes, and QLoRA's double quantisation.

NF4 (Dettmers et al., 2023, "QLoRA", arXiv 2305.14314, Sec. 3): each block
of `block_size` consecutive elements of the row-major flattened tensor keeps
its absolute maximum `absmax_b` (float32), and each element `x_i` the index
of its NF4 level (`NF4_LEVELS`, 16 quantiles of N(0, 1) scaled to [-1, 1])
chosen by bitsandbytes' CUDA kernel (`kQuantizeBlockwise`, `dQuantizeNF4`):

    n_i = x_i * fl(1 / absmax_b)                 (float32, as the kernel)
    q_i = #{k : n_i > NF4_THRESHOLDS[k]}          (its decision tree)
    x^_i = NF4_LEVELS[q_i] * absmax_b

The thresholds are the kernel's float literals (the midpoints of adjacent
levels); a value equal to a threshold takes the lower level, and a NaN
(a block of zeros: 0 * inf) takes level 0, as the kernel's tree does. Two
codes share a byte, element `2j` in the high nibble.

Double quantisation (`compress_statistics=True`): `c = mean(absmax)`, then
`absmax - c` is quantised by bitsandbytes' 8-bit blockwise quantiser (blocks
of 256, the signed dynamic map `DYNAMIC_MAP`, `dQuantize`'s binary search
with midpoint rounding) to one uint8 per block plus one float32 per 256
blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter at block 64.

Layout (so the quantised arrays shard like the weight): `packed` has the
weight's shape with the trailing dims folded (`folded_shape(shape, 2)`:
usually the last axis halved) and `absmax` the shape
`folded_shape(shape, block_size)` (usually blocks along the last axis).
Their row-major bytes are exactly bitsandbytes' `quantize_4bit` output.
Sizes that the block does not divide are an error (no padding).

Bit-exactness caveats (docs/adapt.md): bitsandbytes builds with
`--use_fast_math`, so its reciprocal may differ from IEEE's by an ulp and an
element within an ulp of a threshold may then get the neighbouring code; its
`mean` for the offset is a float32 reduction whose order is the GPU's.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks

# bitsandbytes `get_4bit_type("nf4")` (= `nf4_dequantization_lut`).
NF4_LEVELS = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)
# The float literals of `dQuantizeNF4`'s decision tree, in increasing order:
# code k + 1 iff x > NF4_THRESHOLDS[k] (and all below it).
NF4_THRESHOLDS = np.array(
  [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
  ],
  np.float32,
)
ABSMAX_BLOCK = 256  # bitsandbytes' block for the double-quantised absmax.


def _dynamic_map() -> np.ndarray:
  """bitsandbytes `create_dynamic_map(signed=True)`: 256 sorted float32.

  For exponent `i = 0..6`, the midpoints of `torch.linspace(0.1, 1,
  2**i + 1)` scaled by `10**(i - 6)`, both signs, then 0 and 1. torch's
  CPU linspace computes `start + step * k` (first half) and `end - step *
  (n - 1 - k)` (second half) in float32 with one rounding (a fused
  multiply-add); the result matches published dumps of the map.
  """
  start, end = np.float32(0.1), np.float32(1.0)
  data = []
  for i in range(7):
    n = 2**i + 1
    step = np.float32((end - start) / np.float32(n - 1))
    k = np.arange(n)
    lin = np.where(
      k < n // 2,
      np.float64(start) + np.float64(step) * k,
      np.float64(end) - np.float64(step) * (n - 1 - k),
    ).astype(np.float32)
    means = (lin[:-1] + lin[1:]) / np.float32(2)
    scaled = np.float32(10.0 ** (i - 6)) * means
    data += [scaled, -scaled]
  data.append(np.array([0.0, 1.0], np.float32))
  return np.sort(np.concatenate(data).astype(np.float32))


DYNAMIC_MAP = _dynamic_map()


def folded_shape(shape, divisor: int) -> tuple[int, ...]:
  """`shape` with its fewest trailing dims whose product `divisor` divides
  folded into one dim, divided by `divisor`.

  The layout of `packed` (`divisor=2`) and `absmax` (`divisor=block_size`):
  row-major order is kept, and leading dims stay, so a PartitionSpec of
  the weight's leading dims applies unchanged.

  Example:
    >>> folded_shape((128, 4, 32), 64), folded_shape((128, 384), 64)
    ((128, 2), (128, 6))
  """
  size = 1
  for j in range(len(shape) - 1, -1, -1):
    size *= shape[j]
    if size % divisor == 0:
      return tuple(shape[:j]) + (size // divisor,)
  raise ValueError(
    f"a tensor of shape {tuple(shape)} has {math.prod(shape)} elements, "
    f"not a multiple of {divisor}."
  )


def _check_block_size(block_size) -> int:
  block_size = _checks.check_positive_int("block_size", block_size)
  if block_size % 2:
    raise ValueError(f"`block_size` must be even, got {block_size}.")
  return block_size


def _check_input(name: str, x, block_size: int):
  """`x` as a float32 array; ValueError on dtype, size or non-finite."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"`{name}` must be a float array, got {x.dtype}.")
  if x.size == 0 or x.size % block_size:
    raise ValueError(
      f"`{name}` of shape {x.shape} has {x.size} elements; NF4 needs a "
      f"non-zero multiple of `block_size` = {block_size} (no padding)."
    )
  try:
    values = np.asarray(x)
  except (
    jax.errors.TracerArrayConversionError,
    jax.errors.ConcretizationTypeError,
  ):
    values = None  # Traced (inside jit): cannot be inspected.
  if values is not None and not np.isfinite(values).all():
    raise ValueError(
      f"`{name}` must be finite: {int((~np.isfinite(values)).sum())} of "
      f"{values.size} entries are inf or NaN."
    )
  return x.astype(jnp.float32)


def _pack(codes, shape):
  """uint8 codes of a tensor of `shape` -> bytes, element 2j high nibble."""
  pairs = codes.reshape(folded_shape(shape, 2) + (2,))
  return (pairs[..., 0] << 4) | pairs[..., 1]


def _unpack(packed, shape):
  pairs = jnp.stack([packed >> 4, packed & 0x0F], axis=-1)
  return pairs.reshape(shape)


def nf4_quantize(x, block_size: int = 64):
  """bitsandbytes' `quantize_4bit(x, blocksize, quant_type="nf4")`.

  Args:
    x: float array of any shape whose size `block_size` divides.
    block_size: elements per absmax block (even; bitsandbytes accepts
      32 ... 4096, powers of two).

  Returns:
    `(packed, absmax)`: `packed` uint8 `folded_shape(x.shape, 2)` (the
    `x.size // 2` bytes of bitsandbytes, row-major), `absmax` float32
    `folded_shape(x.shape, block_size)`, one per block.

  Raises:
    ValueError: non-float `x`, a size the block does not divide, a bad
      `block_size`, or (concrete `x`) an inf / NaN entry.

  Example:
    >>> packed, absmax = nf4_quantize(jnp.ones((4, 64)))
    >>> packed.shape, absmax.shape, hex(int(packed[0, 0]))
    ((4, 32), (4, 1), '0xff')
  """
  block_size = _check_block_size(block_size)
  x = _check_input("x", x, block_size)
  blocks = x.reshape(folded_shape(x.shape, block_size) + (block_size,))
  codes, absmax = _nf4_codes(blocks)
  return _pack(codes, x.shape), absmax


@jax.jit
def _nf4_codes(blocks):
  """`[..., block]` float32 -> (uint8 codes, float32 absmax `[...]`)."""
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  normed = blocks * (1.0 / absmax)[..., None]
  thresholds = jnp.asarray(NF4_THRESHOLDS).reshape((1,) * normed.ndim + (-1,))
  codes = jnp.sum(normed[..., None] > thresholds, axis=-1, dtype=jnp.uint8)
  return codes, absmax


def nf4_dequantize(
  packed, absmax, shape, block_size: int = 64, dtype=jnp.float32
):
  """Inverse of `nf4_quantize`: `NF4_LEVELS[q] * absmax` in `dtype`.

  Computed in float32 (as bitsandbytes), then cast; under `jit` the cast
  fuses, so only the `dtype` result is materialised.

  Args:
    packed: uint8 `folded_shape(shape, 2)`.
    absmax: float32 `folded_shape(shape, block_size)`.
    shape: the tensor's shape.
    block_size: as given to `nf4_quantize`.
    dtype: the result dtype (e.g. the compute dtype).

  Returns:
    `[*shape]` array of `dtype`.
  """
  block_size = _check_block_size(block_size)
  shape = tuple(shape)
  _checks.check_shape("packed", packed, folded_shape(shape, 2), "[packed]")
  blocks_shape = folded_shape(shape, block_size)
  _checks.check_shape("absmax", absmax, blocks_shape, "[blocks]")
  values = jnp.asarray(NF4_LEVELS)[_unpack(packed, shape)]
  values = values.reshape(blocks_shape + (block_size,)) * absmax[..., None]
  return values.reshape(shape).astype(dtype)


@jax.jit
def _dynamic_codes(normed):
  """`dQuantize<0>`: binary search of `DYNAMIC_MAP`, then the nearer of the
  pivot and the last neighbour visited (midpoint ties stay on the pivot)."""
  code = jnp.asarray(DYNAMIC_MAP)
  pivot = jnp.full(normed.shape, 127, jnp.int32)
  lower_pivot, upper_pivot = jnp.zeros_like(pivot), jnp.full_like(pivot, 255)
  lower = jnp.full(normed.shape, -1.0, jnp.float32)
  upper = jnp.ones_like(lower)
  val = code[pivot]
  for i in (64, 32, 16, 8, 4, 2, 1):
    right = normed > val
    lower_pivot = jnp.where(right, pivot, lower_pivot)
    lower = jnp.where(right, val, lower)
    upper_pivot = jnp.where(right, upper_pivot, pivot)
    upper = jnp.where(right, upper, val)
    pivot = jnp.where(right, pivot + i, pivot - i)
    val = code[pivot]
  upper = jnp.where(upper_pivot == 255, code[255], upper)
  lower = jnp.where(lower_pivot == 0, code[0], lower)
  right = normed > val
  out = jnp.where(right & (normed > (upper + val) * 0.5), upper_pivot, pivot)
  out = jnp.where(~right & (normed < (lower + val) * 0.5), lower_pivot, out)
  return out.astype(jnp.uint8)


def dynamic_quantize(x, block_size: int = ABSMAX_BLOCK):
  """bitsandbytes' 8-bit `quantize_blockwise(x, blocksize)` (dynamic map).

  Blocks run over the row-major flattened `x`; the last may be partial.

  Args:
    x: float32 array.
    block_size: elements per block.

  Returns:
    `(codes, absmax)`: uint8 codes shaped like `x`, float32 absmax
    `[ceil(x.size / block_size)]`.
  """
  block_size = _checks.check_positive_int("block_size", block_size)
  flat = jnp.asarray(x, jnp.float32).reshape(-1)
  pad = -flat.size % block_size
  blocks = jnp.pad(flat, (0, pad)).reshape(-1, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  codes = _dynamic_codes(blocks * (1.0 / absmax)[:, None])
  return codes.reshape(-1)[: flat.size].reshape(np.shape(x)), absmax


def dynamic_dequantize(codes, absmax, block_size: int = ABSMAX_BLOCK):
  """Inverse of `dynamic_quantize`: `DYNAMIC_MAP[codes] * absmax[block]`.

  The block of each code comes from its row-major index, so `codes` keeps
  its shape (and sharding); `absmax` is small and read whole.
  """
  index = jnp.arange(np.size(codes)).reshape(np.shape(codes))
  scale = jnp.take(absmax, index // block_size)
  return jnp.asarray(DYNAMIC_MAP)[codes] * scale


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["packed", "absmax_codes", "absmax_scales", "absmax_offset"],
  meta_fields=["shape"],
)
@dataclasses.dataclass(frozen=True)
class NF4Tensor:
  """A tensor in NF4 with double-quantised absmax (a pytree; `shape` static).

  Attributes:
    packed: uint8 `folded_shape(shape, 2)`, the NF4 codes (`nf4_quantize`).
    absmax_codes: uint8 `folded_shape(shape, block_size)`, the 8-bit codes
      of `absmax - absmax_offset`.
    absmax_scales: float32 `[ceil(blocks / 256)]`, their block scales.
    absmax_offset: shape=(), float32, the mean absmax.
    shape: the tensor's shape.
  """

  packed: jax.Array
  absmax_codes: jax.Array
  absmax_scales: jax.Array
  absmax_offset: jax.Array
  shape: tuple[int, ...]

  @property
  def block_size(self) -> int:
    return math.prod(self.shape) // math.prod(np.shape(self.absmax_codes))


def to_nf4(x, block_size: int = 64) -> NF4Tensor:
  """`quantize_4bit(x, blocksize, compress_statistics=True, "nf4")`.

  Example:
    >>> t = to_nf4(jax.random.normal(jax.random.key(0), (128, 256)))
    >>> t.packed.shape, t.absmax_codes.shape, t.absmax_scales.shape
    ((128, 128), (128, 4), (2,))
  """
  packed, absmax = nf4_quantize(x, block_size)
  offset = jnp.mean(absmax)
  codes, scales = dynamic_quantize(absmax - offset, ABSMAX_BLOCK)
  return NF4Tensor(packed, codes, scales, offset, tuple(np.shape(x)))


def absmax_of(t: NF4Tensor):
  """The float32 absmax of `t`, from its double quantisation."""
  return (
    dynamic_dequantize(t.absmax_codes, t.absmax_scales, ABSMAX_BLOCK)
    + t.absmax_offset
  )


def from_nf4(t: NF4Tensor, dtype=jnp.float32):
  """The dense `[*t.shape]` tensor of `dtype` (bitsandbytes'
  `dequantize_4bit`)."""
  return nf4_dequantize(t.packed, absmax_of(t), t.shape, t.block_size, dtype)


def bits_per_param(t: NF4Tensor) -> float:
  """Stored bits per element of `t` (codes, absmax codes, scales, offset)."""
  leaves = jax.tree.leaves(t)
  bits = sum(8 * np.size(x) * np.dtype(x.dtype).itemsize for x in leaves)
  return bits / math.prod(t.shape)
