"""Deterministic, process-sharded batches: the embedded corpus, files, MQAR.

A dataset is a pure function of `(seed, step, process_index)`: `ds.batch(step)`
draws the global batch of `step` from a counter-based RNG (Philox keyed by the
seed, counter set from the step), and returns this process's contiguous block
of rows. There is no iterator state, so a run resumes exactly by asking for
`batch(saved_step)`, and concatenating the process-local rows over processes
gives the one-process global batch.

Sources (`spec`):
  * `"corpus"`: the embedded byte-level corpus (a local path of that name
    must be written `./corpus`) (Python reference topics, PSF
    licence; see `corpus/README.md`), vocab 256.
  * a text file, or a directory of text files (read as bytes, vocab 256).
  * a `.npy` file holding a 1-D integer token array (memory-mapped).
  * a tensorstore zarr (v2 or v3) directory holding a 1-D integer token array.
  * `"mqar"` or `"mqar:vocab_size=256,num_kv_pairs=8,num_queries=8"`: the
    multi-query associative recall task (Arora et al. 2023, "Zoology").

Token streams are split into train / validation by position: the last
`validation_fraction` of the stream is held out. Text batches are random
windows of `seq_len + 1` tokens: `inputs = w[:-1]`, `targets = w[1:]`,
`mask = 1`.

Example:
  >>> ds = make_dataset("corpus", seq_len=64, global_batch_size=8, seed=0)
  >>> b = ds.batch(0)
  >>> b["inputs"].shape, ds.vocab_size
  ((8, 64), 256)
"""

import dataclasses
import gzip
import importlib.resources
import json
import os
import pathlib
import typing

import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from lightning_jax import _checks

BYTE_VOCAB_SIZE = 256
CORPUS_FILE = "python_docs.txt.gz"
SPLITS = ("train", "validation")
# RNG streams: one Philox key per (seed, purpose): splits never share draws.
_STREAM_IDS = {"train": 0, "validation": 1}
_TS_CACHE_BYTES = 128 << 20  # decoded-chunk cache of a tensorstore token array
_ACCEPTED = (
  "`data` must be 'corpus' (the embedded corpus), 'mqar' or "
  "'mqar:key=value,...' (keys: vocab_size, num_kv_pairs, num_queries), or a "
  "path to a text file, a directory of text files, a .npy token array or a "
  "tensorstore zarr directory holding a 1-D integer token array"
)


Batch = dict[str, np.ndarray]


def encode_bytes(text: str) -> np.ndarray:
  """UTF-8 bytes of `text` as int32 tokens of the byte vocabulary, `[len]`."""
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode_bytes(tokens) -> str:
  """Inverse of `encode_bytes`; invalid UTF-8 becomes U+FFFD.

  Args:
    tokens: 1-D integer array-like of values in [0, 256).

  Raises:
    ValueError: if `tokens` is not 1-D or holds values outside [0, 256).
  """
  tokens = np.asarray(tokens)
  _checks.check_rank("tokens", tokens, 1, "[len]")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= BYTE_VOCAB_SIZE):
    raise ValueError(
      "`tokens` must lie in [0, 256) for the byte vocabulary, "
      f"got range [{tokens.min()}, {tokens.max()}]."
    )
  return tokens.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _generator(seed: int, stream: int, step: int) -> np.random.Generator:
  """Counter-based RNG for one (seed, stream, step): pure, no history.

  The key holds (seed, stream); the step sits in the top 128 bits of the
  256-bit Philox counter, so a step's draws (which advance the low words)
  never reach the next step's counter range.
  """
  key = int(seed) | (stream << 64)
  return np.random.Generator(np.random.Philox(key=key, counter=step << 128))


