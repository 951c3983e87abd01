r"""MQAR accuracy against key-value pairs and width, per architecture.

The claim under test (DeltaNet: Yang et al., 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length", arXiv 2406.06484,
Sec. 4.1, Fig. 2): on multi-query associative recall (MQAR; Arora et al.,
2023, "Zoology", arXiv 2312.04927) the delta rule recalls more pairs than
linear attention at the same width. Every grid point (size x pairs x
architecture) is one `tools/train.py` run, in this process, on
`--data=mqar:vocab_size=V,num_kv_pairs=K`, with tools/train's flags for the
rest (--steps, --batch_size, --seq_len, --lr, --seed, --eval_batches, ...):

  python -m tools.repro_mqar \
      --archs=transformer,tnl,hgrn2,deltanet,gated-deltanet,mamba2 \
      --sizes=64x2,32x2 --kv_pairs=4,12 --vocab_size=64 --seq_len=64 \
      --batch_size=32 --steps=250 --out=/tmp/mqar

A size `WxL` is d_model W and L layers, as in tools/sweep.py
(`cli.parse_size`). The accuracy is the run's `eval/accuracy` at its last
step: the fraction of query positions of --eval_batches validation batches
whose argmax is the paired value (`training.mqar_accuracy`). Each finished
run is one JSON row of `<out>/mqar.jsonl` and is skipped by a rerun; a
killed run resumes from its checkpoint in `<out>/<run>/`. The table of
accuracies goes to `<out>/mqar.md`. Runs of one architecture and size
compile the same step (the pairs change the data only), so they share it
through jax's persistent compilation cache, `<out>/jax_cache` unless
--compilation_cache_dir says otherwise. Bad flags print one `error:` line.
"""

import json
import os
import time

from absl import app
from absl import flags
import jax

from lightning_jax import models
from lightning_jax import training
from tools import cli
from tools import train

RESULTS_FILE = "mqar.jsonl"
TABLE_FILE = "mqar.md"

_ARCHS = flags.DEFINE_list(
  "archs",
  ["transformer", "tnl", "hgrn2", "deltanet", "gated-deltanet", "mamba2"],
  "Model presets (models.preset_names()).",
)
_SIZES = flags.DEFINE_list(
  "sizes", ["64x2", "32x2"], "Sizes `<d_model>x<num_layers>`."
)
_KV_PAIRS = flags.DEFINE_list(
  "kv_pairs", ["4", "12"], "MQAR key-value pairs per sequence K."
)
_VOCAB_SIZE = flags.DEFINE_integer(
  "vocab_size", 64, "MQAR vocabulary: keys below V/2, values above."
)
_OUT = flags.DEFINE_string("out", None, "Results directory.")
# tools/train flags every row of one results directory shares.
_SHARED = ("steps", "batch_size", "seq_len", "lr", "seed", "eval_batches")


def grid() -> list[dict]:
  """The runs of the flags (size, then pairs, then architecture), each
  `{"run", "arch", "size", "kv_pairs", "overrides"}`; ValueError on a bad
  flag."""
  pairs = cli.parse_numbers("kv_pairs", _KV_PAIRS.value, int, 1)
  if not _ARCHS.value or not _SIZES.value:
    raise ValueError("--archs and --sizes must name at least one entry.")
  presets = {arch: models.get_preset(arch) for arch in _ARCHS.value}
  runs = []
  for size in _SIZES.value:
    for k in pairs:
      # Checks K against the vocabulary and --seq_len before any compile.
      training.make_dataset(
        _data(k), seq_len=flags.FLAGS.seq_len, global_batch_size=1, seed=0
      )
      for arch, preset in presets.items():
        runs.append(
          {
            "run": f"{arch}-{size}-k{k}",
            "arch": arch,
            "size": size,
            "kv_pairs": k,
            "overrides": cli.parse_size(size, preset.head_dim),
          }
        )
  return runs


def _data(kv_pairs: int) -> str:
  return f"mqar:vocab_size={_VOCAB_SIZE.value},num_kv_pairs={kv_pairs}"


