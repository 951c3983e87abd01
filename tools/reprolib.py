"""The pieces of tools/repro.py: planted-recall data, density matching,
MH-MoE parameter / FLOP matching and expert-activation statistics.

Separate from the binary (no flags), so tests import it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import layers
from lightning_jax import moa
from lightning_jax import models
from lightning_jax import moe
from lightning_jax import ops
from lightning_jax import training
from lightning_jax.layers import mixers

# Planted pairs, ids after the byte vocabulary: keys, values, and one
# definition token per (key, value).
RECALL_KEYS = 64
RECALL_VALUES = 16
_KEY0 = training.data.BYTE_VOCAB_SIZE
_VALUE0 = _KEY0 + RECALL_KEYS
_DEFINITION0 = _VALUE0 + RECALL_VALUES
RECALL_VOCAB = _DEFINITION0 + RECALL_KEYS * RECALL_VALUES


def recall_batch(text, rng: np.random.Generator, pairs: int):
  """Plants `pairs` key-value pairs, each defined then queried, in text.

  Each pair takes two random 2-token slots of the window `inputs ++
  targets[-1]`: the earlier one's first token defines it (one token per
  (key, value), id `_DEFINITION0 + key * RECALL_VALUES + value`), the later
  one queries it (`key value`), so the model recalls the value from the
  key: one attention hop back to the definition (multi-query associative
  recall with one-token definitions). Keys are distinct per row.

  Args:
    text: a text batch (`training.make_dataset`), `[batch, seq]` arrays.
    rng: numpy generator of the planting.
    pairs: pairs per row, `4 pairs <= seq` and `pairs <= RECALL_KEYS`.

  Returns:
    `{"inputs", "targets", "mask"}` (mask 1: every next token is trained)
    plus "text" (input and target are both text) and "recall" (the query
    keys, whose target is their value), float32 `[batch, seq]` masks.
  """
  w = np.concatenate([text["inputs"], text["targets"][:, -1:]], axis=1)
  batch, seq = text["inputs"].shape
  if not 0 < pairs <= min(RECALL_KEYS, seq // 4):
    raise ValueError(
      f"`pairs` must be in [1, min({RECALL_KEYS}, seq / 4 = {seq // 4})], "
      f"got {pairs}."
    )
  rows = np.arange(batch)[:, None]
  slots = np.argsort(rng.random((batch, seq // 2)), axis=1)[:, : 2 * pairs]
  first = np.minimum(slots[:, 0::2], slots[:, 1::2])
  second = np.maximum(slots[:, 0::2], slots[:, 1::2])
  keys = np.argsort(rng.random((batch, RECALL_KEYS)), axis=1)[:, :pairs]
  values = rng.integers(0, RECALL_VALUES, (batch, pairs))
  w[rows, 2 * first] = _DEFINITION0 + keys * RECALL_VALUES + values
  w[rows, 2 * second] = _KEY0 + keys
  w[rows, 2 * second + 1] = _VALUE0 + values
  inputs, targets = w[:, :-1], w[:, 1:]
  recall = np.zeros((batch, seq), np.float32)
  recall[rows, 2 * second] = 1.0
  text_pos = (inputs < _KEY0) & (targets < _KEY0)
  return {
    "inputs": inputs,
    "targets": targets,
    "mask": np.ones((batch, seq), np.float32),
    "text": text_pos.astype(np.float32),
    "recall": recall,
  }


@dataclasses.dataclass(frozen=True)
class RecallMix:
  """`recall_batch` over corpus windows: a `training.Dataset`.

  Attributes:
    seq_len, batch_size, seed: of the batches.
    tokens_per_pair: one planted pair per this many tokens.
    split: "train" or "validation" (of the corpus and of the planting).
  """

  seq_len: int
  batch_size: int
  seed: int
  tokens_per_pair: int
  split: str = "train"
  vocab_size: int = RECALL_VOCAB

  @functools.cached_property
  def text(self) -> training.Dataset:
    return training.make_dataset(
      "corpus",
      seq_len=self.seq_len,
      global_batch_size=self.batch_size,
      seed=self.seed,
      split=self.split,
    )

  def full_batch(self, step: int):
    """Batch `step` with its "text" and "recall" masks."""
    rng = np.random.default_rng(
      (self.seed, training.data.SPLITS.index(self.split), step)
    )
    return recall_batch(
      self.text.batch(step), rng, self.seq_len // self.tokens_per_pair
    )

  def batch(self, step: int):
    full = self.full_batch(step)
    return {k: full[k] for k in ("inputs", "targets", "mask")}


forward = jax.jit(models.forward, static_argnums=2)


def recall_scores(params, cfg, batches) -> dict:
  """Text loss and recall accuracy of `cfg` over `recall_batch` batches."""
  ce = count = hits = queries = 0.0
  for b in batches:
    logits, _ = forward(params, jnp.asarray(b["inputs"]), cfg)
    ce += float(models.masked_ce_sum(logits, b["targets"], b["text"]))
    count += float(b["text"].sum())
    h, q = training.data.masked_hits(
      logits, {"targets": b["targets"], "mask": b["recall"]}
    )
    hits, queries = hits + float(h), queries + float(q)
  return {"loss": ce / count, "recall": hits / queries}


def uniform_window(density: float, seq_len: int, sink: int) -> int:
  """The window whose `ops.moa_density` at `seq_len` is nearest `density`."""
  windows = np.arange(1, seq_len + 1)
  return int(
    windows[
      np.argmin(np.abs(ops.moa_density(windows, seq_len, sink) - density))
    ]
  )


def plan_density(plan: ops.MoAPlan, seq_len: int, sink: int) -> float:
  """Mean density of `plan`'s heads at `seq_len`."""
  return float(
    np.mean(
      [
        ops.moa_density(plan.windows(i, seq_len), seq_len, sink)
        for i in range(plan.num_layers)
      ]
    )
  )