@dataclasses.dataclass(frozen=True)
class _Sharding:
  """Which rows of the global batch this process owns."""

  global_batch_size: int
  process_index: int
  process_count: int

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  @property
  def rows(self) -> slice:
    b = self.local_batch_size
    return slice(self.process_index * b, (self.process_index + 1) * b)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenStreamDataset:
  """Random windows of a 1-D token stream.

  Attributes:
    name: where the tokens come from (for logs).
    tokens: the whole stream, 1-D integer array (numpy, memmap) or a 1-D
      tensorstore (read window by window).
    start, stop: the half-open token range of the split.
    vocab_size: number of token ids.
    seq_len, seed, split: as given to `make_dataset`.
    sharding: this process's rows of the global batch.
  """

  name: str
  tokens: object
  start: int
  stop: int
  vocab_size: int
  seq_len: int
  seed: int
  split: str
  sharding: _Sharding

  @property
  def local_batch_size(self) -> int:
    return self.sharding.local_batch_size

  def window_starts(self, step: int) -> np.ndarray:
    """First token of every global row's window at `step`, `[global_batch]`."""
    rng = _generator(self.seed, _STREAM_IDS[self.split], step)
    num = self.stop - self.start - self.seq_len
    return self.start + rng.integers(0, num, self.sharding.global_batch_size)

  def batch(self, step: int) -> Batch:
    """This process's rows of global batch `step`.

    Returns:
      {"inputs": int32 [b, seq_len], "targets": int32 [b, seq_len],
       "mask": float32 [b, seq_len]},
      b = global_batch_size // process_count.
    """
    step = _check_step(step)
    starts = self.window_starts(step)[self.sharding.rows]
    windows = _read_windows(self.tokens, starts, self.seq_len + 1)
    windows = windows.astype(np.int32)
    return {
      "inputs": np.ascontiguousarray(windows[:, :-1]),
      "targets": np.ascontiguousarray(windows[:, 1:]),
      "mask": np.ones((len(starts), self.seq_len), np.float32),
    }


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """Multi-query associative recall (Arora et al. 2023, "Zoology", Sec. 3).

  Layout of one row of `inputs` (length `seq_len`):
    positions [0, 2K): the key-value pairs k_1 v_1 k_2 v_2 ... k_K v_K;
      keys distinct, drawn from [1, vocab_size // 2), values drawn (with
      replacement) from [vocab_size // 2, vocab_size);
    positions [2K, seq_len): token 0 (filler), except `num_queries` distinct
      positions, uniformly placed, each holding a distinct key of the context.
  `targets` is the value paired with the key at each query position and 0
  elsewhere; `mask` is 1 exactly at query positions.

  Attributes:
    vocab_size: token ids in [0, vocab_size); >= 4.
    num_kv_pairs: K, key-value pairs per sequence; <= vocab_size // 2 - 1.
    num_queries: queries per sequence (defaults to K); <= K and
      <= seq_len - 2K.
  """

  vocab_size: int = 256
  num_kv_pairs: int = 8
  num_queries: int | None = None

  @property
  def queries(self) -> int:
    return self.num_kv_pairs if self.num_queries is None else self.num_queries


@dataclasses.dataclass(frozen=True, eq=False)
class MQARDataset:
  """Synthetic MQAR batches (see `MQARConfig` for the layout)."""

  config: MQARConfig
  seq_len: int
  seed: int
  split: str
  sharding: _Sharding
  name: str = "mqar"

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def local_batch_size(self) -> int:
    return self.sharding.local_batch_size

  def batch(self, step: int) -> Batch:
    """This process's rows of global batch `step` (layout in `MQARConfig`)."""
    step = _check_step(step)
    rng = _generator(self.seed, _STREAM_IDS[self.split], step)
    global_batch = mqar_batch(
      rng, self.config, self.sharding.global_batch_size, self.seq_len
    )
    return {k: v[self.sharding.rows] for k, v in global_batch.items()}


def mqar_batch(
  rng: np.random.Generator, config: MQARConfig, batch_size: int, seq_len: int
) -> Batch:
  """One MQAR batch `[batch_size, seq_len]` drawn from `rng`."""
  k, q, v = config.num_kv_pairs, config.queries, config.vocab_size
  half = v // 2
  rows = np.arange(batch_size)[:, None]
  # Distinct keys per row: the first k of a random permutation of [1, half).
  keys = np.argsort(rng.random((batch_size, half - 1)), axis=1)[:, :k] + 1
  values = rng.integers(half, v, (batch_size, k))
  inputs = np.zeros((batch_size, seq_len), np.int32)
  inputs[:, 0 : 2 * k : 2] = keys
  inputs[:, 1 : 2 * k : 2] = values
  # Query slots: q distinct positions of the region after the context, each
  # asking a distinct key (a random k-permutation, first q).
  region = seq_len - 2 * k
  slots = (
    np.sort(np.argsort(rng.random((batch_size, region)), axis=1)[:, :q], axis=1)
    + 2 * k
  )
  which = np.argsort(rng.random((batch_size, k)), axis=1)[:, :q]
  inputs[rows, slots] = keys[rows, which]
  targets = np.zeros((batch_size, seq_len), np.int32)
  targets[rows, slots] = values[rows, which]
  mask = np.zeros((batch_size, seq_len), np.float32)
  mask[rows, slots] = 1.0
  return {"inputs": inputs, "targets": targets, "mask": mask}


