"""Datasets: pure in (seed, step, process), each source format, MQAR."""

import gzip

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
import tensorstore as ts

from lightning_jax import training
from lightning_jax.training import data


def _corpus(**kwargs):
  args = dict(seq_len=32, global_batch_size=8, seed=0)
  args.update(kwargs)
  return training.make_dataset("corpus", **args)


def _assert_same(a, b):
  assert a.keys() == b.keys() == {"inputs", "targets", "mask"}
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def _windows_of(ds, step, stream):
  """Each row of `batch(step)` is the window at its start in `stream`."""
  batch = ds.batch(step)
  starts = ds.window_starts(step)[ds.sharding.rows]
  for row, s in enumerate(starts):
    window = np.asarray(stream[s : s + ds.seq_len + 1], np.int64)
    np.testing.assert_array_equal(batch["inputs"][row], window[:-1])
    np.testing.assert_array_equal(batch["targets"][row], window[1:])
  return batch


def test_corpus_is_embedded_bytes_of_real_text():
  text = data.load_corpus()
  assert 300_000 < len(text) < 2_000_000
  assert b'The "assert" statement' in text
  ds = _corpus()
  assert ds.vocab_size == 256
  batch = ds.batch(0)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  assert batch["mask"].dtype == np.float32
  assert batch["inputs"].shape == (8, 32)
  np.testing.assert_array_equal(batch["mask"], 1.0)
  _windows_of(ds, 3, np.frombuffer(text, np.uint8))


def test_targets_are_inputs_shifted_by_one():
  batch = _corpus().batch(11)
  np.testing.assert_array_equal(
    batch["inputs"][:, 1:], batch["targets"][:, :-1]
  )


def test_deterministic_and_resumable():
  ds = _corpus(seed=3)
  history = [ds.batch(s) for s in (5, 0, 7, 5)]
  _assert_same(history[0], history[3])
  # A fresh dataset (a restarted job) gives batch k without replaying 0..k-1.
  _assert_same(_corpus(seed=3).batch(7), history[2])
  assert not np.array_equal(ds.batch(0)["inputs"], ds.batch(1)["inputs"])
  assert not np.array_equal(
    _corpus(seed=4).batch(0)["inputs"], ds.batch(0)["inputs"]
  )


@hypothesis.settings(max_examples=6)
@hypothesis.given(
  spec=st.sampled_from(["corpus", "mqar"]),
  process_count=st.sampled_from([1, 2, 4, 8]),
  step=st.integers(0, 2**40),
)
def test_process_rows_concatenate_to_the_global_batch(
  spec, process_count, step
):
  args = dict(seq_len=40, global_batch_size=8, seed=1)
  whole = training.make_dataset(spec, **args).batch(step)
  parts = [
    training.make_dataset(
      spec, process_index=i, process_count=process_count, **args
    ).batch(step)
    for i in range(process_count)
  ]
  for k in whole:
    assert parts[0][k].shape[0] == 8 // process_count
    np.testing.assert_array_equal(
      np.concatenate([p[k] for p in parts]), whole[k]
    )


def test_validation_split_is_held_out():
  text = data.load_corpus()
  train = _corpus(global_batch_size=64)
  val = _corpus(global_batch_size=64, split="validation")
  cut = train.stop
  assert cut == val.start and val.stop == len(text)
  assert (len(text) - cut) / len(text) == pytest.approx(0.05, abs=1e-3)
  for step in range(5):
    assert np.all(train.window_starts(step) + 33 <= cut)
    assert np.all(val.window_starts(step) >= cut)
  _windows_of(val, 2, np.frombuffer(text, np.uint8))


