"""Upcycling dense models into MoEs: pure functions on params trees and
`ModelConfig`s (docs/upcycling.md).

* BTX (Sukhbaatar et al., 2024, "Branch-Train-MiX", arXiv 2403.07419): N
  dense models of one config -> FFN experts, one from each; everything else
  (attention included) averaged.
* BAM (Zhang et al., 2024, arXiv 2408.08274): as BTX, and the attention
  layers become attention experts (`layers.attention_experts`), one from
  each model, optionally with keys/values averaged and shared.
* Split (LLaMA-MoE-v2, Qu et al., 2024, arXiv 2411.15708; the partitions
  of LLaMA-MoE, Zhu et al., 2024, arXiv 2406.16554): one dense model's FFN
  neurons partitioned into experts.

Routers start small (`router_std`), so routing starts near uniform. Every
method is a `Method` record in `METHODS`; `upcycle` dispatches by name.
"""

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from lightning_jax import layers
from lightning_jax import models
from lightning_jax import moe as moe_lib
from lightning_jax.layers import attention_experts
from lightning_jax.layers import mixers

ROUTER_STD = 0.02
PARTITIONS = ("random", "cluster")


def check_sources(params_list, cfg: models.ModelConfig) -> None:
  """Every tree in `params_list` has `models.init(cfg)`'s structure and
  shapes, and `cfg` has dense MLP FFNs of one width.

  Raises:
    ValueError: naming `params_list` or the config field.
  """
  if not params_list:
    raise ValueError("`params_list` must hold at least one params tree.")
  want = jax.eval_shape(lambda: models.init(jax.random.key(0), cfg))
  want = jax.tree.map(lambda x: x.shape, want)
  for i, params in enumerate(params_list):
    if jax.tree.map(np.shape, params) != want:
      raise ValueError(
        f"`params_list[{i}]` does not match the model config's params."
      )
  if set(cfg.ffn_pattern) != {"mlp"}:
    raise ValueError(
      f"`ffn_pattern` must be all 'mlp' to upcycle, got {cfg.ffn_pattern}."
    )
  if cfg.layerwise_ffn is not None:
    raise ValueError("`layerwise_ffn` must be None: experts share one width.")


def _mean(trees):
  return jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *trees)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _router(key, d_model: int, num_experts: int, std: float):
  return std * jax.random.normal(key, (d_model, num_experts), jnp.float32)


def _moe_config(
  cfg, num_experts: int, top_k: int, moe_d_ff: int, shared_d_ff: int = 0
):
  if not 1 <= top_k <= num_experts:
    raise ValueError(
      f"`top_k` must be in [1, num_experts={num_experts}], got {top_k}."
    )
  return dataclasses.replace(
    cfg,
    ffn_pattern=("moe",),
    num_experts=num_experts,
    top_k=top_k,
    moe_d_ff=moe_d_ff,
    moe_shared_d_ff=shared_d_ff,
  )


def _with_attention_experts(cfg, options: dict):
  """`cfg` with its "attention" layers made "attention_experts" ones: the
  "attention" kind's options carry over, and `options` (fields of
  `AttentionExpertsConfig` or `AttentionConfig`) are added where not
  falsy."""
  kind = attention_experts.KIND
  carried = tuple(
    f"{kind}.{o.partition('.')[2]}"
    for o in cfg.mixer_options
    if o.startswith("attention.")
  )
  added = tuple(
    f"{kind}.{k}={str(v).lower() if isinstance(v, bool) else v}"
    for k, v in options.items()
    if v
  )
  return dataclasses.replace(
    cfg,
    pattern=tuple(kind if k == "attention" else k for k in cfg.pattern),
    mixer_options=cfg.mixer_options + carried + added,
  )


def btx(params_list, cfg, *, top_k: int = 2, key=None, router_std=ROUTER_STD):
  """Branch-Train-MiX: N dense models -> one MoE with N FFN experts.

  Expert e of layer l is model e's FFN of layer l; every other parameter
  is the mean over the models; routers are `N(0, router_std^2)`.

  Args:
    params_list: N params trees of `cfg` (`models.init` layout).
    cfg: their `ModelConfig` (dense "mlp" FFNs).
    top_k: experts per token (weights renormalised over the chosen ones,
      so N identical experts give the dense FFN for any router).
    key: PRNG key of the routers (default `jax.random.key(0)`).
    router_std: router init scale.

  Returns:
    `(params, ModelConfig)` of the MoE.

  Raises:
    ValueError: params not of `cfg`, non-MLP FFNs, bad `top_k`.
  """
  check_sources(params_list, cfg)
  n = len(params_list)
  new_cfg = _moe_config(cfg, n, top_k, cfg.d_ff)
  key = jax.random.key(0) if key is None else key
  params = _mean(params_list)
  layers = []
  for i, block in enumerate(params["layers"]):
    ffn = _stack([p["layers"][i]["ffn"] for p in params_list])
    router = _router(jax.random.fold_in(key, i), cfg.d_model, n, router_std)
    layers.append({**block, "ffn": {"router": router, "experts": ffn}})
  return {**params, "layers": tuple(layers)}, new_cfg


