"""Pipeline parallelism over the `pipe` mesh axis: GPipe, circular, SPMD 1F1B.

The model's layers are split into `S * R` virtual stages of `L` layers (S
devices on `pipe`, R repeats); virtual stage `v = r * S + s` lives on device
`s`. Stage parameters are stacked (`stack_stages`) and sharded over `pipe`;
one `jax.shard_map`, manual over `pipe` only (data / fsdp / tensor / expert
stay automatic), runs the tick table of `schedules.tick_table`, moving
activations (and 1f1b cotangents) one stage per tick with `ppermute`.
Embedding and head are not stages: every device holds them, stage 0 embeds
the microbatch it starts, the head runs after the last stage. MoE aux
outputs come out per (layer, microbatch), so the global-batch
load-balancing loss is exact. docs/pipeline.md has the design and timelines.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lightning_jax import _checks
from lightning_jax import layers
from lightning_jax import models
from lightning_jax.parallel import schedules

PIPE_AXIS = "pipe"
STAGES_KEY = "stages"


# ----------------------------------------------------------------- layout ---


def _check_split(num_layers: int, num_stages: int, repeats: int) -> int:
  """Layers per virtual stage; ValueError unless S * R divides the layers."""
  if num_stages < 1 or repeats < 1:
    raise ValueError(
      f"`num_stages` and `repeats` must be >= 1, got "
      f"{num_stages} and {repeats}."
    )
  if num_layers % (num_stages * repeats):
    raise ValueError(
      f"the model's {num_layers} layers must split into num_stages * "
      f"repeats = {num_stages} * {repeats} equal virtual stages."
    )
  return num_layers // (num_stages * repeats)


def _signature(tree):
  """Structure, shapes and dtypes of a pytree (what stacking needs equal)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves)


def stack_stages(layers, num_stages: int, repeats: int = 1):
  """Stacks per-layer params into pipeline stages.

  Layer `(r * S + s) * L + l` (virtual stage `r * S + s`, position `l`)
  becomes entry `[r, s]` of position `l`. Positions inside a stage may differ
  (hybrid patterns); virtual stages must be identical.

  Args:
    layers: tuple of per-layer param dicts (`params["layers"]`), length N.
    num_stages: S, the size of the `pipe` mesh axis.
    repeats: R, virtual stages per device (circular schedule).

  Returns:
    Tuple of length `L = N / (S * R)` of param trees with leading axes
    `[repeats, num_stages, ...]` (the stage axis, axis 1, is sharded over
    `pipe`).

  Raises:
    ValueError: S * R does not divide N, or virtual stages differ in
      structure / shapes / dtypes (e.g. layer-wise scaling, or stages with
      different mixers), naming the first differing layers.

  Example:
    >>> layers = tuple({"w": jnp.full((3,), i)} for i in range(4))
    >>> stack_stages(layers, 2)[0]["w"].shape
    (1, 2, 3)
  """
  layers = tuple(layers)
  per_stage = _check_split(len(layers), num_stages, repeats)
  stacked = []
  for pos in range(per_stage):
    group = layers[pos::per_stage]  # virtual stages 0 .. S * R - 1
    first = _signature(group[0])
    for v, layer in enumerate(group):
      if _signature(layer) != first:
        raise ValueError(
          f"pipeline stages must be structurally identical: layer "
          f"{v * per_stage + pos} (virtual stage {v}, position {pos}) has "
          f"params {jax.tree.map(jnp.shape, layer)} but layer {pos} has "
          f"{jax.tree.map(jnp.shape, group[0])} (layer-wise scaling or a "
          "block pattern that does not repeat every stage cannot be "
          "pipelined)."
        )
    stacked.append(
      jax.tree.map(
        lambda *xs: jnp.stack(xs).reshape((repeats, num_stages) + xs[0].shape),
        *group,
      )
    )
  return tuple(stacked)


