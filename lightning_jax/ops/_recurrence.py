"""Plumbing shared by the linear-recurrence kernels: checks, chunking, output.

Internal layout of the chunked kernels is `[batch, heads, chunks, chunk, dim]`
(`BxHxNxCxD`): the heads and chunks become batch dimensions of every matmul.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks

# The chunked kernels run over groups of this many chunks, carrying the state
# (`scan_groups`): time per token then stays flat in the sequence length.
GROUP_CHUNKS = 8
# Log decays are raised to at least this: exp(LOG_ZERO) is exactly 0 in fp32,
# like exp(-inf) (decay 0, the state is reset), but differences of cumulated
# log decays stay finite (-inf - -inf is NaN) and their rounding small.
LOG_ZERO = -128.0


def check_qkv(q, k, v) -> tuple[int, int, int, int, int]:
  """Checks `q, k: [B, T, H, Dk]`, `v: [B, T, H, Dv]`; returns the sizes."""
  _checks.check_rank("q", q, 4, "[batch, seq, heads, key_dim]")
  _checks.check_rank("k", k, 4, "[batch, seq, heads, key_dim]")
  _checks.check_rank("v", v, 4, "[batch, seq, heads, value_dim]")
  b, t, h, dk = q.shape
  _checks.check_shape("k", k, q.shape, "[batch, seq, heads, key_dim]")
  _checks.check_shape(
    "v", v, (b, t, h, v.shape[-1]), "[batch, seq, heads, value_dim]"
  )
  return b, t, h, dk, v.shape[-1]


def check_state(initial_state, b, h, dk, dv):
  """Checks `initial_state: [B, H, Dk, Dv]` (or None); returns it in fp32."""
  if initial_state is None:
    return jnp.zeros((b, h, dk, dv), jnp.float32)
  _checks.check_shape(
    "initial_state",
    initial_state,
    (b, h, dk, dv),
    "[batch, heads, key_dim, value_dim]",
  )
  return jnp.asarray(initial_state, jnp.float32)


def check_nonpositive(name: str, x) -> None:
  """Raises ValueError if a concrete `x` has a positive or NaN entry.

  Traced values (inside `jit`) cannot be inspected and pass unchecked.
  """
  values = _checks.concrete(x)
  if values is None:
    return
  bad = np.isnan(values) | (values > 0)
  if bad.any():
    raise ValueError(
      f"`{name}` must be <= 0 (a log decay): {int(bad.sum())} "
      f"of {values.size} entries are positive or NaN, e.g. "
      f"{values[bad][0]}."
    )


def scalar_log_decay(log_decay, b, t, h):
  """None / `[H]` / `[B, T, H]` -> `[B, T, H]` fp32."""
  if log_decay is None:
    return jnp.zeros((b, t, h), jnp.float32)
  if np.ndim(log_decay) == 1:
    _checks.check_shape("log_decay", log_decay, (h,), "[heads]")
  else:
    _checks.check_shape(
      "log_decay", log_decay, (b, t, h), "[batch, seq, heads] (or [heads])"
    )
  check_nonpositive("log_decay", log_decay)
  return jnp.broadcast_to(floor_log_decay(log_decay), (b, t, h))


def floor_log_decay(g):
  """`g` in fp32, raised to at least `LOG_ZERO` (-inf included).

  Exact in fp32: exp of either value is 0, and so is the gradient w.r.t. g.
  """
  return jnp.maximum(jnp.asarray(g, jnp.float32), LOG_ZERO)


def drop_nonfinite(k, v, *per_token):
  """Zeroes non-finite inputs; says where the recurrence would turn NaN.

  In the chunked and quadratic forms a masked (zero) weight times a NaN is
  NaN, so a NaN or inf at position t would reach every output of its chunk
  (or sequence), earlier ones included. These forms run on the zeroed
  inputs, then `poison` puts back the NaNs of the recurrence: from t on,
  every value column for a bad entry of k or of `per_token`, column c for a
  bad `v[..., c]`.

  Args:
    k: `[B, T, H, Dk]`.
    v: `[B, T, H, Dv]`.
    *per_token: `[B, T, H, ...]` inputs whose every entry feeds every value
      column (gates, writing strengths).

  Returns:
    `(k, v, *per_token)` with non-finite entries zeroed, then `first_bad:
    [B, H, Dv]` int32, the first position each column turns NaN (T: never).
  """
  b, t, h, dv = v.shape
  finite = lambda x: jnp.isfinite(x).reshape(b, t, h, -1).all(-1)
  row_ok = functools.reduce(jnp.logical_and, map(finite, (k, *per_token)))
  ok = row_ok[..., None] & jnp.isfinite(v)  # [B, T, H, Dv]
  position = jnp.arange(t)[None, :, None, None]
  first_bad = jnp.min(jnp.where(ok, t, position), axis=1)
  clean = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)
  return (*map(clean, (k, v, *per_token)), first_bad)


def poison(o, state, first_bad):
  """NaN into `o: [B, T, H, Dv]` and `state: [B, H, Dk, Dv]` per `first_bad`.

  `first_bad: [B, H, Dv]` from `drop_nonfinite`.
  """
  t = o.shape[1]
  position = jnp.arange(t)[None, :, None, None]
  o = jnp.where(position >= first_bad[:, None], jnp.nan, o)
  return o, jnp.where(first_bad[:, :, None] < t, jnp.nan, state)


def default_scale(scale, dk: int) -> float:
  return dk**-0.5 if scale is None else scale


def to_chunks(x, chunk: int):
  """`[B, T, H, ...]` -> `[B, H, N, C, ...]`, zero-padding T up to N * C."""
  b, t, h = x.shape[:3]
  n = -(-t // chunk)
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, n * chunk - t)
  x = jnp.pad(x, pad)
  x = x.reshape(b, n, chunk, h, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def from_chunks(x, t: int):
  """`[B, H, N, C, D]` -> `[B, T, H, D]`, dropping padding."""
  b, h, n, c, d = x.shape
  return jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, d)[:, :t]


def finish(o, state, dtype, output_final_state: bool):
  """Casts `o` to the input dtype; appends the fp32 final state if asked."""
  o = o.astype(dtype)
  return (o, state) if output_final_state else o


def causal_mask(c: int, strict: bool = False):
  """`[C, C]` bool: row i sees column j iff j <= i (j < i if strict)."""
  return jnp.tril(jnp.ones((c, c), bool), -1 if strict else 0)


def chunk_states(log_decay_BxHxNxDg, increments_BxHxNxDkxDv, state_BxHxDkxDv):
  """States at every chunk start of S_n = diag(a_n) S_{n-1} + U_n, no scan.

  With c_n the cumulated log of a over chunks, the recurrence unrolls to
  `S_start[n] = sum_{m<n} exp(c_{n-1} - c_m) U_m + exp(c_{n-1}) S_0`: one
  small batched matmul over chunks, every exponent <= 0. (A `lax.scan` of N
  tiny elementwise steps was the slowest part of the forward pass on CPU.)

  Args:
    log_decay_BxHxNxDg: log a_n, each chunk's total log decay (Dg is 1 or Dk).
    increments_BxHxNxDkxDv: U_n, each chunk's own decayed `k v^T` sum.
    state_BxHxDkxDv: the state before the first chunk.

  Returns:
    (final state `[B, H, Dk, Dv]`, states at chunk starts `[B, H, N, Dk, Dv]`).
  """
  cum = jnp.cumsum(log_decay_BxHxNxDg, axis=2)
  n = cum.shape[2]
  before = jnp.concatenate([jnp.zeros_like(cum[:, :, :1]), cum[:, :, :-1]], 2)
  exponent = before[:, :, :, None] - cum[:, :, None]  # [B, H, N_n, N_m, Dg]
  weights = jnp.exp(
    jnp.where(causal_mask(n, strict=True)[..., None], exponent, -jnp.inf)
  )
  if weights.shape[-1] == 1:
    starts = jnp.einsum(
      "bhnm,bhmdv->bhndv", weights[..., 0], increments_BxHxNxDkxDv
    )
  else:
    starts = jnp.einsum("bhnmd,bhmdv->bhndv", weights, increments_BxHxNxDkxDv)
  starts = starts + jnp.exp(before)[..., None] * state_BxHxDkxDv[:, :, None]
  tail = jnp.exp(cum[:, :, -1:] - cum)  # [B, H, N, Dg]
  final = jnp.exp(cum[:, :, -1])[..., None] * state_BxHxDkxDv + jnp.einsum(
    "bhmd,bhmdv->bhdv", tail, increments_BxHxNxDkxDv
  )
  return final, starts


def scan(step, carry, xs, reverse=False):
  """`jax.lax.scan` whose initial carry varies like its inputs.

  Inside `jax.shard_map` (e.g. the pipeline's manual `pipe` axis), a carry
  built from constants (a zero state) is invariant over the manual axes while
  the step's output, computed from varying inputs, varies, and `lax.scan`
  rejects the mismatch. Every leaf of `carry` is therefore marked varying
  (`jax.lax.pcast`) over the union of the manual axes of `carry` and `xs`;
  outside `shard_map` this is the identity.

  Args:
    step: `step(carry, x) -> (carry, y)`, reading only `carry` and `x`.
    carry: the initial carry, a pytree.
    xs: the scanned pytree, leading axis the steps.
    reverse: scan from the last step to the first.

  Returns:
    `(final carry, stacked ys)` as `jax.lax.scan`.
  """
  varying = lambda a: jax.typeof(a).manual_axis_type.varying
  axes = frozenset().union(*map(varying, jax.tree.leaves((carry, xs))))

  def to_varying(a):
    missing = tuple(sorted(axes - varying(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a

  return jax.lax.scan(
    step, jax.tree.map(to_varying, carry), xs, reverse=reverse
  )


def cotangent_like(ct, primal):
  """`ct` summed over the manual axes it varies over and `primal` does not.

  Inside `jax.shard_map`, an input invariant over a manual axis (a zero
  state, a replicated weight) is broadcast to varying where it meets
  varying values; autodiff transposes that broadcast into a `psum`, and a
  hand-written backward must do the same to return a cotangent of the
  input's type. Outside `shard_map` this is the identity.
  """
  varying = lambda a: jax.typeof(a).manual_axis_type.varying
  extra = tuple(sorted(varying(ct) - varying(primal)))
  return jax.lax.psum(ct, extra) if extra else ct


def drop_unit_axes(x, keep: int = 1):
  """`x` without the size-1 axes before its last `keep` axes
  (`[1, T, D]` -> `[T, D]`; `[B, 1, n, C, D]` -> `[B, n, C, D]` for keep 3).

  Two XLA:CPU 0.10 problems it avoids: reductions over a leading size-1
  axis (one long sequence) run several times slower than over a batch, e.g.
  a norm scale's gradient summed over `[1, T]`; and compiling GLA's
  sub-block backward with a size-1 head axis between batch axes
  (`[8, 1, n, C, D]`, one head) crashed the compiler (segmentation fault).
  Only size-1 axes are dropped: merging axes sharded over different mesh
  axes (batch over data, heads over tensor, sequence over seq) would make
  XLA gather them.
  """
  return jnp.squeeze(
    x, tuple(i for i in range(x.ndim - keep) if x.shape[i] == 1)
  )


def to_groups(inputs, group_len: int):
  """`[B, T, ...]` arrays -> `[n, B, group_len, ...]`, zero-padded.

  One group of the whole sequence (no padding) when T <= group_len.
  """
  t = inputs[0].shape[1]
  group_len = min(group_len, t)
  n = -(-t // group_len)

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, n * group_len - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, group_len, *x.shape[2:]), 1, 0)

  return tuple(map(split, inputs))


def from_groups(x, t: int):
  """`[n, B, group_len, ...]` -> `[B, T, ...]`, dropping padding."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def scan_groups(fn, inputs, state, group_len: int):
  """Runs `fn` over consecutive groups of `group_len` tokens, carrying state.

  Keeps the working set of the chunked kernels (their `[C, C]` intra-chunk
  blocks for every chunk of a group) cache-sized for any sequence length,
  so time per token stays flat. Zero padding of the last group is exact for
  every kernel here (k = v = 0, g = 0, beta = 0 leave the state unchanged).

  Args:
    fn: `fn(*inputs_of_a_group, state) -> (o_group, state)`, inputs and
      outputs `[B, group_len, ...]`.
    inputs: arrays `[B, T, ...]`, or already grouped by `to_groups` (then
      `o` stays grouped).
    state: the carried state.
    group_len: tokens per group; None when `inputs` are grouped.

  Returns:
    (`o: [B, T, ...]`, final state, the states at the group starts stacked
    on a new leading axis).
  """

  def step(s, xs):
    o, s_next = fn(*xs, s)
    return s_next, (o, s)

  grouped = inputs if group_len is None else to_groups(inputs, group_len)
  final, (o, starts) = scan(step, state, grouped)
  if group_len is not None:
    o = from_groups(o, inputs[0].shape[1])
  return o, final, starts