def test_text_file_directory_and_gzip(tmp_path):
  (tmp_path / "d" / "sub").mkdir(parents=True)
  a, b = b"alpha " * 40, "b\u00e9ta ".encode() * 40
  (tmp_path / "d" / "a.txt").write_bytes(a)
  (tmp_path / "d" / "sub" / "b.txt.gz").write_bytes(gzip.compress(b))
  (tmp_path / "d" / ".hidden").write_bytes(b"\xff" * 1000)
  args = dict(seq_len=8, global_batch_size=4, seed=0)
  one = training.make_dataset(tmp_path / "d" / "a.txt", **args)
  assert one.vocab_size == 256 and one.stop == len(a) - 12
  _windows_of(one, 0, np.frombuffer(a, np.uint8))
  both = training.make_dataset(str(tmp_path / "d"), **args)
  stream = np.frombuffer(a + b, np.uint8)  # sorted paths, hidden skipped
  assert both.stop + round(0.05 * len(stream)) == len(stream)
  for step in range(3):
    _windows_of(both, step, stream)


def test_npy_token_array_is_memory_mapped(tmp_path):
  tokens = np.random.default_rng(0).integers(0, 1000, 5000).astype(np.uint16)
  tokens[17] = 1234
  np.save(tmp_path / "tok.npy", tokens)
  args = dict(seq_len=16, global_batch_size=4, seed=2)
  ds = training.make_dataset(tmp_path / "tok.npy", **args)
  assert isinstance(ds.tokens, np.memmap)
  assert ds.vocab_size == 1235  # max + 1
  _windows_of(ds, 9, tokens)
  assert (
    training.make_dataset(
      tmp_path / "tok.npy", vocab_size=4096, **args
    ).vocab_size
    == 4096
  )


@pytest.mark.parametrize(
  "driver,attributes,vocab",
  [
    ("zarr", None, 500),  # zarr v2, vocab = max + 1
    ("zarr3", {"vocab_size": 512}, 512),  # the attribute wins
  ],
)
def test_tensorstore_token_array(tmp_path, driver, attributes, vocab):
  tokens = np.random.default_rng(1).integers(0, 500, 3000).astype(np.int32)
  tokens[5] = 499
  path = tmp_path / "tok.zarr"
  spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}}
  if attributes:
    spec["metadata"] = {"attributes": attributes}
  store = ts.open(
    spec,
    create=True,
    dtype=ts.int32,
    shape=[len(tokens)],
    chunk_layout=ts.ChunkLayout(chunk_shape=[256]),
  ).result()
  store.write(tokens).result()
  ds = training.make_dataset(path, seq_len=16, global_batch_size=4, seed=0)
  assert isinstance(ds.tokens, ts.TensorStore)
  assert ds.vocab_size == vocab
  _windows_of(ds, 4, tokens)