def unstack_stages(stacked) -> tuple:
  """Inverse of `stack_stages`: the tuple of per-layer param dicts."""
  stacked = tuple(stacked)
  repeats, num_stages = jax.tree.leaves(stacked[0])[0].shape[:2]
  layers = []
  for v in range(repeats * num_stages):
    r, s = divmod(v, num_stages)
    layers.extend(
      jax.tree.map(lambda a, r=r, s=s: a[r, s], pos) for pos in stacked
    )
  return tuple(layers)


def stage_block_configs(block_cfgs, num_stages: int, repeats: int = 1):
  """The `L` static `BlockConfig`s shared by every virtual stage.

  Raises:
    ValueError: S * R does not divide the layers, or the blocks of two
      virtual stages differ (naming them).
  """
  block_cfgs = tuple(block_cfgs)
  per_stage = _check_split(len(block_cfgs), num_stages, repeats)
  first = block_cfgs[:per_stage]
  for v in range(1, num_stages * repeats):
    blocks = block_cfgs[v * per_stage : (v + 1) * per_stage]
    if blocks != first:
      raise ValueError(
        f"pipeline stages must be structurally identical: virtual stage "
        f"{v} has blocks {blocks}, virtual stage 0 has {first}."
      )
  return first


def to_pipeline_params(params: dict, num_stages: int, repeats: int = 1):
  """`params` with `"layers"` replaced by `"stages"` (`stack_stages`)."""
  out = {k: v for k, v in params.items() if k != "layers"}
  out[STAGES_KEY] = stack_stages(params["layers"], num_stages, repeats)
  return out


def from_pipeline_params(params: dict) -> dict:
  """Inverse of `to_pipeline_params`."""
  out = {k: v for k, v in params.items() if k != STAGES_KEY}
  out["layers"] = unstack_stages(params[STAGES_KEY])
  return out


def own_ndim(path, leaf) -> int:
  """Rank of a param leaf at `path` (a `jax.tree_util` key path) without the
  `[repeats, stages]` axes `to_pipeline_params` adds under `"stages"`.

  Example:
    >>> stacked = to_pipeline_params({"layers": ({"s": jnp.ones(3)},) * 2}, 2)
    >>> jax.tree_util.tree_map_with_path(own_ndim, stacked)
    {'stages': ({'s': 1},)}
  """
  stacked = getattr(path[0], "key", None) == STAGES_KEY if path else False
  return np.ndim(leaf) - 2 * stacked


# ------------------------------------------------------------------- loss ---


def moe_layers(model_cfg) -> tuple[int, ...]:
  """Indices of the layers with an MoE / MH-MoE channel mixer."""
  return tuple(
    i
    for i, block in enumerate(models.block_configs(model_cfg))
    if not isinstance(block.ffn, layers.MLPConfig)
  )


def total_loss(ce_sum, num_targets, moe_stats, model_cfg, loss_cfg):
  """`models.lm_loss` of `moe_stats` stacked `[moe_layers, microbatches]`
  (None without MoE layers) in the order of `moe_layers`."""
  by_layer = {
    i: jax.tree.map(lambda x, row=row: x[row], moe_stats)
    for row, i in enumerate(moe_layers(model_cfg))
  }
  return models.lm_loss(ce_sum, num_targets, by_layer, model_cfg, loss_cfg)


# ----------------------------------------------------------------- stages ---


def _apply_stage(stage_params, h, block_cfgs):
  """One virtual stage on float32 params (cast to `h`'s compute dtype):
  `(h, tuple of models.MoEStats, one per MoE layer)`."""
  stage_params = models.cast_params(stage_params, h.dtype)
  h, auxes, _ = models.run_blocks(stage_params, h, block_cfgs)
  return h, tuple(
    models.MoEStats.from_aux(aux) for aux in auxes if aux is not None
  )


def _embed(rest, tokens, cfg):
  return models.embed(
    models.cast_params(rest, models.compute_dtype(cfg)), tokens, cfg
  )


def _head(rest, h, cfg):
  return models.head(
    models.cast_params(rest, models.compute_dtype(cfg)), h, cfg
  )