def uniform_plan(window: int, like: ops.MoAPlan) -> ops.MoAPlan:
  """The plan of `like`'s shape giving every head the fixed `window`
  (alpha = window, beta = 0): a uniform sliding window, run by the same
  MoA kernel as `like`."""
  return ops.MoAPlan(
    alphas=tuple((float(window),) * len(row) for row in like.alphas),
    betas=tuple((0.0,) * len(row) for row in like.betas),
  )


def sparse_config(cfg, plan: ops.MoAPlan, sink: int) -> models.ModelConfig:
  """`cfg` with its attention layers running `plan` with `sink`."""
  return dataclasses.replace(moa.with_plan(cfg, plan), sink=sink)


def matched_mhmoe(moe_cfg: models.ModelConfig, heads: int, seq_len: int):
  """The MH-MoE version of `moe_cfg` with its parameters and training FLOPs.

  `models.num_params` and `models.flops_per_token` are bilinear in the
  expert count E' and expert width F' (per expert `3 (D / h) F'`
  weights, each token running `h top_k` of them), so four evaluations give
  them on the whole grid E' in [top_k, 4 h E], F' in [1, 4 F]; the pair
  with the smallest larger relative mismatch of the two wins.

  Returns:
    `(config, relative parameter mismatch, relative FLOP mismatch)`.
  """

  def counts(e, f):
    cfg = dataclasses.replace(
      moe_cfg,
      ffn_pattern=("mhmoe",),
      mhmoe_heads=heads,
      num_experts=int(e),
      moe_d_ff=int(f),
    )
    return cfg, np.array(
      [models.num_params(cfg), models.flops_per_token(cfg, seq_len)]
    )

  k = moe_cfg.top_k
  target = np.array(
    [models.num_params(moe_cfg), models.flops_per_token(moe_cfg, seq_len)]
  )
  (v00, v01), (v10, v11) = [
    [counts(e, f)[1] for f in (1, 2)] for e in (k, k + 1)
  ]
  e = np.arange(k, 4 * heads * moe_cfg.num_experts + 1)[:, None, None]
  f = np.arange(1, 4 * moe_cfg.moe_d_ff + 1)[None, :, None]
  de, df = e - k, f - 1
  grid = (
    v00
    + de * (v10 - v00)
    + df * (v01 - v00)
    + de * df * (v11 - v10 - v01 + v00)
  )
  i, j = np.unravel_index(
    np.argmin(np.abs(grid / target - 1).max(-1)), grid.shape[:2]
  )
  cfg, got = counts(e[i, 0, 0], f[0, j, 0])
  return cfg, *(got / target - 1)


def expert_routes(params, tokens_BxT, cfg: models.ModelConfig) -> list:
  """Experts chosen in every MoE / MH-MoE layer: `[batch, seq, h top_k]`
  per layer (h sub-tokens of a token, 1 for MoE), routed as the layers do
  (`moe.route` of the router logits of each block's FFN input)."""
  params = models.cast_params(params, models.compute_dtype(cfg))
  h = models.embed(params, tokens_BxT, cfg)
  batch, seq = tokens_BxT.shape
  routes = []
  for p, block in zip(params["layers"], models.block_configs(cfg), strict=True):
    if block.parallel:
      raise ValueError("`cfg.parallel_block` is not supported.")
    apply = mixers.get(block.kind).apply

    def mixer(x, p=p, block=block, apply=apply):
      y = apply(p["mixer"], x, block.mixer, None, None)[0]
      return y, y

    h_out, _, mixed = models.block_with_mixer(p, h, block, mixer)
    ffn, ffn_params = block.ffn, p["ffn"]
    if not isinstance(ffn, layers.MLPConfig):
      x = layers.rms_norm(p["ffn_norm"], h + mixed, block.norm_eps)
      if isinstance(ffn, layers.MHMoEConfig):
        x = (x @ ffn_params["head_proj"]).reshape(
          batch, seq * ffn.num_heads, -1
        )
        ffn, ffn_params = ffn.sub_token_moe, ffn_params["moe"]
      logits = x.astype(jnp.float32) @ ffn_params["router"]
      routing = moe.route(
        logits, ffn.top_k, score=ffn.score, normalize_topk=ffn.normalize_topk
      )
      routes.append(routing.experts.reshape(batch, seq, -1))
    h = h_out
  return routes


def expert_activation(experts_BxTxS, num_experts: int) -> dict:
  """Fractions of the experts that a token (its `S` routing slots), a
  sequence and the batch activate, and the distinct experts per token."""
  hit = jax.nn.one_hot(experts_BxTxS, num_experts).max(-2)  # [B, T, E]
  return {
    "experts_per_token": float(hit.sum(-1).mean()),
    "token": float(hit.mean()),
    "sequence": float(hit.max(1).mean()),
    "batch": float(hit.max((0, 1)).mean()),
  }
