r"""How far sequential gradient accumulation is from the global-batch LBL.

A step's batch is split into M microbatches, each from a single domain (the
worst case: routing is skewed per microbatch). A sequential loop runs one
forward/backward per microbatch and averages the gradients, so microbatch m
must fix `f` before later microbatches are routed. Compared with the exact
global-batch loss (all microbatches' `LBLPieces` in one function), for a
linear router `logits = x W`:

* `micro`: f of microbatch m alone (what a plain accumulation loop does);
* `running`: f from the counts of microbatches 1..m (a running buffer);
* `previous`: f from the previous step's global counts (stale by one step);
* `pre-pass`: f from all M microbatches' counts, known before the backward
  passes (an extra forward pass): exact.

Prints the relative error of the loss value and of the gradient w.r.t. W.

  python -m tools.moe_accumulation
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import moe

_MICRO = flags.DEFINE_list(
  "microbatches", ["1", "2", "4", "8"], "Microbatch counts M to measure."
)
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 32, "Tokens per sequence.")
_D = flags.DEFINE_integer("d_model", 16, "Router input width.")
_EXPERTS = flags.DEFINE_integer("num_experts", 8, "Experts.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
_SKEW = flags.DEFINE_float("skew", 1.0, "Domain offset of the router input.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")

METHODS = ("micro", "running", "previous", "pre-pass")


def _batch(key, num_micro, domain_means):
  """`[M, B/M, T, D]` router inputs; microbatch m from domain m % domains."""
  shape = (num_micro, _BATCH.value // num_micro, _SEQ_LEN.value, _D.value)
  domains = jnp.arange(num_micro) % domain_means.shape[0]
  offset = domain_means[domains][:, None, None, :]
  return jax.random.normal(key, shape) + _SKEW.value * offset


def _pieces(w, x):
  r = moe.route(jnp.einsum("btd,de->bte", x, w), _TOP_K.value)
  return moe.load_balancing_pieces(
    r.probs, r.experts, num_experts=_EXPERTS.value
  )


def _exact(w, x_MxBxTxD):
  return moe.load_balancing_loss_from_pieces(
    jax.vmap(_pieces, (None, 0))(w, x_MxBxTxD)
  )


def _sequential(w, x_MxBxTxD, method, previous_counts):
  """Value and gradient accumulated over microbatches, one at a time."""
  num_micro = x_MxBxTxD.shape[0]
  all_counts = jax.vmap(_pieces, (None, 0))(w, x_MxBxTxD).expert_counts
  value, grad = 0.0, jnp.zeros_like(w)
  for m in range(num_micro):
    counts = {
      "micro": all_counts[m],
      "running": jnp.sum(all_counts[: m + 1], axis=0),
      "previous": previous_counts,
      "pre-pass": jnp.sum(all_counts, axis=0),
    }[method]
    loss_m = lambda w, m=m, counts=counts: (
      moe.load_balancing_loss_from_pieces(
        _pieces(w, x_MxBxTxD[m]), expert_counts=counts
      )
      / num_micro
    )
    v, g = jax.value_and_grad(loss_m)(w)
    value, grad = value + v, grad + g
  return value, grad


def main(argv):
  del argv
  micro = [int(m) for m in _MICRO.value]
  for m in micro:
    if m < 1 or _BATCH.value % m:
      raise app.UsageError(f"--microbatches: each must divide --batch, got {m}")
  k_w, k_dom, k_prev, k_x = jax.random.split(jax.random.key(_SEED.value), 4)
  w = jax.random.normal(k_w, (_D.value, _EXPERTS.value)) * _D.value**-0.5
  domain_means = jax.random.normal(k_dom, (max(micro), _D.value))
  print("| M | method | rel. loss error | rel. grad error | grad cosine |")
  print("|---|---|---|---|---|")
  for num_micro in micro:
    x = _batch(k_x, num_micro, domain_means)
    previous = jnp.sum(
      jax.vmap(_pieces, (None, 0))(
        w, _batch(k_prev, num_micro, domain_means)
      ).expert_counts,
      axis=0,
    )
    value, grad = jax.value_and_grad(_exact)(w, x)
    for method in METHODS:
      v, g = jax.jit(_sequential, static_argnums=2)(w, x, method, previous)
      g, ref = np.asarray(g).ravel(), np.asarray(grad).ravel()
      print(
        f"| {num_micro} | {method} | {abs(v - value) / value:.2e} | "
        f"{np.linalg.norm(g - ref) / np.linalg.norm(ref):.2e} | "
        f"{g @ ref / np.linalg.norm(g) / np.linalg.norm(ref):.4f} |"
      )


if __name__ == "__main__":
  app.run(main)