def _varying(tree):
  """`tree` with every leaf marked as varying over `pipe`."""
  return jax.tree.map(
    lambda a: (
      a
      if PIPE_AXIS in jax.typeof(a).manual_axis_type.varying
      else jax.lax.pcast(a, (PIPE_AXIS,), to="varying")
    ),
    tree,
  )


def _zeros_varying(tree):
  """Zeros like `tree`, marked as varying over `pipe` (scan carries)."""
  return jax.tree.map(
    lambda a: jax.lax.pcast(
      jnp.zeros(a.shape, a.dtype), (PIPE_AXIS,), to="varying"
    ),
    tree,
  )


def _rotate(x, num_stages, shift):
  """Sends `x` from stage s to stage (s + shift) mod S."""
  perm = [(i, (i + shift) % num_stages) for i in range(num_stages)]
  return jax.lax.ppermute(x, PIPE_AXIS, perm)


def split_microbatches(batch, num_microbatches: int):
  """`[batch, ...]` -> `[num_microbatches, batch / num_microbatches, ...]`.

  Microbatch `m` takes rows `m, m + k, m + 2k, ...`: with the batch sharded
  over devices in contiguous blocks, every microbatch keeps rows on every
  device.

  Raises:
    ValueError: `num_microbatches` does not divide the batch.
  """
  k = _checks.check_positive_int("num_microbatches", num_microbatches)

  def split(x):
    if x.shape[0] % k:
      raise ValueError(
        f"`num_microbatches` = {k} must divide the batch size {x.shape[0]}."
      )
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def _microbatch(batch, num_microbatches):
  """The `[B, T]` inputs, targets and mask -> `[M, B / M, T]`."""
  for name in ("inputs", "targets", "mask"):
    _checks.check_rank(f"batch[{name!r}]", batch[name], 2, "[batch, seq]")
  return split_microbatches(
    {name: batch[name] for name in ("inputs", "targets", "mask")},
    num_microbatches,
  )


class _Plan(NamedTuple):
  """Static description of one pipelined model."""

  model_cfg: Any
  block_cfgs: tuple
  table: schedules.TickTable
  mesh: Any


def _rest(params):
  return {k: v for k, v in params.items() if k != STAGES_KEY}


def _rest_for_stages(params, mesh):
  """The non-stage params as the pipeline's `shard_map` reads them.

  The embedding table enters whole (replicated over the automatic axes):
  XLA's SPMD partitioner aborts on a gather from a table sharded over
  automatic axes inside a `pipe`-manual region (seen with fsdp x tensor).
  """
  rest = _rest(params)
  rest["embed"] = jax.lax.with_sharding_constraint(
    rest["embed"], jax.sharding.NamedSharding(mesh, P())
  )
  return rest


def _by_tick(x_M, microbatch_T):
  """Static gather `x_M[microbatch_T]` (bubble ticks take microbatch 0)."""
  return x_M[np.maximum(microbatch_T, 0)]


# -------------------------------------------------- gpipe / circular (fwd) ---


