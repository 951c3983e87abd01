"""Upcycles tools/train.py runs into a MoE run (docs/upcycling.md).

  python -m tools.train --model=transformer --steps=300 --workdir=/tmp/a
  python -m tools.train --model=transformer --steps=300 --workdir=/tmp/b \
      --seed=1
  python -m tools.upcycle --from=/tmp/a,/tmp/b --method=bam --top_k=1 \
      --workdir=/tmp/bam --steps=600
  python -m tools.train --workdir=/tmp/bam          # trains the MoE
  python -m tools.generate --workdir=/tmp/bam

Methods (`adapt.upcycle.METHODS`): btx, bam, bam-shared-kv (one expert per
--from run, configs equal) and split (one run, --num_experts dividing
d_ff; --partition=random|cluster; --router_init=centroids: routers from
the k-means centroids of the FFN inputs on batch 0 of --data;
--split_attention: attention experts by KV group; --shared_expert: one
of num_experts + 1 neuron groups always on). The new run takes
tools/train.py's flags (--steps, --lr, ...); those not given, except the
schedule (--steps, --warmup_steps) and the paths, come from the first
--from run's config.json. It is written as a
tools/train.py run at step 0: `<workdir>/config.json`, whose --model and
--override reproduce the upcycled model config, and a checkpoint of the
fresh train state; `python -m tools.train --workdir=...` trains it
(--steps may grow). A bad flag prints one `error:` line and exits with
status 2.
"""

import dataclasses

from absl import app
from absl import flags

from lightning_jax import training
from lightning_jax.adapt import upcycle
from tools import cli
from tools import train

_FROM = flags.DEFINE_list("from", None, "The tools/train.py runs to upcycle.")
_METHOD = flags.DEFINE_enum(
  "method", "btx", list(upcycle.METHODS), "Upcycling method."
)
_NUM_EXPERTS = flags.DEFINE_integer(
  "num_experts", None, "Experts per layer (split; default: one per run)."
)
_TOP_K = flags.DEFINE_integer("top_k", 2, "FFN experts per token.")
_PARTITION = flags.DEFINE_enum(
  "partition",
  "random",
  list(upcycle.PARTITIONS),
  "split: neurons to experts at random or by balanced k-means.",
)
_ROUTER_INIT = flags.DEFINE_enum(
  "router_init",
  "random",
  ["random", "centroids"],
  "split: routers N(0, 0.02^2), or the k-means centroids of each FFN's "
  "inputs on batch 0 of --data (LLaMA-MoE-v2).",
)

_SPLIT_ATTENTION = flags.DEFINE_bool(
  "split_attention",
  False,
  "split: attention layers become attention experts, one per KV group "
  "(soft routing).",
)

_SHARED_EXPERT = flags.DEFINE_bool(
  "shared_expert",
  False,
  "split: one of num_experts + 1 neuron groups becomes an always-on shared "
  "expert (moe_shared_d_ff).",
)

# tools/train.py flags not taken from the source run.
_NOT_COPIED = frozenset(
  {"model", "override", "steps", "warmup_steps", "checkpoint_dir"}
  | {"metrics_dir", "workdir"}
)


def _format(value) -> str:
  """An override value as `training.parse_value` reads it back."""
  if isinstance(value, tuple):
    return ",".join(_format(v) for v in value)
  if value is None:
    return "none"
  if isinstance(value, bool):
    return str(value).lower()
  return str(value)


def _overrides(source, target) -> list[str]:
  """`field=value` of every model field that upcycling changed."""
  return [
    f"{f.name}={_format(getattr(target, f.name))}"
    for f in dataclasses.fields(target)
    if getattr(target, f.name) != getattr(source, f.name)
  ]


def upcycled_config() -> tuple[training.TrainConfig, dict]:
  """The new run's `TrainConfig` and its upcycled params.

  Raises:
    ValueError: a bad flag or combination.
    WorkdirError: a --from run is unreadable.
  """
  if not _FROM.value:
    raise ValueError("--from is required: the tools/train.py run(s).")
  if not flags.FLAGS["workdir"].present:
    raise ValueError("--workdir is required: the new run's directory.")
  if _METHOD.value != "split":
    if _ROUTER_INIT.value != "random":
      raise ValueError(f"--router_init={_ROUTER_INIT.value} is for split.")
    for flag in (_SPLIT_ATTENTION, _SHARED_EXPERT):
      if flag.value:
        raise ValueError(f"--{flag.name} is for split.")
  sources = [training.load_model(w)[:2] for w in _FROM.value]
  cfg = sources[0][1]
  for workdir, (_, other) in zip(_FROM.value[1:], sources[1:], strict=True):
    if other != cfg:
      raise ValueError(
        f"--from runs differ in model config: {_FROM.value[0]} and {workdir}."
      )
  record = training.read_run_config(_FROM.value[0])
  if record is None:
    raise ValueError(f"--from={_FROM.value[0]} has no config.json.")
  for name, value in record["flags"].items():
    if name in train.RESUMED - _NOT_COPIED and not flags.FLAGS[name].present:
      flags.FLAGS[name].value = value
  calibration = None
  if _ROUTER_INIT.value == "centroids":
    calibration = training.data.make_dataset(
      flags.FLAGS.data,
      seq_len=flags.FLAGS.seq_len,
      global_batch_size=flags.FLAGS.batch_size,
      seed=flags.FLAGS.seed,
    ).batch(0)["inputs"]
  params, new_cfg = upcycle.upcycle(
    _METHOD.value,
    [p for p, _ in sources],
    cfg,
    num_experts=_NUM_EXPERTS.value,
    top_k=_TOP_K.value,
    seed=flags.FLAGS.seed,
    partition=_PARTITION.value,
    calibration_BxT=calibration,
    split_attention=_SPLIT_ATTENTION.value,
    shared=_SHARED_EXPERT.value,
  )
  flags.FLAGS.model = record["flags"]["model"]
  flags.FLAGS.override = record["flags"]["override"] + _overrides(cfg, new_cfg)
  config = train.build_config()
  if config.model != new_cfg:
    raise ValueError("the flags do not reproduce the upcycled model config.")
  return config, params


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  try:
    config, params = upcycled_config()
    training.save_initial_state(config, params)
  except (*cli.INPUT_ERRORS, training.WorkdirError) as e:
    cli.fail(e)
  print(
    f"{_METHOD.value}: {', '.join(_FROM.value)} -> {config.workdir} "
    f"({config.model.num_experts} experts, top_k {config.model.top_k}); "
    f"train it: python -m tools.train --workdir={config.workdir}",
    flush=True,
  )


if __name__ == "__main__":
  app.run(main)