def masked_hits(logits, batch: Batch):
  """Number of masked positions whose argmax equals the target.

  Args:
    logits: `[batch, seq, vocab]`.
    batch: dict with "targets" int `[batch, seq]` and "mask" `[batch, seq]`.

  Returns:
    `(hits, count)`: fp32 scalars, the mask-weighted hits and the mask sum.
  """
  _checks.check_rank("logits", logits, 3, "[batch, seq, vocab]")
  _checks.check_shape(
    "batch['targets']", batch["targets"], logits.shape[:2], "[batch, seq]"
  )
  _checks.check_shape(
    "batch['mask']", batch["mask"], logits.shape[:2], "[batch, seq]"
  )
  hit = jnp.argmax(logits, axis=-1) == jnp.asarray(batch["targets"])
  mask = jnp.asarray(batch["mask"], jnp.float32)
  return jnp.sum(hit * mask), jnp.sum(mask)


def mqar_accuracy(logits, batch: Batch):
  """Fraction of masked positions whose argmax equals the target.

  Args:
    logits: `[batch, seq, vocab]`.
    batch: dict with "targets" int `[batch, seq]` and "mask" `[batch, seq]`.

  Returns:
    fp32 scalar in [0, 1] (0 when the mask is empty).
  """
  hits, count = masked_hits(logits, batch)
  return hits / jnp.maximum(count, 1.0)


@typing.runtime_checkable
class Dataset(typing.Protocol):
  """What `training.train` reads batches from (bring your own data).

  Attributes:
    vocab_size: token ids lie in `[0, vocab_size)`; at most the model's.

  `batch(step)` returns this process's rows of global batch `step` (a pure
  function of `step`, so a resumed run asks for `batch(saved_position)`):
  `{"inputs": int [b, seq_len], "targets": int [b, seq_len], "mask": float
  [b, seq_len]}` with `b = global_batch_size // process_count`; the loss is
  scored where the mask is 1. `make_dataset`'s datasets follow it; a
  validation split is a second object whose batches `0, 1, ...` are the
  held-out set.
  """

  vocab_size: int

  def batch(self, step: int) -> Batch: ...


def check_dataset(
  dataset, name: str, local_batch_size: int, seq_len: int
) -> None:
  """ValueError unless `dataset` follows `Dataset` with batches of this run.

  Reads `dataset.batch(0)` once and checks its keys, shapes and dtypes.

  Args:
    dataset: the object to check.
    name: the argument's name, for the message.
    local_batch_size: rows this process reads per step.
    seq_len: tokens per row.
  """
  if not isinstance(dataset, Dataset):
    raise ValueError(
      f"`{name}` must have `vocab_size` and `batch(step)` "
      f"(training.data.Dataset), got {type(dataset).__name__}."
    )
  vocab = dataset.vocab_size
  if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)):
    raise ValueError(f"`{name}.vocab_size` must be an int, got {vocab!r}.")
  batch = dataset.batch(0)
  want = (local_batch_size, seq_len)
  for key in ("inputs", "targets", "mask"):
    value = batch.get(key) if isinstance(batch, dict) else None
    if value is None or np.shape(value) != want:
      raise ValueError(
        f"`{name}.batch(0)['{key}']` must have shape [local batch, seq_len] "
        f"= {list(want)}, got "
        f"{None if value is None else list(np.shape(value))}."
      )
  for key in ("inputs", "targets"):
    if not np.issubdtype(np.asarray(batch[key]).dtype, np.integer):
      raise ValueError(
        f"`{name}.batch(0)['{key}']` must hold integer token ids, got "
        f"{np.asarray(batch[key]).dtype}."
      )