def _forward_pipeline(plan: _Plan, params, tokens_MxBxT, *, want_outputs):
  """Forward pass of every microbatch through every virtual stage.

  One `lax.scan` over the `M * R + S - 1` ticks of `plan.table`, each tick
  under `jax.checkpoint` (its residual is the tick input only).

  Returns:
    `(outputs, stats)`: `outputs` `[M, B/M, T, D]` the last virtual stage's
    outputs (None unless `want_outputs`); `stats` a tuple over the MoE layers
    of a virtual stage of `models.MoEStats` with leading `[V, M]` (V = S * R).
  """
  table, mesh = plan.table, plan.mesh
  num_stages, repeats = table.num_stages, table.repeats
  tokens_T = _by_tick(tokens_MxBxT, table.fwd_microbatch[:, 0])
  h_shape, _ = _stage_shapes(plan, params, tokens_T[0])

  def per_device(stages, rest, tokens_T, fwd_mb, fwd_rep):
    s = jax.lax.axis_index(PIPE_AXIS)
    local = jax.tree.map(lambda a: a[:, 0], stages)  # [R, ...]

    def tick(h_recv, xs):
      tokens, mb_row, rep_row = xs
      valid = mb_row[s] >= 0
      rep = jnp.maximum(rep_row[s], 0)
      x_emb = _embed(rest, tokens, plan.model_cfg)
      h_in = jnp.where(
        (s == 0) & (rep == 0), x_emb.astype(h_recv.dtype), h_recv
      )
      stage_params = jax.tree.map(lambda a: a[rep], local)
      h_out, stats = _apply_stage(stage_params, h_in, plan.block_cfgs)
      stats = jax.tree.map(lambda x: jnp.where(valid, x, 0), stats)
      out = h_out if want_outputs else None
      return _rotate(h_out, num_stages, 1), (out, stats)

    h0 = _zeros_varying(h_shape)
    _, (outs, stats) = jax.lax.scan(
      jax.checkpoint(tick), h0, (tokens_T, fwd_mb, fwd_rep)
    )
    return jax.tree.map(lambda a: a[None], (outs, stats))

  fn = jax.shard_map(
    per_device,
    mesh=mesh,
    axis_names={PIPE_AXIS},
    in_specs=(P(None, PIPE_AXIS), P(), P(), P(), P()),
    out_specs=P(PIPE_AXIS),
  )
  outs, stats = fn(
    params[STAGES_KEY],
    _rest_for_stages(params, mesh),
    tokens_T,
    jnp.asarray(table.fwd_microbatch),
    jnp.asarray(table.fwd_repeat),
  )
  # Un-skew with the table: entry [v, m] = tick where stage v % S ran (v, m).
  num_virtual = num_stages * repeats
  stage_idx = np.zeros((num_virtual, table.num_microbatches), np.int32)
  tick_idx = np.zeros_like(stage_idx)
  ticks, stages_of = np.nonzero(table.fwd_microbatch >= 0)
  for t, s in zip(ticks, stages_of, strict=True):
    v = table.fwd_repeat[t, s] * num_stages + s
    stage_idx[v, table.fwd_microbatch[t, s]] = s
    tick_idx[v, table.fwd_microbatch[t, s]] = t
  stats = jax.tree.map(lambda a: a[stage_idx, tick_idx], stats)
  if not want_outputs:
    return None, stats
  last = num_stages - 1
  is_last = (table.fwd_microbatch[:, last] >= 0) & (
    table.fwd_repeat[:, last] == repeats - 1
  )
  out_ticks = np.nonzero(is_last)[0][
    np.argsort(table.fwd_microbatch[is_last, last])
  ]
  return outs[last, out_ticks], stats


def _flatten_stats(stats):
  """Tuple over stage positions of `[V, M, ...]` -> `[V * n, M, ...]` in
  layer order (virtual stage major), or None without MoE layers."""
  if not stats:
    return None
  return jax.tree.map(
    lambda *xs: jnp.stack(xs, axis=1).reshape((-1,) + xs[0].shape[1:]), *stats
  )


def _gpipe_loss(plan: _Plan, loss_cfg, params, batch):
  mbs = _microbatch(batch, plan.table.num_microbatches)
  outputs, stats = _forward_pipeline(
    plan, params, mbs["inputs"], want_outputs=True
  )

  @jax.checkpoint
  def head_ce(_, xs):
    h, targets, mask = xs
    logits = _head(_rest(params), h, plan.model_cfg)
    return None, models.masked_ce_sum(logits, targets, mask)

  _, ce_sums = jax.lax.scan(
    head_ce, None, (outputs, mbs["targets"], mbs["mask"])
  )
  return total_loss(
    jnp.sum(ce_sums),
    jnp.sum(batch["mask"]),
    _flatten_stats(stats),
    plan.model_cfg,
    loss_cfg,
  )


# ------------------------------------------------------------ SPMD 1F1B ---


def _stage_shapes(plan: _Plan, params, tokens_BxT):
  """Shapes of a stage's input activation and of its `models.MoEStats` tuple."""
  h = jax.eval_shape(_embed, _rest(params), tokens_BxT, plan.model_cfg)
  stage = jax.tree.map(lambda a: a[0, 0], params[STAGES_KEY])
  stats = jax.eval_shape(
    lambda p, x: _apply_stage(p, x, plan.block_cfgs)[1], stage, h
  )
  return h, stats


