r"""Micro-batch vs global-batch load balancing: expert specialisation by domain.

Trains a tiny MoE language model on synthetic multi-domain data (each domain
a different Markov chain over a shared vocabulary) with the load-balancing
loss at `micro` scope (f counted per micro-batch, i.e. per simulated
data-parallel device) or `global` scope (f counted over all micro-batches,
`psum` over the device axis), then reports, on held-out sequences, the mutual
information between a token's domain and the experts it is routed to, the
global expert balance and the language-model loss. The micro-batches of a
step (each `--seqs_per_micro` sequences) run in a `lax.scan` inside one
differentiated function; the global loss combines their `LBLPieces`, which
equals the mean over data-parallel devices of the shard_map global loss.

  python -m tools.moe_specialisation
"""

import dataclasses
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lightning_jax import layers
from lightning_jax import moe

_SCOPES = flags.DEFINE_list(
  "scopes", ["micro", "global"], "LBL scopes to compare (micro, global)."
)
_SEEDS = flags.DEFINE_list(
  "seeds", ["0", "1"], "Seeds; one run per seed and scope."
)
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps.")
_DOMAINS = flags.DEFINE_integer("num_domains", 4, "Synthetic domains.")
_VOCAB = flags.DEFINE_integer("vocab", 64, "Vocabulary size.")
_IN_BAND = flags.DEFINE_float(
  "in_band", 0.9, "Probability that a domain stays in its band."
)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 32, "Tokens per sequence.")
_MICRO = flags.DEFINE_integer(
  "micro_batches", 8, "Micro-batches (simulated devices) per step."
)
_SEQS = flags.DEFINE_integer("seqs_per_micro", 1, "Sequences per micro-batch.")
_D_MODEL = flags.DEFINE_integer("d_model", 32, "Model width.")
_D_FF = flags.DEFINE_integer("d_ff", 32, "Hidden width of each expert.")
_EXPERTS = flags.DEFINE_integer("num_experts", 8, "Experts.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
_LBL_COEF = flags.DEFINE_float("lbl_coef", 0.01, "Load-balancing loss weight.")
_LR = flags.DEFINE_float("learning_rate", 1e-2, "Adam learning rate.")
_EVAL_SEQS = flags.DEFINE_integer("eval_seqs", 64, "Held-out sequences.")


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int
  seq_len: int
  num_domains: int
  moe: layers.MoEConfig


def _chains(key, num_domains, vocab):
  """Per-domain Markov transition matrices `[domains, vocab, vocab]`.

  Domain d moves mostly (`--in_band`) within its own band of
  `vocab / domains` tokens, otherwise anywhere; rows are sparse Dirichlet.
  """
  k_band, k_all = jax.random.split(key)
  band = vocab // num_domains
  in_band = jax.random.dirichlet(
    k_band, jnp.full((band,), 0.1), (num_domains, vocab)
  )
  anywhere = jax.random.dirichlet(
    k_all, jnp.full((vocab,), 0.1), (num_domains, vocab)
  )
  rows = jnp.zeros((num_domains, vocab, vocab))
  for d in range(num_domains):
    rows = rows.at[d, :, d * band : (d + 1) * band].set(in_band[d])
  return _IN_BAND.value * rows + (1 - _IN_BAND.value) * anywhere


def _sample(key, chains, domains, seq_len):
  """`[n, seq_len]` tokens, sequence i from chain `domains[i]`."""
  k_first, k_steps = jax.random.split(key)
  vocab = chains.shape[-1]
  first = jax.random.randint(k_first, domains.shape, 0, vocab)

  def step(tok, k):
    logp = jnp.log(chains[domains, tok] + 1e-9)
    nxt = jax.random.categorical(k, logp)
    return nxt, nxt

  _, rest = jax.lax.scan(step, first, jax.random.split(k_steps, seq_len - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def _init(key, cfg: Config):
  d = cfg.moe.d_model
  k_emb, k_mix, k_moe, k_out = jax.random.split(key, 4)
  dense = jax.nn.initializers.lecun_normal()
  return {
    "embed": jax.random.normal(k_emb, (cfg.vocab, d)),
    "mix": dense(k_mix, (d, d)),
    "moe": layers.init_moe(k_moe, cfg.moe),
    "unembed": dense(k_out, (d, cfg.vocab)),
  }


def _rms(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _features(params, tokens_BxT):
  """Token embedding plus a projection of the causal mean of embeddings."""
  h = params["embed"][tokens_BxT]
  steps = jnp.arange(1, tokens_BxT.shape[1] + 1, dtype=jnp.float32)
  context = jnp.cumsum(h, axis=1) / steps[None, :, None]
  return h + context @ params["mix"]


def _forward(params, tokens_BxT, cfg: Config):
  """Features, one residual MoE block, unembedding; next-token loss."""
  h = _features(params, tokens_BxT)
  y, aux = layers.moe(params["moe"], _rms(h), cfg.moe)
  logits = _rms(h + y) @ params["unembed"]
  ce = optax.softmax_cross_entropy_with_integer_labels(
    logits[:, :-1], tokens_BxT[:, 1:]
  )
  return jnp.mean(ce), aux


def _train(cfg: Config, scope: str, seed: int):
  k_chain, k_init, k_data, k_eval = jax.random.split(jax.random.key(seed), 4)
  chains = _chains(k_chain, cfg.num_domains, cfg.vocab)
  params = _init(k_init, cfg)
  opt = optax.adam(_LR.value)
  opt_state = opt.init(params)
  micro, seqs = _MICRO.value, _SEQS.value

  def loss(params, tokens_MxSxT):
    _, (ce, aux) = jax.lax.scan(
      lambda carry, tokens: (carry, _forward(params, tokens, cfg)),
      None,
      tokens_MxSxT,
    )
    if scope == "global":
      lbl = moe.load_balancing_loss_from_pieces(aux.lbl_pieces)
    else:
      lbl = jnp.mean(aux.load_balancing_loss)
    return jnp.mean(ce) + _LBL_COEF.value * lbl, jnp.mean(ce)

  @jax.jit
  def step(params, opt_state, key):
    k_dom, k_tok = jax.random.split(key)
    domains = jax.random.randint(k_dom, (micro * seqs,), 0, cfg.num_domains)
    tokens = _sample(k_tok, chains, domains, cfg.seq_len)
    (_, ce), grads = jax.value_and_grad(loss, has_aux=True)(
      params, tokens.reshape(micro, seqs, -1)
    )
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, ce

  for key in jax.random.split(k_data, _STEPS.value):
    params, opt_state, _ = step(params, opt_state, key)

  n_eval = _EVAL_SEQS.value
  domains = jnp.arange(n_eval) % cfg.num_domains
  tokens = _sample(k_eval, chains, domains, cfg.seq_len)
  ce, _ = _forward(params, tokens, cfg)
  experts = _eval_experts(params, tokens, cfg)
  return float(ce), *_specialisation(np.asarray(domains), experts, cfg)


def _eval_experts(params, tokens, cfg: Config):
  """`[n, T, top_k]` experts chosen for held-out tokens."""
  logits = _rms(_features(params, tokens)) @ params["moe"]["router"]
  return np.asarray(moe.route(logits, cfg.moe.top_k).experts)


def _specialisation(domains, experts, cfg: Config):
  """(I(domain; expert) in bits over routing slots, global max/mean load,
  mean per-sequence max/mean load)."""
  e = cfg.moe.num_experts
  joint = np.zeros((cfg.num_domains, e))
  per_seq = []
  for d, ex in zip(domains, experts, strict=True):
    counts = np.bincount(ex.ravel(), minlength=e)
    joint[d] += counts
    per_seq.append(counts.max() / counts.mean())
  p = joint / joint.sum()
  outer = p.sum(1, keepdims=True) @ p.sum(0, keepdims=True)
  nz = p > 0
  mi = float(np.sum(p[nz] * np.log2(p[nz] / outer[nz])))
  load = joint.sum(0)
  return mi, float(load.max() / load.mean()), float(np.mean(per_seq))


def main(argv):
  del argv
  for scope in _SCOPES.value:
    if scope not in ("micro", "global"):
      raise app.UsageError(f"--scopes: micro or global, got {scope!r}.")
  seeds = [int(s) for s in _SEEDS.value]
  cfg = Config(
    vocab=_VOCAB.value,
    seq_len=_SEQ_LEN.value,
    num_domains=_DOMAINS.value,
    moe=layers.MoEConfig(
      d_model=_D_MODEL.value,
      d_ff=_D_FF.value,
      num_experts=_EXPERTS.value,
      top_k=_TOP_K.value,
    ),
  )
  print(
    f"max I(domain; expert) = log2({cfg.num_domains}) = "
    f"{np.log2(cfg.num_domains):.3f} bits"
  )
  print(
    "| LBL scope | seed | eval LM loss | I(domain; expert) [bits] | "
    "global max/mean load | per-sequence max/mean load | time [s] |"
  )
  print("|---|---|---|---|---|---|---|")
  for scope in _SCOPES.value:
    for seed in seeds:
      start = time.perf_counter()
      ce, mi, glob, seq = _train(cfg, scope, seed)
      print(
        f"| {scope} | {seed} | {ce:.3f} | {mi:.3f} | {glob:.2f} | "
        f"{seq:.2f} | {time.perf_counter() - start:.0f} |",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
