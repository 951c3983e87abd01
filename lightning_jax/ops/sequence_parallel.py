"""Sequence parallelism for linear recurrences: one all-gather of state maps.

Each device of a `seq` mesh axis holds a contiguous chunk of the sequence.
Every recurrence here is affine in its state, so a device's chunk acts on the
state entering it as an affine map

    linear attention / GLA:   S_out = diag(d) S_in + S_loc,   d = exp(sum_t g_t)
    (gated) delta rule:       S_out = M S_in + S_loc,
                              M = prod_t a_t (I - beta_t k_t k_t^T)

and its outputs are affine in S_in too: `o_t = o_loc_t + scale * (M_t^T q_t)^T
S_in`, with `M_t` the map of the chunk's first t tokens (for GLA, `M_t^T q_t =
q_t * exp(cum g)_t`). Each device runs the single-device chunked op on its
chunk from a zero state, giving `o_loc` and its summary `(d or M, S_loc)`;
ONE `all_gather` of the P summaries (`[Dk, Dv + 1]` or `[Dk, Dv + Dk]` floats
per head, independent of the sequence length) lets every device compose the
maps of the devices before it into its incoming state S_in, and it adds the
correction locally. LASP (Sun et al., 2024, arXiv 2404.02882) instead passes
the state around a ring, P dependent steps. See docs/parallel.md.

For the delta rule, `M` and `M_t^T q_t` come from the same chunked call (WY/UT
form, no per-token loop): the state's value columns evolve independently, so
running the op with values `[v, 0]` and initial state `[0, I]` returns outputs
`[o_loc, scale * M_t^T q_t]` and final state `[S_loc, M]` (Dv + Dk value
columns instead of Dv). Gradients come from autodiff through `shard_map`.

The `sp_*` functions run INSIDE `jax.shard_map` on local chunks;
`parallel.sequence_parallel(sp_fn, mesh)` wraps one for global arrays, and
the model's layers call them through `sequence_axis` / `map_sequence` when
the traced mesh has a `seq` axis.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lightning_jax import _checks
from lightning_jax.ops import _recurrence as rec
from lightning_jax.ops.delta_rule import delta_rule
from lightning_jax.ops.linear_attention import gated_linear_attention
from lightning_jax.ops.linear_attention import linear_attention

P = jax.sharding.PartitionSpec
SEQ = "seq"  # the mesh axis that splits sequences (`parallel.mesh.SEQ`)


def sp_linear_attention(
  q,
  k,
  v,
  log_decay=None,
  *,
  axis_name: str,
  scale=None,
  initial_state=None,
  output_final_state=False,
  chunk_size=64,
):
  """`ops.linear_attention` on a sequence split over mesh axis `axis_name`.

  Call inside `jax.shard_map`; device i of the axis holds tokens
  `[i * T_local, (i + 1) * T_local)`.

  Args:
    q: local chunk `[batch, seq_local, heads, key_dim]`.
    k: `[batch, seq_local, heads, key_dim]`.
    v: `[batch, seq_local, heads, value_dim]`.
    log_decay: None, `[heads]` or local `[batch, seq_local, heads]`, <= 0.
    axis_name: the sequence mesh axis.
    scale: multiplies q; default `key_dim ** -0.5`.
    initial_state: state before the WHOLE sequence, `[batch, heads, key_dim,
      value_dim]` (the same on every device of the axis), or None.
    output_final_state: also return the state after the whole sequence
      (the same on every device).
    chunk_size: chunk of the local chunked kernel.

  Returns:
    Local `o: [batch, seq_local, heads, value_dim]` (and the final state).
  """
  b, t, h, _, _ = rec.check_qkv(q, k, v)
  g = rec.scalar_log_decay(log_decay, b, t, h)[..., None]
  return _sp_gated(
    linear_attention,
    q,
    k,
    v,
    log_decay,
    g,
    axis_name,
    scale,
    initial_state,
    output_final_state,
    chunk_size,
  )


def sp_gated_linear_attention(
  q,
  k,
  v,
  log_forget,
  *,
  axis_name: str,
  scale=None,
  initial_state=None,
  output_final_state=False,
  chunk_size=64,
):
  """`ops.gated_linear_attention` (GLA / HGRN2) split over `axis_name`.

  Args:
    q, k, v: local chunks as in `sp_linear_attention`.
    log_forget: local `[batch, seq_local, heads, key_dim]`, <= 0.
    axis_name, scale, initial_state, output_final_state, chunk_size: as in
      `sp_linear_attention`.

  Returns:
    Local `o` (and the final state of the whole sequence).
  """
  rec.check_qkv(q, k, v)
  _checks.check_shape(
    "log_forget", log_forget, q.shape, "[batch, seq_local, heads, key_dim]"
  )
  g = rec.floor_log_decay(log_forget)
  return _sp_gated(
    gated_linear_attention,
    q,
    k,
    v,
    log_forget,
    g,
    axis_name,
    scale,
    initial_state,
    output_final_state,
    chunk_size,
  )


def _sp_gated(
  op,
  q,
  k,
  v,
  gate,
  g,
  axis_name,
  scale,
  initial_state,
  output_final_state,
  chunk_size,
):
  """Shared by the two linear attentions; `g: [B, T, H, Dg]`, Dg in {1, Dk}."""
  b, _, h, dk, dv = rec.check_qkv(q, k, v)
  s0 = rec.check_state(initial_state, b, h, dk, dv)
  scale = rec.default_scale(scale, dk)
  f32 = lambda x: x.astype(jnp.float32)
  o_loc, s_loc = op(
    f32(q),
    f32(k),
    f32(v),
    gate,
    scale=scale,
    output_final_state=True,
    chunk_size=chunk_size,
  )
  cum = jnp.cumsum(g, axis=1)  # [B, T, H, Dg], local
  log_d = jnp.broadcast_to(cum[:, -1], (b, h, dk))  # chunk's total log decay
  # One gather of [B, H, Dk, Dv + 1] per device.
  summary = jnp.concatenate([s_loc, log_d[..., None]], -1)
  gathered = jax.lax.all_gather(
    summary, axis_name, axis=2
  )  # [B, H, P, Dk, Dv+1]
  log_d_all = gathered[..., :, -1]  # [B, H, P, Dk]
  if g.shape[-1] == 1:
    log_d_all = log_d_all[..., :1]
  final, starts = rec.chunk_states(log_d_all, gathered[..., :-1], s0)
  s_in = jnp.take(starts, jax.lax.axis_index(axis_name), axis=2)
  q_decayed = f32(q) * scale * jnp.exp(cum)  # (M_t^T q_t) scale
  o = o_loc + jnp.einsum("bthk,bhkv->bthv", q_decayed, s_in)
  return rec.finish(o, final, q.dtype, output_final_state)


def sp_delta_rule(
  q,
  k,
  v,
  beta,
  log_decay=None,
  *,
  axis_name: str,
  scale=None,
  initial_state=None,
  output_final_state=False,
  chunk_size=64,
):
  """`ops.delta_rule` (DeltaNet / Gated DeltaNet) split over `axis_name`.

  Args:
    q, k, v: local chunks as in `sp_linear_attention`.
    beta: local `[batch, seq_local, heads]`.
    log_decay: None, `[heads]` or local `[batch, seq_local, heads]`, <= 0.
    axis_name, scale, initial_state, output_final_state, chunk_size: as in
      `sp_linear_attention`.

  Returns:
    Local `o` (and the final state of the whole sequence).
  """
  b, t, h, dk, dv = rec.check_qkv(q, k, v)
  _checks.check_shape("beta", beta, (b, t, h), "[batch, seq_local, heads]")
  s0 = rec.check_state(initial_state, b, h, dk, dv)
  scale = rec.default_scale(scale, dk)
  f32 = lambda x: x.astype(jnp.float32)
  # Value columns [v | 0] from state [0 | I]: outputs [o_loc | scale M_t^T q_t],
  # final state [S_loc | M].
  v_aug = jnp.concatenate([f32(v), jnp.zeros((b, t, h, dk), jnp.float32)], -1)
  eye = jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), (b, h, dk, dk))
  s_aug0 = jnp.concatenate([jnp.zeros((b, h, dk, dv), jnp.float32), eye], -1)
  o_aug, summary = delta_rule(
    f32(q),
    f32(k),
    v_aug,
    beta,
    log_decay,
    scale=scale,
    initial_state=s_aug0,
    output_final_state=True,
    chunk_size=chunk_size,
  )
  gathered = jax.lax.all_gather(summary, axis_name)  # [P, B, H, Dk, Dv + Dk]
  starts, final = _compose_affine(gathered[..., dv:], gathered[..., :dv], s0)
  s_in = jnp.take(starts, jax.lax.axis_index(axis_name), axis=0)
  o = o_aug[..., :dv] + jnp.einsum("bthk,bhkv->bthv", o_aug[..., dv:], s_in)
  return rec.finish(o, final, q.dtype, output_final_state)


def _compose_affine(maps, offsets, s0):
  """States entering each of P segments of `S <- M_p S + S_p`.

  Args:
    maps: `[P, B, H, Dk, Dk]` transitions M_p.
    offsets: `[P, B, H, Dk, Dv]` zero-state results S_p.
    s0: `[B, H, Dk, Dv]` the state before segment 0.

  Returns:
    (`[P, B, H, Dk, Dv]` states entering each segment, final state).
  """

  def step(s, segment):
    m, off = segment
    return m @ s + off, s

  final, starts = rec.scan(step, s0, (maps, offsets))
  return starts, final


SEQUENCE_PARALLEL = {
  linear_attention: sp_linear_attention,
  gated_linear_attention: sp_gated_linear_attention,
  delta_rule: sp_delta_rule,
}  # each op -> its twin on a sequence split over a mesh axis


def sequence_axis(seq_len: int) -> str | None:
  """The mesh axis that splits a training forward's sequence, or None.

  `SEQ` when the mesh being traced (`jax.set_mesh`, or the abstract mesh
  that `parallel.shard_step` traces the step under) has a `seq` axis of
  more than one device that is not already manual (a pipeline stage's
  `shard_map` is manual over `pipe` only, so its layers split too); None
  otherwise.

  Args:
    seq_len: the global sequence length of the forward.

  Raises:
    ValueError: naming `seq_len` if the axis does not divide it.
  """
  mesh = jax.sharding.get_abstract_mesh()
  size = dict(mesh.shape).get(SEQ, 1)
  if size == 1 or SEQ in mesh.manual_axes:
    return None
  if seq_len % size:
    raise ValueError(
      f"`seq_len` {seq_len} must be divisible by the mesh's {SEQ!r} axis "
      f"size {size}."
    )
  return SEQ


def map_sequence(fn: Callable, params, x_BxTxD, axis_name: str):
  """`fn(params, x_local) -> y_local` on each device's chunk of the sequence.

  A `jax.shard_map` manual over `axis_name` only: the params are whole
  along it, and the other mesh axes (data, fsdp, tensor) stay automatic.

  Args:
    fn: a layer on one chunk; it may use collectives over `axis_name`.
    params: the layer's params (a pytree).
    x_BxTxD: the global `[batch, seq, d_model]` input.
    axis_name: the sequence axis (`sequence_axis`).

  Returns:
    The global `[batch, seq, ...]` output.
  """
  if jax.sharding.get_abstract_mesh().manual_axes:
    # Nested in another shard_map (a pipeline stage), jax 0.10's vjp of this
    # one saves residuals whose local shapes fail MLIR verification;
    # rematerialised, the chunk's only residuals are its inputs.
    fn = jax.checkpoint(fn)
  return jax.shard_map(
    fn,
    in_specs=(P(), P(None, axis_name)),
    out_specs=P(None, axis_name),
    axis_names={axis_name},
  )(params, x_BxTxD)


def previous_tokens(x_BxLx, count: int, axis_name: str):
  """The `count` tokens before this device's chunk (a short conv's or a
  window's halo); zeros before the sequence, as before a fresh one.

  Args:
    x_BxLx: this device's chunk `[batch, seq_local, ...]`.
    count: tokens to fetch, >= 0; more than `seq_local` reach several
      devices back.
    axis_name: the sequence axis.

  Returns:
    `[batch, count, ...]`: one `ppermute` from device i - j to i for each
    of the `ceil(count / seq_local)` devices j = 1, 2, ... it reaches (the
    farthest sends only the tokens needed).
  """
  local, size = x_BxLx.shape[1], jax.lax.axis_size(axis_name)
  parts = []
  for j in range(-(-count // local), 0, -1):  # farthest device first
    take = min(local, count - (j - 1) * local)
    part = x_BxLx[:, local - take :]
    pairs = [(i, i + j) for i in range(size - j)]
    parts.append(
      jax.lax.ppermute(part, axis_name, pairs)
      if pairs
      else jnp.zeros_like(part)
    )
  if not parts:
    return x_BxLx[:, :0]
  return jnp.concatenate(parts, axis=1)