def _stat_cotangents(plan: _Plan, loss_cfg, params, tokens_MxBxT):
  """d loss / d `models.MoEStats` of every (MoE layer, microbatch).

  `jax.grad` of `total_loss`, the loss the other schedules differentiate, so
  no formula of the gradient is written twice. The loss is linear in every
  statistic except through the global LBL's `f` (counts, no gradient): the
  gradient is taken at the statistics of a forward-only counting pass when
  the global LBL is on, and at ones (any value) otherwise.

  Returns:
    A tuple over the MoE positions of a stage of `models.MoEStats` with
    leading `[S, M]` (stage, microbatch).
  """
  num_stages, num_mb = plan.table.num_stages, plan.table.num_microbatches
  cfg = plan.model_cfg
  _, shapes = _stage_shapes(plan, params, tokens_MxBxT[0])
  if not shapes:
    return ()
  if cfg.lbl_scope == "global" and loss_cfg.lbl_coef != 0:
    _, counted = _forward_pipeline(
      plan, jax.lax.stop_gradient(params), tokens_MxBxT, want_outputs=False
    )
  else:
    counted = jax.tree.map(
      lambda a: jnp.ones((num_stages, num_mb) + a.shape, a.dtype), shapes
    )
  grads = jax.grad(lambda st: total_loss(0.0, 1.0, st, cfg, loss_cfg)[0])(
    _flatten_stats(counted)
  )
  # [S * n, M, ...] in layer order -> per stage position [S, M, ...].
  n = len(shapes)
  return tuple(
    jax.tree.map(
      lambda g, i=i: g.reshape((num_stages, n) + g.shape[1:])[:, i], grads
    )
    for i in range(n)
  )