def _check_mqar(batch, cfg, seq_len):
  k, v = cfg.num_kv_pairs, cfg.vocab_size
  inputs, targets, mask = batch["inputs"], batch["targets"], batch["mask"]
  assert inputs.shape == targets.shape == mask.shape
  for row in range(inputs.shape[0]):
    keys, values = inputs[row, 0 : 2 * k : 2], inputs[row, 1 : 2 * k : 2]
    assert len(set(keys.tolist())) == k
    assert np.all((keys >= 1) & (keys < v // 2))
    assert np.all((values >= v // 2) & (values < v))
    queries = np.flatnonzero(mask[row])
    assert len(queries) == cfg.queries and np.all(queries >= 2 * k)
    assert len(set(inputs[row, queries].tolist())) == cfg.queries
    for p in range(seq_len):
      if mask[row, p]:
        (j,) = np.flatnonzero(keys == inputs[row, p])  # seen earlier ...
        assert targets[row, p] == values[j]  # ... with this value
      else:
        assert targets[row, p] == 0
        assert p < 2 * k or inputs[row, p] == 0
  np.testing.assert_array_equal(np.unique(mask), [0.0, 1.0])


@pytest.mark.parametrize(
  "spec,k,q,v",
  [
    ("mqar", 8, 8, 256),
    ("mqar:vocab_size=64,num_kv_pairs=4,num_queries=2", 4, 2, 64),
    ("mqar:num_kv_pairs=31,vocab_size=64", 31, 31, 64),
  ],
)
def test_mqar_every_query_targets_its_value(spec, k, q, v):
  ds = training.make_dataset(spec, seq_len=96, global_batch_size=6, seed=0)
  assert ds.vocab_size == v
  assert (ds.config.num_kv_pairs, ds.config.queries) == (k, q)
  for step in range(3):
    _check_mqar(ds.batch(step), ds.config, 96)
  val = training.make_dataset(
    spec, seq_len=96, global_batch_size=6, seed=0, split="validation"
  )
  assert not np.array_equal(val.batch(0)["inputs"], ds.batch(0)["inputs"])


def test_mqar_accuracy_of_perfect_wrong_and_half_predictors():
  ds = training.make_dataset(
    "mqar:vocab_size=32,num_kv_pairs=4", seq_len=24, global_batch_size=4, seed=5
  )
  batch = ds.batch(0)
  eye = np.eye(32, dtype=np.float32)
  perfect = eye[batch["targets"]]
  # Wrong exactly where it counts: right everywhere the mask is 0.
  wrong = eye[
    np.where(batch["mask"] > 0, (batch["targets"] + 1) % 32, batch["targets"])
  ]
  assert float(training.mqar_accuracy(perfect, batch)) == 1.0
  assert float(training.mqar_accuracy(wrong, batch)) == 0.0
  half = perfect.copy()
  half[:2] = wrong[:2]  # rows 0, 1 wrong; every row has 4 queries
  assert float(training.mqar_accuracy(half, batch)) == 0.5
  with pytest.raises(ValueError, match="logits"):
    training.mqar_accuracy(perfect[0], batch)


def test_bytes_roundtrip():
  text = "caf\u00e9 \u2192 \U0001f600"
  tokens = training.encode_bytes(text)
  assert tokens.dtype == np.int32 and tokens.max() < 256
  assert training.decode_bytes(tokens) == text
  assert training.decode_bytes([0xFF, 0x41]) == "\ufffdA"
  with pytest.raises(ValueError, match="tokens"):
    training.decode_bytes([300])


@pytest.mark.parametrize(
  "spec",
  [
    "/no/such/file",
    "mqar:num_kv_pairs",
    "mqar:colour=3",
    "mqar:vocab_size=x",
    None,
  ],
)
def test_bad_spec_names_data_and_the_accepted_forms(spec):
  with pytest.raises(ValueError, match="`data` must be 'corpus'.*mqar.*npy"):
    training.make_dataset(spec, seq_len=8, global_batch_size=2, seed=0)


def test_bad_arrays_and_arguments(tmp_path):
  np.save(tmp_path / "2d.npy", np.zeros((4, 4), np.int32))
  np.save(tmp_path / "f.npy", np.zeros(40, np.float32))
  (tmp_path / "empty").mkdir()
  args = dict(seq_len=8, global_batch_size=2, seed=0)
  for name in ("2d.npy", "f.npy"):
    with pytest.raises(ValueError, match="`data`.*1-D of an integer dtype"):
      training.make_dataset(tmp_path / name, **args)
  with pytest.raises(ValueError, match="`data`.*no files"):
    training.make_dataset(tmp_path / "empty", **args)
  with pytest.raises(ValueError, match="global_batch_size"):
    training.make_dataset(
      "corpus", seq_len=8, global_batch_size=6, seed=0, process_count=4
    )
  with pytest.raises(ValueError, match="process_index"):
    training.make_dataset("corpus", process_index=2, process_count=2, **args)
  with pytest.raises(ValueError, match="seq_len"):
    training.make_dataset("corpus", seq_len=10**7, global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match="seq_len"):
    training.make_dataset("mqar", seq_len=20, global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match="num_kv_pairs"):
    training.make_dataset("mqar:vocab_size=16,num_kv_pairs=8", **args)
  with pytest.raises(ValueError, match="split"):
    training.make_dataset("corpus", split="test", **args)
  with pytest.raises(ValueError, match="seed"):
    training.make_dataset("corpus", seq_len=8, global_batch_size=2, seed=-1)
  with pytest.raises(ValueError, match="step"):
    _corpus().batch(-1)