def make_dataset(
  spec: str | os.PathLike,
  *,
  seq_len: int,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  split: str = "train",
  validation_fraction: float = 0.05,
  vocab_size: int | None = None,
) -> Dataset:
  """Builds the dataset named by `spec` (see the module docstring).

  Args:
    spec: "corpus", "mqar[:k=v,...]", or a path.
    seq_len: tokens per row.
    global_batch_size: rows per step over all processes; divisible by
      `process_count`.
    seed: non-negative int; the same seed gives the same batches.
    process_index, process_count: this process's rank and the process count;
      the process gets rows [i * b, (i + 1) * b) with b = global // count.
    split: "train" or "validation" (token streams: the last
      `validation_fraction` of the tokens; MQAR: an independent RNG stream).
    validation_fraction: held-out fraction of a token stream, in (0, 1).
    vocab_size: overrides the vocabulary of a token array (default: the
      "vocab_size" attribute of a zarr array, else max token + 1).

  Returns:
    A dataset with `.batch(step)`, `.vocab_size`, `.local_batch_size`.

  Raises:
    ValueError: on a bad argument, naming it (`data` for the spec).
  """
  seq_len = _checks.check_positive_int("seq_len", seq_len)
  global_batch_size = _checks.check_positive_int(
    "global_batch_size", global_batch_size
  )
  process_count = _checks.check_positive_int("process_count", process_count)
  if global_batch_size % process_count:
    raise ValueError(
      f"`global_batch_size` ({global_batch_size}) must be "
      f"divisible by `process_count` ({process_count})."
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"`process_index` must be in [0, {process_count}), got {process_index}."
    )
  if (
    isinstance(seed, bool)
    or not isinstance(seed, (int, np.integer))
    or not (0 <= seed < 2**64)
  ):
    raise ValueError(f"`seed` must be an int in [0, 2**64), got {seed!r}.")
  _checks.check_choice("split", split, SPLITS)
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(
      f"`validation_fraction` must be in (0, 1), got {validation_fraction}."
    )
  sharding = _Sharding(global_batch_size, process_index, process_count)
  if not isinstance(spec, (str, os.PathLike)):
    raise ValueError(f"{_ACCEPTED}; got {spec!r}.")
  spec_str = os.fspath(spec)
  if spec_str == "mqar" or spec_str.startswith("mqar:"):
    config = parse_mqar_spec(spec_str)
    _check_mqar(config, seq_len)
    return MQARDataset(config, seq_len, int(seed), split, sharding)
  name, tokens, vocab = _load_tokens(spec_str, vocab_size)
  n = tokens.shape[0]
  cut = n - int(round(n * validation_fraction))
  start, stop = (0, cut) if split == "train" else (cut, n)
  if stop - start < seq_len + 1:
    raise ValueError(
      f"`seq_len` ({seq_len}) + 1 exceeds the {stop - start} tokens of the "
      f"{split} split of {name}."
    )
  return TokenStreamDataset(
    name, tokens, start, stop, vocab, seq_len, int(seed), split, sharding
  )


def parse_mqar_spec(spec: str) -> MQARConfig:
  """`"mqar"` or `"mqar:vocab_size=512,num_kv_pairs=16"` -> MQARConfig."""
  fields = {f.name for f in dataclasses.fields(MQARConfig)}
  kwargs = {}
  _, _, rest = spec.partition(":")
  for item in filter(None, rest.split(",")):
    key, eq, value = item.partition("=")
    if not eq or key.strip() not in fields or not value.strip().isdigit():
      raise ValueError(f"{_ACCEPTED}; got {spec!r} (bad item {item!r}).")
    kwargs[key.strip()] = int(value)
  return MQARConfig(**kwargs)


def _check_mqar(config: MQARConfig, seq_len: int) -> None:
  if config.vocab_size < 4:
    raise ValueError(
      f"MQAR `vocab_size` must be >= 4, got {config.vocab_size}."
    )
  if not 1 <= config.num_kv_pairs <= config.vocab_size // 2 - 1:
    raise ValueError(
      f"MQAR `num_kv_pairs` must be in [1, vocab_size // 2 - 1 = "
      f"{config.vocab_size // 2 - 1}] (distinct keys), got "
      f"{config.num_kv_pairs}."
    )
  if not 1 <= config.queries <= config.num_kv_pairs:
    raise ValueError(
      f"MQAR `num_queries` must be in [1, num_kv_pairs = "
      f"{config.num_kv_pairs}], got {config.queries}."
    )
  if seq_len < 2 * config.num_kv_pairs + config.queries:
    raise ValueError(
      f"`seq_len` must be >= 2 * num_kv_pairs + num_queries = "
      f"{2 * config.num_kv_pairs + config.queries} for MQAR, got {seq_len}."
    )