def _one_f_one_b(plan: _Plan, loss_cfg, params, batch):
  """Loss, metrics and gradients by the SPMD 1F1B schedule.

  Each steady tick runs one forward and one backward on every stage (masked
  where the table has -1): the forward saves its stage input in a ring of
  `2 S - 1` slots; the backward recomputes the stage from the saved input
  under `jax.vjp`. The last stage runs head + loss + their vjp for the
  microbatch whose forward it just finished, so its cotangent starts at
  once. Warm-up / cool-down ticks are separate scans without the idle half.
  """
  table, mesh, cfg = plan.table, plan.mesh, plan.model_cfg
  num_stages, num_mb = table.num_stages, table.num_microbatches
  slots = 2 * num_stages - 1
  mbs = _microbatch(batch, num_mb)
  num_targets = jnp.sum(batch["mask"])
  stat_cts = _stat_cotangents(plan, loss_cfg, params, mbs["inputs"])

  tick_xs = (
    _by_tick(mbs["inputs"], table.fwd_microbatch[:, 0]),
    _by_tick(mbs["inputs"], table.bwd_microbatch[:, 0]),
    _by_tick(mbs["targets"], table.bwd_microbatch[:, -1]),
    _by_tick(mbs["mask"], table.bwd_microbatch[:, -1]),
    jnp.asarray(table.fwd_microbatch),
    jnp.asarray(table.bwd_microbatch),
  )
  h_shape, stats_shape = _stage_shapes(plan, params, tick_xs[0][0])

  def per_device(stages, rest, stat_cts, tick_xs):
    s = jax.lax.axis_index(PIPE_AXIS)
    is_first, is_last = s == 0, s == num_stages - 1
    # Varying copies: their vjps then give per-device (unsummed) cotangents.
    rest = jax.lax.pcast(rest, (PIPE_AXIS,), to="varying")
    stage_params = jax.tree.map(lambda a: a[0, 0], stages)
    stat_cts = jax.tree.map(lambda c: c[0], stat_cts)  # [M, ...]
    # Constant outputs (token counts) marked varying like their cotangents.
    stage_fn = lambda p, h: _varying(_apply_stage(p, h, plan.block_cfgs))

    def head_ce(p, h, targets, mask):
      return models.masked_ce_sum(_head(p, h, cfg), targets, mask) / num_targets

    def forward(carry, tokens, fwd_row):
      h_recv, ring, stats_acc = carry
      m = fwd_row[s]
      valid = m >= 0
      h_in = jnp.where(is_first, _embed(rest, tokens, cfg), h_recv)
      slot = jnp.maximum(m, 0) % slots
      ring = jax.lax.dynamic_update_index_in_dim(
        ring, jnp.where(valid, h_in, ring[slot]), slot, 0
      )
      h_out, stats = stage_fn(stage_params, h_in)
      stats_acc = jax.tree.map(
        lambda acc, x: acc + jnp.where(valid, x, 0), stats_acc, stats
      )
      return h_out, ring, stats_acc

    def backward(carry, h_last, tokens, targets, mask, bwd_row):
      g_recv, ring, d_stage, d_rest, ce = carry
      m = bwd_row[s]
      valid = m >= 0
      if h_last is not None:  # the last stage: head + loss of its output
        ce_m, head_vjp = jax.vjp(
          lambda p, h: head_ce(p, h, targets, mask), rest, h_last
        )
        head_ct = jnp.where(is_last & valid, 1.0, 0.0).astype(ce_m.dtype)
        d_rest_head, g_head = head_vjp(head_ct)
        ce = ce + head_ct * ce_m
        d_rest = jax.tree.map(jnp.add, d_rest, d_rest_head)
        g_recv = jnp.where(is_last, g_head.astype(g_recv.dtype), g_recv)
      h_saved = ring[jnp.maximum(m, 0) % slots]
      _, stage_vjp = jax.vjp(stage_fn, stage_params, h_saved)
      masked = lambda x: jnp.where(valid, x, jnp.zeros_like(x))
      stat_ct = jax.tree.map(lambda c: c[jnp.maximum(m, 0)], stat_cts)
      d_params, d_h = stage_vjp((masked(g_recv), jax.tree.map(masked, stat_ct)))
      d_stage = jax.tree.map(jnp.add, d_stage, d_params)
      _, embed_vjp = jax.vjp(lambda p: _embed(p, tokens, cfg), rest)
      (d_embed,) = embed_vjp(jnp.where(is_first & valid, d_h, 0))
      d_rest = jax.tree.map(jnp.add, d_rest, d_embed)
      return d_h, ring, d_stage, d_rest, ce

    def tick(carry, xs, *, do_fwd, do_bwd):
      h_recv, g_recv, ring, d_stage, d_rest, ce, stats_acc = carry
      tokens_f, tokens_b, targets, mask, fwd_row, bwd_row = xs
      h_out = None
      if do_fwd:
        h_out, ring, stats_acc = forward(
          (h_recv, ring, stats_acc), tokens_f, fwd_row
        )
      if do_bwd:
        d_h, ring, d_stage, d_rest, ce = backward(
          (g_recv, ring, d_stage, d_rest, ce),
          h_out,
          tokens_b,
          targets,
          mask,
          bwd_row,
        )
        g_recv = _rotate(d_h, num_stages, -1)
      if do_fwd:
        h_recv = _rotate(h_out, num_stages, 1)
      return (h_recv, g_recv, ring, d_stage, d_rest, ce, stats_acc), None

    carry = _zeros_varying(
      (
        h_shape,
        h_shape,
        jax.ShapeDtypeStruct((slots,) + h_shape.shape, h_shape.dtype),
        stage_params,
        rest,
        jax.ShapeDtypeStruct((), jnp.float32),
        stats_shape,
      )
    )
    warm, steady = num_stages - 1, num_mb
    phases = (
      (0, warm, True, False),
      (warm, warm + steady, True, True),
      (warm + steady, table.num_ticks, False, True),
    )
    for start, stop, do_fwd, do_bwd in phases:
      if stop > start:
        body = functools.partial(tick, do_fwd=do_fwd, do_bwd=do_bwd)
        phase = slice(start, stop)
        carry, _ = jax.lax.scan(
          body, carry, jax.tree.map(lambda a, p=phase: a[p], tick_xs)
        )
    _, _, _, d_stage, d_rest, ce, stats_acc = carry
    d_rest, ce = jax.lax.psum((d_rest, ce), PIPE_AXIS)
    d_stage = jax.tree.map(lambda a: a[None, None], d_stage)
    return d_stage, d_rest, ce, jax.tree.map(lambda a: a[None], stats_acc)

  fn = jax.shard_map(
    per_device,
    mesh=mesh,
    axis_names={PIPE_AXIS},
    in_specs=(P(None, PIPE_AXIS), P(), P(PIPE_AXIS), P()),
    out_specs=(P(None, PIPE_AXIS), P(), P(), P(PIPE_AXIS)),
  )
  d_stages, d_rest, ce, stats = fn(
    params[STAGES_KEY], _rest_for_stages(params, mesh), stat_cts, tick_xs
  )
  # Sums over microbatches [S, ...] -> one "microbatch" of sums / means.
  stats = _flatten_stats(
    tuple(jax.tree.map(lambda a: a[:, None], st) for st in stats)
  )
  if stats is not None:
    stats = stats._replace(
      lbl=stats.lbl / num_mb, z=stats.z / num_mb, dropped=stats.dropped / num_mb
    )
  loss, metrics = total_loss(
    ce * num_targets, num_targets, stats, cfg, loss_cfg
  )
  grads = dict(d_rest)
  grads[STAGES_KEY] = d_stages
  return (loss, metrics), grads


