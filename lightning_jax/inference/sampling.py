"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus).

Order of operations (as in most LM samplers): logits / temperature, then the
top-k mask, then the top-p mask over the renormalised survivors, then a
categorical draw. Masked logits are -inf. Nucleus sampling: Holtzman et al.,
2020 ("The Curious Case of Neural Text Degeneration", arXiv 1904.09751).
"""

import dataclasses

import jax
import jax.numpy as jnp

from lightning_jax import _checks


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick the next token (static: hashable, a jit static argument).

  Attributes:
    temperature: logits are divided by it; 0 means greedy (argmax).
    top_k: keep the k largest logits (None or 0: all).
    top_p: keep the smallest set of most probable tokens whose probability
      reaches `top_p` (None or 1: all).
  """

  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not self.temperature >= 0.0:
      raise ValueError(f"`temperature` must be >= 0, got {self.temperature}.")
    if self.top_k not in (None, 0):
      _checks.check_positive_int("top_k", self.top_k)
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}.")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def top_k_mask(logits_BxV, k: int) -> jax.Array:
  """Logits with all but the `k` largest per row set to -inf.

  Ties at the k-th value are all kept (the threshold is a value, not a rank).

  Example:
    >>> top_k_mask(jnp.array([[1., 3., 2.]]), 2)
    Array([[-inf,   3.,   2.]], dtype=float32)
  """
  k = min(_checks.check_positive_int("k", k), logits_BxV.shape[-1])
  kth = jax.lax.top_k(logits_BxV, k)[0][..., -1:]
  return jnp.where(logits_BxV >= kth, logits_BxV, -jnp.inf)


def top_p_mask(logits_BxV, p: float) -> jax.Array:
  """Logits outside the nucleus of probability `p` set to -inf.

  The nucleus of a row is the shortest prefix of its tokens sorted by
  probability whose mass reaches `p`: a token is kept iff the mass of the
  tokens strictly more probable than it is < p (so the top token always
  stays). Tokens tied with the last kept one are kept too.

  Example:
    >>> top_p_mask(jnp.log(jnp.array([[0.5, 0.3, 0.2]])), 0.7)[0, 2]
    Array(-inf, dtype=float32)
  """
  if not 0.0 < p <= 1.0:
    raise ValueError(f"`p` must be in (0, 1], got {p}.")
  sorted_desc = -jnp.sort(-logits_BxV, axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  n_keep = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # >= 1
  threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
  return jnp.where(logits_BxV >= threshold, logits_BxV, -jnp.inf)


def processed_logits(logits_BxV, cfg: SamplingConfig) -> jax.Array:
  """fp32 logits after temperature, top-k and top-p (not for greedy)."""
  logits = logits_BxV.astype(jnp.float32) / cfg.temperature
  if cfg.top_k:
    logits = top_k_mask(logits, cfg.top_k)
  if cfg.top_p is not None and cfg.top_p < 1.0:
    logits = top_p_mask(logits, cfg.top_p)
  return logits


def sample(key, logits_BxV, cfg: SamplingConfig = SamplingConfig()):
  """Draws one token per row.

  Args:
    key: a `jax.random` key (one draw per row from it).
    logits_BxV: `[batch, vocab]` logits.
    cfg: the sampling rule; `temperature=0` is greedy and ignores `key`.

  Returns:
    int32 `[batch]` token ids.

  Example:
    >>> sample(jax.random.key(0), jnp.zeros((2, 5)), SamplingConfig(top_k=2))
  """
  _checks.check_rank("logits_BxV", logits_BxV, 2, "[batch, vocab]")
  if cfg.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = processed_logits(logits_BxV, cfg)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
