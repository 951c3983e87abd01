"""Load-balancing loss: scopes, exact global batch on meshes, microbatch pieces.

Meshes use `AxisType.Explicit`: shardings are part of the array types, so
`shard_map` refuses an input that is not already sharded as its `in_specs`
say; a test cannot silently feed a replicated batch to the "global" path.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from lightning_jax import moe

B, T, D, E = 8, 6, 5, 4  # batch divides 8 devices; one sequence per device
MESHES = {
  "data4_expert2": (
    jax.make_mesh(
      (4, 2), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2
    ),
    ("data", "expert"),
  ),
  "data8": (
    jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,)),
    "data",
  ),
}
# fp32: the mesh reassociates two float32 sums of B*T terms.
RTOL, ATOL = 1e-5, 1e-7


def _normal(rng, shape):
  """Test data from numpy: no PRNG kernel to compile per shape."""
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _skewed_logits(seed, skew):
  """Logits where sequence b prefers expert `b % E` by `skew` (domain skew)."""
  noise = _normal(np.random.default_rng(seed), (B, T, E))
  domain = jax.nn.one_hot(jnp.arange(B) % E, E)[:, None, :]
  return noise + skew * domain


def _loss(logits, top_k, scope, axis_name=None):
  r = moe.route(logits, top_k)
  return moe.load_balancing_loss(
    r.probs, r.experts, num_experts=E, scope=scope, axis_name=axis_name
  )


_jit_loss = jax.jit(_loss, static_argnums=(1, 2))


def _router_loss(w_DxE, x_BxTxD, top_k, scope, axis_name=None):
  return _loss(
    jnp.einsum("btd,de->bte", x_BxTxD, w_DxE), top_k, scope, axis_name
  )


@functools.partial(jax.jit, static_argnames=("top_k",))
def _one_device(logits, w, x, top_k):
  """Whole-batch loss and its gradients w.r.t. logits and router weights."""
  value, g_logits = jax.value_and_grad(_loss)(logits, top_k, "micro")
  g_w = jax.grad(_router_loss)(w, x, top_k, "micro")
  return value, g_logits, g_w


@functools.lru_cache(maxsize=None)
def _sharded(mesh_name, top_k, microbatches=1):
  """jit of (per-device losses, grad of their mean, DDP-style router grad)."""
  mesh, axes = MESHES[mesh_name]
  batch = P(axes)

  def local_loss(logits):
    # M microbatches of this device's batch in one differentiated function.
    probs, experts = [], []
    for chunk in jnp.split(logits, microbatches, axis=1):
      r = moe.route(chunk, top_k)
      probs.append(r.probs)
      experts.append(r.experts)
    pieces = jax.tree.map(
      lambda *p: jnp.stack(p),
      *[
        moe.load_balancing_pieces(p, e, num_experts=E)
        for p, e in zip(probs, experts, strict=True)
      ],
    )
    return moe.load_balancing_loss_from_pieces(pieces, axis_name=axes)

  per_device = jax.shard_map(
    lambda x: local_loss(x)[None], mesh=mesh, in_specs=batch, out_specs=batch
  )

  def ddp_router_grad(w, x):
    # Each device differentiates its own loss w.r.t. its own copy of the
    # router; gradients are then mean-reduced, as data parallelism does.
    def body(w, x):
      w = jax.lax.pcast(w, axes, to="varying")
      g = jax.grad(lambda w: local_loss(jnp.einsum("btd,de->bte", x, w)))(w)
      return jax.lax.pmean(g, axes)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(), batch), out_specs=P())(
      w, x
    )

  @jax.jit
  def run(logits, w, x):
    losses = per_device(logits)
    g_logits = jax.grad(lambda x: jnp.mean(per_device(x)))(logits)
    return losses, g_logits, ddp_router_grad(w, x)

  def call(logits, w, x):
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
    with jax.set_mesh(mesh):
      return run(put(logits, batch), put(w, P()), put(x, batch))

  return call


def test_micro_hand_computed():
  probs = jnp.array([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])
  top1 = jnp.array([[[0], [1]]])
  # f = [1/2, 1/2, 0], p = [0.3, 0.45, 0.25]: 3 * (0.15 + 0.225).
  np.testing.assert_allclose(
    moe.load_balancing_loss(probs, top1, num_experts=3), 1.125, rtol=1e-6
  )
  top2 = jnp.array([[[0, 1], [1, 2]]])
  # f = [1/4, 1/2, 1/4]: 3 * (0.075 + 0.225 + 0.0625).
  np.testing.assert_allclose(
    moe.load_balancing_loss(probs, top2, num_experts=3), 1.0875, rtol=1e-6
  )


_jit_lbl = jax.jit(
  functools.partial(moe.load_balancing_loss, num_experts=E),
  static_argnames="scope",
)
UNIFORM_MESH, AXES = MESHES["data4_expert2"]
_global_uniform = jax.jit(
  jax.shard_map(
    lambda p, e: moe.load_balancing_loss(
      p, e, num_experts=E, scope="global", axis_name=AXES
    )[None],
    mesh=UNIFORM_MESH,
    in_specs=P(AXES),
    out_specs=P(AXES),
  )
)


@hypothesis.given(seed=st.integers(0, 2**16), top_k=st.sampled_from((1, 3)))
def test_uniform_router_gives_one_for_every_scope(seed, top_k):
  probs = jnp.full((B, T, E), 1 / E)
  experts = jnp.asarray(
    np.random.default_rng(seed).integers(0, E, (B, T, top_k)), jnp.int32
  )
  for scope in ("sequence", "micro"):
    np.testing.assert_allclose(
      _jit_lbl(probs, experts, scope=scope), 1.0, rtol=1e-6
    )
  put = lambda a: jax.device_put(a, NamedSharding(UNIFORM_MESH, P(AXES)))
  np.testing.assert_allclose(
    _global_uniform(put(probs), put(experts)), np.ones(8), rtol=1e-6
  )


@hypothesis.given(seed=st.integers(0, 2**16), skew=st.floats(0, 4))
def test_sequence_scope_is_mean_of_per_sequence_losses(seed, skew):
  logits = _skewed_logits(seed, skew)
  per_sequence = [_jit_loss(logits[b : b + 1], 2, "micro") for b in range(B)]
  np.testing.assert_allclose(
    _jit_loss(logits, 2, "sequence"), np.mean(per_sequence), rtol=1e-6
  )


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("top_k", [1, 2])
@hypothesis.given(seed=st.integers(0, 2**16), skew=st.floats(0, 4))
def test_global_scope_equals_one_device_loss_and_grads(
  mesh_name, top_k, seed, skew
):
  logits = _skewed_logits(seed, skew)
  rng = np.random.default_rng(seed + 1)
  x, w = _normal(rng, (B, T, D)), _normal(rng, (D, E))
  value, g_logits, g_w = _one_device(logits, w, x, top_k)
  losses, sg_logits, sg_w = _sharded(mesh_name, top_k)(logits, w, x)
  np.testing.assert_allclose(np.mean(losses), value, rtol=RTOL)
  np.testing.assert_allclose(sg_logits, g_logits, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(sg_w, g_w, rtol=RTOL, atol=1e-6)


@hypothesis.given(seed=st.integers(0, 2**16), skew=st.floats(0, 4))
def test_microbatch_pieces_give_exact_global_loss(seed, skew):
  """M=3 microbatches per device x 8 devices == whole batch on one device."""
  logits = _skewed_logits(seed, skew)
  rng = np.random.default_rng(seed + 1)
  x, w = _normal(rng, (B, T, D)), _normal(rng, (D, E))
  value, g_logits, g_w = _one_device(logits, w, x, 2)
  losses, sg_logits, sg_w = _sharded("data8", 2, microbatches=3)(logits, w, x)
  np.testing.assert_allclose(np.mean(losses), value, rtol=RTOL)
  np.testing.assert_allclose(sg_logits, g_logits, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(sg_w, g_w, rtol=RTOL, atol=1e-6)


def test_micro_scope_differs_from_global_on_domain_skewed_batch():
  """Each device holds one domain: micro-batch balancing penalises what the
  global batch considers balanced (Qiu et al., 2025)."""
  logits = _skewed_logits(0, 4.0)
  mesh, axes = MESHES["data8"]
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P(axes)))

  def per_device(scope):
    kwargs = {"axis_name": axes} if scope == "global" else {}
    f = jax.shard_map(
      lambda x: _loss(x, 2, scope, **kwargs)[None],
      mesh=mesh,
      in_specs=P(axes),
      out_specs=P(axes),
    )
    with jax.set_mesh(mesh):
      return jax.jit(jax.value_and_grad(lambda x: jnp.mean(f(x))))(put(logits))

  micro, g_micro = per_device("micro")
  glob, g_glob = per_device("global")
  np.testing.assert_allclose(glob, _loss(logits, 2, "micro"), rtol=RTOL)
  assert micro > glob + 0.5, (micro, glob)
  assert np.abs(np.asarray(g_micro) - np.asarray(g_glob)).max() > 1e-3


def test_replicated_global_loss_under_ddp_is_1_over_d_too_small():
  """The pitfall of Megatron-LM issue 3672, in JAX: if every device computes
  the full global loss (p psum'ed too), per-device gradients mean-reduced
  over D devices are 1/D of the true gradient; ours are exact."""
  mesh, axes = MESHES["data8"]
  rng = np.random.default_rng(7)
  x, w = _normal(rng, (B, T, D)), _normal(rng, (D, E))

  def pieces(w, x):
    r = moe.route(jnp.einsum("btd,de->bte", x, w), 2)
    return moe.load_balancing_pieces(r.probs, r.experts, num_experts=E)

  def replicated(w, x):
    p = jax.lax.psum(pieces(w, x), axes)
    f = jax.lax.stop_gradient(p.expert_counts / jnp.sum(p.expert_counts))
    return E * jnp.sum(f * p.prob_sums / p.num_tokens)

  def ours(w, x):
    return moe.load_balancing_loss_from_pieces(pieces(w, x), axis_name=axes)

  def ddp_grad(loss):
    def body(w, x):
      w = jax.lax.pcast(w, axes, to="varying")
      return jax.lax.pmean(jax.grad(loss)(w, x), axes)

    return jax.jit(
      jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axes)), out_specs=P())
    )

  true = jax.grad(lambda w: moe.load_balancing_loss_from_pieces(pieces(w, x)))(
    w
  )
  put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
  with jax.set_mesh(mesh):
    g_ours = ddp_grad(ours)(put(w, P()), put(x, P(axes)))
    g_replicated = ddp_grad(replicated)(put(w, P()), put(x, P(axes)))
  np.testing.assert_allclose(g_ours, true, rtol=RTOL, atol=1e-6)
  np.testing.assert_allclose(g_replicated, true / 8, rtol=RTOL, atol=1e-6)


def _microbatch_pieces(logits, m):
  r = moe.route(logits[m::4], 2)  # 4 domain-skewed microbatches of 2 seqs
  return moe.load_balancing_pieces(r.probs, r.experts, num_experts=E)


def test_sequential_accumulation_exact_only_with_known_counts():
  """A sequential loop (one backward per microbatch, gradients averaged) is
  exact when f comes from the counts of all microbatches (a pre-pass);
  with a running count buffer the early microbatches use a partial f."""
  logits = _skewed_logits(3, 3.0)
  exact, g_exact = jax.value_and_grad(_loss)(logits, 2, "micro")
  total_counts = sum(
    _microbatch_pieces(logits, m).expert_counts for m in range(4)
  )

  @functools.partial(jax.jit, static_argnums=0)
  def sequential(counts_for):
    value, grad, running = 0.0, jnp.zeros_like(logits), jnp.zeros(E)
    for m in range(4):
      running = running + _microbatch_pieces(logits, m).expert_counts

      def loss_m(x, m=m, running=running):
        return (
          moe.load_balancing_loss_from_pieces(
            _microbatch_pieces(x, m), expert_counts=counts_for(running)
          )
          / 4
        )

      v, g = jax.value_and_grad(loss_m)(logits)
      value, grad = value + v, grad + g
    return value, grad

  v_known, g_known = sequential(lambda running: total_counts)
  np.testing.assert_allclose(v_known, exact, rtol=RTOL)
  np.testing.assert_allclose(g_known, g_exact, rtol=RTOL, atol=ATOL)
  v_run, g_run = sequential(lambda running: running)
  assert abs(v_run - exact) > 1e-2
  assert np.abs(np.asarray(g_run - g_exact)).max() > 1e-4


def test_load_stats():
  counts = jnp.array([[3.0, 1.0], [3.0, 1.0]])
  stats = moe.load_stats(counts, kept=jnp.array([[True, False], [True, True]]))
  np.testing.assert_allclose(stats.expert_load, [0.75, 0.25])
  np.testing.assert_allclose(stats.max_over_mean, 1.5)
  np.testing.assert_allclose(stats.dropped_fraction, 1 / 8)
  mesh, axes = MESHES["data8"]
  local = jnp.zeros((8, E)).at[jnp.arange(8), jnp.arange(8) % E].set(1.0)
  glob = jax.shard_map(
    lambda c: moe.load_stats(c, axis_name=axes),
    mesh=mesh,
    in_specs=P(axes),
    out_specs=P(),
  )(jax.device_put(local, NamedSharding(mesh, P(axes))))
  np.testing.assert_allclose(glob.max_over_mean, 1.0)
  np.testing.assert_allclose(glob.dropped_fraction, 0.0)


def test_bad_input():
  probs = jnp.full((2, 3, E), 1 / E)
  experts = jnp.zeros((2, 3, 2), jnp.int32)
  lbl = functools.partial(moe.load_balancing_loss, num_experts=E)
  with pytest.raises(ValueError, match="experts"):
    lbl(probs, experts[:, :2])
  with pytest.raises(ValueError, match="probs"):
    lbl(probs[..., :3], experts)
  with pytest.raises(ValueError, match="probs"):
    lbl(probs[0], experts[0])
  with pytest.raises(ValueError, match="scope"):
    lbl(probs, experts, scope="device")
  with pytest.raises(ValueError, match="axis_name"):
    lbl(probs, experts, scope="global")
  with pytest.raises(ValueError, match="axis_name"):
    lbl(probs, experts, scope="micro", axis_name="data")
  with pytest.raises(ValueError, match="not bound"):
    lbl(probs, experts, scope="global", axis_name="data")


@pytest.mark.parametrize("bad_id", [-1, E])
def test_out_of_range_expert_ids(bad_id):
  """Concrete: a ValueError naming `experts` and [0, E). Under jit: not
  counted, and the loss stays finite (0 if no id is valid)."""
  probs = jnp.full((2, 3, E), 1 / E)
  experts = jnp.zeros((2, 3, 1), jnp.int32).at[0, 0].set(bad_id)
  for scope in ("micro", "sequence"):
    with pytest.raises(ValueError, match=r"`experts`.*\[0, 4\)"):
      moe.load_balancing_loss(probs, experts, num_experts=E, scope=scope)
  with pytest.raises(ValueError, match=r"`experts`.*\[0, 4\)"):
    moe.load_balancing_pieces(probs, experts, num_experts=E)
  lbl = jax.jit(functools.partial(moe.load_balancing_loss, num_experts=E))
  # 5 valid slots, all on expert 0: f = (1, 0, 0, 0), loss = E * p_0 = 1.
  np.testing.assert_allclose(lbl(probs, experts), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(lbl(probs, jnp.full_like(experts, bad_id)), 0)