# ----------------------------------------------------------------- public ---


def pipeline_grad_fn(
  model_cfg,
  loss_cfg,
  mesh,
  *,
  schedule: str = "gpipe",
  num_microbatches: int,
  repeats: int = 1,
):
  """A pipelined `grad_fn(params, batch, rng) -> ((loss, metrics), grads)`.

  Same contract as `jax.value_and_grad(training.loss_fn, has_aux=True)` of
  the unpipelined loss, with params in the pipeline layout
  (`to_pipeline_params`: `params["stages"]`, stage axis 1 sharded over
  `pipe`) and grads in the same layout.

  Args:
    model_cfg: the `models.ModelConfig`; its blocks must repeat every
      virtual stage (`stage_block_configs`).
    loss_cfg: the `models.LossConfig` (also `training.LossConfig`).
    mesh: a `jax.sharding.Mesh` with a `pipe` axis (S = its size); other
      axes (data, fsdp, tensor, expert) are left to automatic sharding.
    schedule: "gpipe", "circular" or "1f1b".
    num_microbatches: M; must divide the batch (and be a multiple of S for
      circular).
    repeats: R (>= 2 for circular, 1 otherwise).

  Returns:
    `grad_fn(params, batch, rng)`; `rng` is unused (deterministic model).

  Raises:
    ValueError: no `pipe` axis, bad schedule / M / R, or stages that are
      not identical.

  Example:
    >>> grad_fn = pipeline_grad_fn(cfg, loss_cfg, mesh, schedule="1f1b",
    ...                            num_microbatches=8)
    >>> (loss, metrics), grads = jax.jit(grad_fn)(params, batch, rng)
  """
  if PIPE_AXIS not in mesh.axis_names:
    raise ValueError(
      f"`mesh` must have a {PIPE_AXIS!r} axis, got axes {mesh.axis_names}."
    )
  num_stages = mesh.shape[PIPE_AXIS]
  table = schedules.tick_table(schedule, num_stages, num_microbatches, repeats)
  block_cfgs = stage_block_configs(
    models.block_configs(model_cfg), num_stages, repeats
  )
  plan = _Plan(model_cfg, block_cfgs, table, mesh)
  if schedule == "1f1b":
    impl = functools.partial(_one_f_one_b, plan, loss_cfg)
  else:
    impl = jax.value_and_grad(
      functools.partial(_gpipe_loss, plan, loss_cfg), has_aux=True
    )

  def grad_fn(params, batch, rng):
    del rng
    return impl(params, batch)

  return grad_fn