def _check_step(step) -> int:
  if (
    isinstance(step, bool)
    or not isinstance(step, (int, np.integer))
    or (step < 0)
  ):
    raise ValueError(f"`step` must be a non-negative int, got {step!r}.")
  return int(step)


def load_corpus() -> bytes:
  """The embedded corpus as bytes (read through importlib.resources)."""
  resource = importlib.resources.files(__package__).joinpath(
    "corpus", CORPUS_FILE
  )
  return gzip.decompress(resource.read_bytes())


def _load_tokens(spec: str, vocab_size: int | None):
  """-> (name, 1-D token array or tensorstore, vocab size)."""
  if spec == "corpus":
    return (
      "the embedded corpus",
      np.frombuffer(load_corpus(), np.uint8),
      BYTE_VOCAB_SIZE,
    )
  path = pathlib.Path(spec).expanduser()
  if not path.exists():
    raise ValueError(f"{_ACCEPTED}; got {spec!r}, which does not exist.")
  if path.is_dir() and _is_zarr(path):
    store = ts.open(
      {
        "driver": "zarr3" if (path / "zarr.json").exists() else "zarr",
        "kvstore": {"driver": "file", "path": str(path.resolve())},
        # Token arrays are read-only: cache decoded chunks, never recheck.
        "context": {"cache_pool": {"total_bytes_limit": _TS_CACHE_BYTES}},
        "recheck_cached_data": "open",
      },
      open=True,
      read=True,
    ).result()
    return _token_array(str(path), store, vocab_size, _zarr_vocab(path))
  if path.is_dir():
    files = sorted(
      p
      for p in path.rglob("*")
      if p.is_file()
      and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
      raise ValueError(f"{_ACCEPTED}; directory {spec!r} holds no files.")
    text = b"".join(_read_text(p) for p in files)
    return str(path), np.frombuffer(text, np.uint8), BYTE_VOCAB_SIZE
  if path.suffix == ".npy":
    return _token_array(
      str(path), np.load(path, mmap_mode="r"), vocab_size, None
    )
  return str(path), np.frombuffer(_read_text(path), np.uint8), BYTE_VOCAB_SIZE


def _read_text(path: pathlib.Path) -> bytes:
  data = path.read_bytes()
  return gzip.decompress(data) if path.suffix == ".gz" else data


def _is_zarr(path: pathlib.Path) -> bool:
  return (path / "zarr.json").exists() or (path / ".zarray").exists()


def _zarr_vocab(path: pathlib.Path) -> int | None:
  """The "vocab_size" user attribute of a zarr array, if any."""
  if (path / "zarr.json").exists():
    attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
  elif (path / ".zattrs").exists():
    attrs = json.loads((path / ".zattrs").read_text())
  else:
    attrs = {}
  return attrs.get("vocab_size")


def _token_array(
  name: str, tokens, vocab_size: int | None, stored_vocab: int | None
):
  """Validates a token array; vocab = override, stored attribute or max + 1."""
  dtype = np.dtype(
    tokens.dtype.numpy_dtype
    if isinstance(tokens, ts.TensorStore)
    else tokens.dtype
  )
  if len(tokens.shape) != 1 or not np.issubdtype(dtype, np.integer):
    raise ValueError(
      f"`data` token array {name} must be 1-D of an integer dtype, got shape "
      f"{tuple(tokens.shape)} and dtype {dtype}."
    )
  vocab = vocab_size if vocab_size is not None else stored_vocab
  if vocab is None:
    vocab = int(_max_token(tokens)) + 1
  return name, tokens, _checks.check_positive_int("vocab_size", vocab)


def _max_token(tokens, block: int = 1 << 24) -> int:
  """Max over the stream, in blocks (memory-mapped / tensorstore friendly)."""
  n = tokens.shape[0]
  best = 0
  for lo in range(0, n, block):
    chunk = tokens[lo : min(n, lo + block)]
    if isinstance(chunk, ts.TensorStore):
      chunk = chunk.read().result()
    best = max(best, int(np.max(chunk)) if chunk.size else 0)
  return best


def _read_windows(tokens, starts: np.ndarray, length: int) -> np.ndarray:
  """`[len(starts), length]` windows `tokens[s : s + length]`."""
  index = starts[:, None] + np.arange(length)
  if isinstance(tokens, ts.TensorStore):
    return tokens.vindex[index].read().result()
  return np.asarray(tokens[index])