def bam(
  params_list,
  cfg,
  *,
  shared_kv: bool = False,
  top_k: int = 2,
  attention_top_k: int = 0,
  key=None,
  router_std=ROUTER_STD,
):
  """BAM: BTX, and every "attention" layer becomes N attention experts.

  Expert e of an attention layer is model e's attention; with `shared_kv`
  the experts' queries and outputs are per model and the keys and values
  the mean. Routing over attention experts is soft (`attention_top_k=0`,
  BAM's default) or top-k: identical soft experts give the dense attention
  for any router, so N copies of one model give its loss.

  Args:
    params_list: N params trees of `cfg`.
    cfg: their `ModelConfig` (dense FFNs, at least one "attention" layer).
    shared_kv: one averaged key/value projection (and cache) per layer.
    top_k: FFN experts per token.
    attention_top_k: attention experts per token (0: soft).
    key: PRNG key of the routers.
    router_std: router init scale.

  Returns:
    `(params, ModelConfig)` of the MoE; the attention experts' options are
    in `mixer_options` (and the "attention" kind's ones carry over).

  Raises:
    ValueError: as `btx`, or no "attention" layer.
  """
  if "attention" not in cfg.pattern:
    raise ValueError(
      f"`pattern` must have an 'attention' layer for BAM, got {cfg.pattern}."
    )
  key = jax.random.key(0) if key is None else key
  k_ffn, k_attn = jax.random.split(key)
  params, new_cfg = btx(
    params_list, cfg, top_k=top_k, key=k_ffn, router_std=router_std
  )
  n = len(params_list)
  options = {"num_experts": n, "top_k": attention_top_k, "shared_kv": shared_kv}
  new_cfg = _with_attention_experts(new_cfg, options)
  layers = list(params["layers"])
  for i, mixer in enumerate(cfg.mixers):
    if mixer != "attention":
      continue
    experts = _stack([p["layers"][i]["mixer"] for p in params_list])
    router = _router(jax.random.fold_in(k_attn, i), cfg.d_model, n, router_std)
    block = {"router": router, "experts": experts}
    if shared_kv:
      kv = attention_experts.KV
      block["experts"] = {k: v for k, v in experts.items() if k not in kv}
      block["kv"] = {k: jnp.mean(experts[k], axis=0) for k in kv}
    layers[i] = {**layers[i], "mixer": block}
  models.block_configs(new_cfg)  # the options against the layer configs
  return {**params, "layers": tuple(layers)}, new_cfg