def _settings() -> dict:
  return {
    "vocab_size": _VOCAB_SIZE.value,
    **{name: flags.FLAGS[name].value for name in _SHARED},
  }


def _finished(out: str, settings: dict) -> list[dict]:
  """The rows of `<out>/mqar.jsonl`; ValueError if they have other
  settings than these flags."""
  path = os.path.join(out, RESULTS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  for row in rows:
    saved = {k: row[k] for k in settings}
    if saved != settings:
      raise ValueError(
        f"--out={out} holds MQAR runs with other settings {saved}; these "
        f"flags give {settings}."
      )
  return rows


def run_one(run: dict, out: str) -> dict:
  """Trains (or resumes) `run` through tools/train's config and returns
  its row."""
  fl = flags.FLAGS
  fl.model = run["arch"]
  fl.override = [",".join(f"{k}={v}" for k, v in run["overrides"].items())]
  fl.data = _data(run["kv_pairs"])
  fl.workdir = os.path.join(out, run["run"])
  fl.eval_every = fl.steps  # once, at the last step
  config = train.build_config()
  start = time.time()
  training.train(config)
  path = os.path.join(config.workdir, training.metrics.METRICS_FILE)
  with open(path, encoding="utf-8") as f:
    last = [json.loads(line) for line in f if line.strip()][-1]
  return {
    "run": run["run"],
    "arch": run["arch"],
    "size": run["size"],
    **{k: int(v) for k, v in run["overrides"].items()},
    "kv_pairs": run["kv_pairs"],
    "n_params": models.non_embedding_params(config.model),
    "n_params_total": models.num_params(config.model),
    "accuracy": last["eval/accuracy"],
    "eval_loss": last["eval/loss"],
    "train_loss": last["loss"],
    "seconds": round(time.time() - start, 1),
    **_settings(),
  }


def table(rows: list[dict]) -> str:
  """Markdown: one line per architecture; per size its non-embedding
  parameters, then the accuracy at each K."""
  sizes = list(dict.fromkeys(r["size"] for r in rows))
  pairs = sorted({r["kv_pairs"] for r in rows})
  cell = {(r["arch"], r["size"], r["kv_pairs"]): r for r in rows}
  head = ["arch"]
  for size in sizes:
    head += [f"N {size}"] + [f"{size} K={k}" for k in pairs]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for arch in dict.fromkeys(r["arch"] for r in rows):
    line = [f"`{arch}`"]
    for size in sizes:
      mine = [cell.get((arch, size, k)) for k in pairs]
      n = next((r["n_params"] for r in mine if r), None)
      line.append(f"{n:,}" if n else "-")
      line += [f"{r['accuracy']:.3f}" if r else "-" for r in mine]
    lines.append("| " + " | ".join(line) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  if not _OUT.value:
    cli.fail("--out (the results directory) is required.")
  out = os.path.abspath(_OUT.value)
  try:
    runs = grid()
    rows = _finished(out, _settings())
  except ValueError as e:
    cli.fail(e)
  os.makedirs(out, exist_ok=True)
  cache = flags.FLAGS.compilation_cache_dir or os.path.join(out, "jax_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  done = {r["run"] for r in rows}
  for run in runs:
    if run["run"] in done:
      continue
    print(f"running {run['run']}", flush=True)
    try:
      row = run_one(run, out)
    except ValueError as e:
      cli.fail(e)
    except (training.NonFiniteLossError, training.WorkdirError) as e:
      cli.fail(e, 1)
    rows.append(row)
    with open(os.path.join(out, RESULTS_FILE), "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    print(
      f"{row['run']}: accuracy {row['accuracy']:.3f} ({row['seconds']} s)",
      flush=True,
    )
  text = table(rows)
  with open(os.path.join(out, TABLE_FILE), "w", encoding="utf-8") as f:
    f.write(text)
  print(text, end="")


if __name__ == "__main__":
  app.run(main)