def balanced_kmeans(vectors_NxD, k: int, *, seed: int = 0, iters: int = 10):
  """Balanced k-means: each iteration assigns (vector, centroid) pairs
  closest first while the centroid's cluster holds fewer than `ceil(N / k)`,
  then moves the centroids to their clusters' means (squared L2). With k
  dividing N every cluster ends with N / k points; otherwise a cluster may
  end empty and keeps its centroid.

  Args:
    vectors_NxD: the points `[N, D]` (N >= k).
    k: clusters.
    seed: numpy seed of the initial centroids (k distinct points).
    iters: iterations.

  Returns:
    `(labels int [N], centroids float64 [k, D])`.
  """
  vectors = np.asarray(vectors_NxD, np.float64)
  n = len(vectors)
  rng = np.random.default_rng(seed)
  centroids = vectors[rng.choice(n, k, replace=False)]
  for _ in range(iters):
    dist = ((vectors[:, None] - centroids[None]) ** 2).sum(-1)  # [N, k]
    labels = np.full(n, -1)
    room = np.full(k, -(-n // k))
    for flat in np.argsort(dist, axis=None, kind="stable"):
      point, cluster = divmod(int(flat), k)
      if labels[point] < 0 and room[cluster]:
        labels[point], room[cluster] = cluster, room[cluster] - 1
    centroids = np.stack(
      [  # an emptied cluster keeps its centroid
        vectors[labels == c].mean(0) if (labels == c).any() else centroids[c]
        for c in range(k)
      ]
    )
  return labels, centroids


def neuron_groups(
  w_up_DxF, num_experts: int, *, partition: str = "random", seed: int = 0
) -> np.ndarray:
  """A balanced partition of the FFN's F neurons into experts.

  "random": a random permutation cut into equal groups. "cluster":
  `balanced_kmeans` over the neurons' up-projection vectors (columns of
  `w_up`, LLaMA-MoE's neuron-independent clustering).

  Args:
    w_up_DxF: up projection `[d_model, d_ff]`.
    num_experts: E, dividing d_ff.
    partition: "random" or "cluster".
    seed: numpy seed.

  Returns:
    int `[E, d_ff / E]`, each group's neurons in ascending order.

  Raises:
    ValueError: E not dividing d_ff, or an unknown `partition`.
  """
  d_ff = w_up_DxF.shape[1]
  if num_experts < 1 or d_ff % num_experts:
    raise ValueError(
      f"`num_experts` ({num_experts}) must divide d_ff ({d_ff})."
    )
  if partition not in PARTITIONS:
    raise ValueError(f"`partition` must be one of {PARTITIONS}: {partition!r}")
  if partition == "random":
    rng = np.random.default_rng(seed)
    groups = rng.permutation(d_ff).reshape(num_experts, d_ff // num_experts)
    return np.sort(groups, axis=1)
  group, _ = balanced_kmeans(np.asarray(w_up_DxF).T, num_experts, seed=seed)
  return np.stack([np.flatnonzero(group == e) for e in range(num_experts)])


def ffn_inputs(params, tokens_BxT, cfg) -> list[np.ndarray]:
  """Every layer's FFN input (after its norm) on a calibration batch.

  Args:
    params: a params tree of `cfg`.
    tokens_BxT: int `[batch, seq]`.
    cfg: the `ModelConfig`.

  Returns:
    Per layer, float32 `[batch * seq, d_model]`.
  """

  @jax.jit
  def run(params, tokens):
    h = models.embed(params, tokens, cfg)
    inputs = []
    for block_params, block in zip(
      params["layers"], models.block_configs(cfg), strict=True
    ):
      x = layers.rms_norm(block_params["mixer_norm"], h, block.norm_eps)
      if not block.parallel:
        mixed, _ = mixers.get(block.kind).apply(
          block_params["mixer"], x, block.mixer
        )
        x = layers.rms_norm(block_params["ffn_norm"], h + mixed, block.norm_eps)
      inputs.append(x.reshape(-1, cfg.d_model).astype(jnp.float32))
      h = models.apply_block(block_params, h, block)[0]
    return inputs

  return [np.asarray(x) for x in run(params, tokens_BxT)]


def centroid_router(x_NxD, num_experts: int, *, seed: int = 0):
  """LLaMA-MoE-v2's router init: the k-means centroids of the layer's
  inputs as the router's columns, `W_r = [c_1 .. c_E]` `[D, E]`, so a
  token's logit for expert e is `x . c_e` (the authors' get_gates step,
  `hidden_feature_clustering.py`, sets the gate weight to the balanced
  k-means `cluster_centers_`, unnormalised).

  Returns:
    `(router float32 [D, E], labels int [N])`: the tokens' clusters.
  """
  if len(x_NxD) < num_experts:
    raise ValueError(
      f"the calibration batch ({len(x_NxD)} tokens) must hold at least "
      f"`num_experts` ({num_experts}) tokens."
    )
  labels, centroids = balanced_kmeans(x_NxD, num_experts, seed=seed)
  return jnp.asarray(centroids.T, jnp.float32), labels


def group_mass(mlp_params, groups_GxS, x_NxD, activation: str) -> np.ndarray:
  """Each token's activation mass in each neuron group, `sum_{j in g}
  |act(x g_j) (x u_j)|`: float32 `[N, G]`."""
  act = moe_lib.ACTIVATIONS[activation]
  x = np.asarray(x_NxD, np.float32)
  hidden = act(x @ mlp_params["w_gate"]) * (x @ mlp_params["w_up"])  # [N, F]
  return np.abs(np.asarray(hidden))[:, groups_GxS].sum(-1)


def match_groups(mlp_params, groups_ExG, x_NxD, labels, activation: str):
  """Orders the neuron groups so that group e is the one most active on
  token cluster e: the assignment (`scipy.optimize.linear_sum_assignment`)
  maximising `sum_e A[e, pi(e)]`, `A[e, g]` the mean over cluster e's
  tokens of `group_mass`.

  Returns:
    int `[E, F / E]`, `groups_ExG` reordered.
  """
  mass = group_mass(mlp_params, groups_ExG, x_NxD, activation)  # [N, E]
  score = np.stack([mass[labels == e].mean(0) for e in range(len(mass[0]))])
  _, order = scipy.optimize.linear_sum_assignment(score, maximize=True)
  return groups_ExG[order]


def split_mlp(mlp_params, groups_ExG) -> dict:
  """The GLU MLP cut into experts along its neurons: expert e keeps
  neurons `groups[e]`, so the experts' outputs sum to the MLP's (GLU
  neurons are independent).

  Args:
    mlp_params: `{"w_gate", "w_up": [D, F], "w_down": [F, D]}`.
    groups_ExG: int `[E, F / E]`, a partition of `range(F)`.

  Returns:
    Stacked experts `{"w_gate", "w_up": [E, D, F/E], "w_down": [E, F/E, D]}`.
  """
  return {
    "w_gate": jnp.moveaxis(mlp_params["w_gate"][:, groups_ExG], 1, 0),
    "w_up": jnp.moveaxis(mlp_params["w_up"][:, groups_ExG], 1, 0),
    "w_down": mlp_params["w_down"][groups_ExG],
  }


def kv_group_experts(attention_params, num_kv_heads: int) -> dict:
  """GQA attention cut into one expert per KV group: expert g keeps query
  heads `g G .. g G + G - 1` (G = H / Hkv, the heads reading KV head g),
  KV head g and those heads' rows of `wo`, so the experts' outputs sum to
  the attention's (heads are independent until `wo` sums them).

  Args:
    attention_params: `{"wq": [D, H, Dh], "wk", "wv": [D, Hkv, Dh], "wo":
      [H, Dh, D]}`.
    num_kv_heads: Hkv.

  Returns:
    Stacked experts of `G` query heads and one KV head each: `{"wq": [Hkv,
    D, G, Dh], "wk", "wv": [Hkv, D, 1, Dh], "wo": [Hkv, G, Dh, D]}`.
  """
  d, h, dh = attention_params["wq"].shape
  group = h // num_kv_heads
  by_group = lambda w: jnp.moveaxis(
    w.reshape(d, num_kv_heads, -1, dh), 1, 0
  )  # [D, Hkv * n, Dh] -> [Hkv, D, n, Dh]
  return {
    "wq": by_group(attention_params["wq"]),
    "wk": by_group(attention_params["wk"]),
    "wv": by_group(attention_params["wv"]),
    "wo": attention_params["wo"].reshape(num_kv_heads, group, dh, -1),
  }


def _kv_groups(cfg) -> tuple[int, int]:
  """`(num_heads, num_kv_heads)` shared by every "attention" layer.

  Raises:
    ValueError: no attention layer, layer-wise heads, or one KV head.
  """
  heads = {
    (b.mixer.num_heads, b.mixer.num_kv_heads)
    for b in models.block_configs(cfg)
    if b.kind == "attention"
  }
  if len(heads) != 1:
    raise ValueError(
      "`split_attention` needs 'attention' layers of one head count in "
      f"`pattern` (got {cfg.pattern}, heads {sorted(heads)})."
    )
  ((h, hkv),) = heads
  if hkv < 2:
    raise ValueError(
      f"`split_attention` needs num_kv_heads >= 2 (one expert each), got {hkv}."
    )
  return h, hkv


def split(
  params,
  cfg,
  num_experts: int,
  *,
  top_k: int = 2,
  partition: str = "random",
  seed: int = 0,
  router_std=ROUTER_STD,
  calibration_BxT=None,
  split_attention: bool = False,
  attention_top_k: int = 0,
  shared: bool = False,
):
  """LLaMA-MoE-v2 split: one dense model -> E FFN experts of d_ff / E
  neurons each per layer (d_ff / (E + 1) with a shared expert), and
  optionally attention experts by KV group.

  `w_down` is scaled by E, so routing weights of 1 / E on every expert
  (a zero router with `top_k = E`) give the dense model; with top-k the
  output is E times the mean of the chosen experts, the dense FFN's
  estimate from k of its E parts. With a calibration batch, each router
  is `centroid_router` of the layer's FFN inputs and the neuron groups are
  ordered by `match_groups`, so expert e holds the neurons most active on
  the tokens of centroid e. With `shared`, the neurons are partitioned
  into E + 1 groups and one group becomes the MoE's always-on shared
  expert (unscaled: routed weights 1 / E plus the shared expert at 1 give
  the dense FFN): with a calibration batch the group of the largest
  activation mass over all its tokens (`group_mass`), else the last one.
  With `split_attention`, every "attention"
  layer becomes `attention_experts` with one expert per KV group
  (`kv_group_experts`), `wo` scaled by Hkv likewise (soft weights 1 / Hkv
  give the dense attention), routed soft (`attention_top_k=0`) or top-k
  by a new `N(0, router_std^2)` router.

  Args:
    params: a params tree of `cfg`.
    cfg: its `ModelConfig` (dense "mlp" FFNs).
    num_experts: E, dividing `d_ff`.
    top_k: experts per token.
    partition: "random" or "cluster" (`neuron_groups`).
    seed: partition and router seed.
    router_std: router init scale (without a calibration batch).
    calibration_BxT: None (routers `N(0, router_std^2)`), or int tokens
      `[batch, seq]` whose FFN inputs give the routers.
    split_attention: attention experts by KV group.
    attention_top_k: attention experts per token (0: soft).
    shared: one neuron group as a shared expert (`moe_shared_d_ff`).

  Returns:
    `(params, ModelConfig)` of the MoE.

  Raises:
    ValueError: as `btx`, E (E + 1 with `shared`) not dividing d_ff, fewer
      calibration tokens
      than experts, or (`split_attention`) attention layers of several
      head counts or one KV head.
  """
  check_sources([params], cfg)
  groups_total = num_experts + shared
  if num_experts < 1 or cfg.d_ff % groups_total:
    raise ValueError(
      f"`num_experts` ({num_experts}{' + 1 shared' if shared else ''}) "
      f"must divide d_ff ({cfg.d_ff})."
    )
  width = cfg.d_ff // groups_total
  if split_attention:
    h, hkv = _kv_groups(cfg)
  new_cfg = _moe_config(cfg, num_experts, top_k, width, width if shared else 0)
  key = jax.random.key(seed)
  inputs = None
  if calibration_BxT is not None:
    inputs = ffn_inputs(params, jnp.asarray(calibration_BxT), cfg)
  layers_out = []
  for i, (block, block_cfg) in enumerate(
    zip(params["layers"], models.block_configs(cfg), strict=True)
  ):
    mlp = block["ffn"]
    act = block_cfg.ffn.activation
    groups = neuron_groups(
      mlp["w_up"], groups_total, partition=partition, seed=seed + i
    )
    shared_group = None
    if shared:
      last = len(groups) - 1
      if inputs is not None:
        last = int(np.argmax(group_mass(mlp, groups, inputs[i], act).sum(0)))
      shared_group = groups[last]
      groups = np.delete(groups, last, axis=0)
    if inputs is None:
      router = _router(
        jax.random.fold_in(key, i), cfg.d_model, num_experts, router_std
      )
    else:
      router, labels = centroid_router(inputs[i], num_experts, seed=seed + i)
      groups = match_groups(mlp, groups, inputs[i], labels, act)
    experts = split_mlp(mlp, groups)
    experts["w_down"] = experts["w_down"] * num_experts
    ffn = {"router": router, "experts": experts}
    if shared:
      ffn["shared"] = {
        k: v[0] for k, v in split_mlp(mlp, shared_group[None]).items()
      }
    layers_out.append({**block, "ffn": ffn})
  if not split_attention:
    return {**params, "layers": tuple(layers_out)}, new_cfg
  new_cfg = _with_attention_experts(
    new_cfg,
    {
      "num_experts": hkv,
      "top_k": attention_top_k,
      "num_heads": h // hkv,
      "num_kv_heads": 1,
    },
  )
  k_attn = jax.random.fold_in(key, len(cfg.pattern))
  for i, mixer in enumerate(cfg.mixers):
    if mixer != "attention":
      continue
    experts = kv_group_experts(layers_out[i]["mixer"], hkv)
    experts["wo"] = experts["wo"] * hkv
    router = _router(
      jax.random.fold_in(k_attn, i), cfg.d_model, hkv, router_std
    )
    layers_out[i] = {
      **layers_out[i],
      "mixer": {"router": router, "experts": experts},
    }
  models.block_configs(new_cfg)  # the options against the layer configs
  return {**params, "layers": tuple(layers_out)}, new_cfg


class Method(NamedTuple):
  """An upcycling method, as `upcycle` and tools/upcycle.py call it.

  Attributes:
    name: the method's name.
    build: `(params_list, cfg, num_experts, top_k, seed, split_options)
      -> (params, cfg)`; `split_options` are `split`'s keyword arguments
      (`partition`, `calibration_BxT`, ...), ignored by the others.
    many: takes several models (one expert each) rather than one.
    doc: one line, with the paper.
  """

  name: str
  build: Callable
  many: bool
  doc: str


def _check_count(params_list, num_experts):
  if num_experts not in (None, len(params_list)):
    raise ValueError(
      f"`num_experts` ({num_experts}) must be the number of models "
      f"({len(params_list)}): one expert from each."
    )


def _btx(params_list, cfg, num_experts, top_k, seed, split_options):
  del split_options
  _check_count(params_list, num_experts)
  return btx(params_list, cfg, top_k=top_k, key=jax.random.key(seed))


def _bam(shared_kv):
  def build(params_list, cfg, num_experts, top_k, seed, split_options):
    del split_options
    _check_count(params_list, num_experts)
    return bam(
      params_list,
      cfg,
      shared_kv=shared_kv,
      top_k=top_k,
      key=jax.random.key(seed),
    )

  return build


def _split(params_list, cfg, num_experts, top_k, seed, split_options):
  (params,) = params_list
  return split(
    params, cfg, num_experts, top_k=top_k, seed=seed, **split_options
  )


METHODS = {
  m.name: m
  for m in (
    Method(
      "btx", _btx, True, "BTX (arXiv 2403.07419): FFN experts, rest averaged."
    ),
    Method(
      "bam",
      _bam(False),
      True,
      "BAM (arXiv 2408.08274): FFN and attention experts.",
    ),
    Method(
      "bam-shared-kv",
      _bam(True),
      True,
      "BAM with keys/values averaged and shared by the attention experts.",
    ),
    Method(
      "split",
      _split,
      False,
      "LLaMA-MoE-v2 (arXiv 2411.15708): one "
      "model's FFN neurons split into experts.",
    ),
  )
}


def upcycle(
  method: str,
  params_list,
  cfg,
  *,
  num_experts: int | None = None,
  top_k: int = 2,
  seed: int = 0,
  partition: str = "random",
  calibration_BxT=None,
  split_attention: bool = False,
  shared: bool = False,
):
  """`METHODS[method]` on the source models.

  Args:
    method: a name in `METHODS`.
    params_list: the source params trees (one for "split", >= 2 for the
      others).
    cfg: their common `ModelConfig`.
    num_experts: experts per layer ("split"; the others take one per model
      and accept None or that count).
    top_k: FFN experts per token.
    seed: router (and partition) seed.
    partition: "split"'s neuron partition (`neuron_groups`).
    calibration_BxT: "split"'s calibration tokens (routers from k-means
      centroids, see `split`); None for random routers.
    split_attention: "split"'s attention experts by KV group.
    shared: "split"'s shared expert.

  Returns:
    `(params, ModelConfig)` of the MoE.

  Raises:
    ValueError: unknown method (listing them), wrong number of models, or
      the method's own errors.
  """
  if method not in METHODS:
    raise ValueError(f"Unknown `method` {method!r}; methods: {list(METHODS)}.")
  m = METHODS[method]
  if m.many and len(params_list) < 2:
    raise ValueError(
      f"`params_list`: {method} takes >= 2 models (one expert each), got "
      f"{len(params_list)}."
    )
  if not m.many and len(params_list) != 1:
    raise ValueError(
      f"`params_list`: {method} takes one model, got {len(params_list)}."
    )
  if not m.many and num_experts is None:
    raise ValueError(f"`num_experts` is required by {method}.")
  if m.many and (calibration_BxT is not None or split_attention or shared):
    raise ValueError(
      f"`calibration_BxT`, `split_attention` and `shared` are split's "
      f"options; {method} takes none of them."
    )
  split_options = dict(
    partition=partition,
    calibration_BxT=calibration_BxT,
    split_attention=split_attention,
    shared=shared,
  )
  return m.build(
    list(params_list), cfg, num_experts, top_k, seed, split_options
  )
