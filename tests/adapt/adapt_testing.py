"""Shared helpers for the tests of `lightning_jax.adapt`.

A test module defines its model config as `CFG` and takes the `base`
fixture with `base = adapt_testing.base`.
"""

import jax
import jax.numpy as jnp
import pytest

from lightning_jax import models


def init_params(cfg):
  """`models.init` params of `cfg` (key 0), compiled."""
  return jax.jit(models.init, static_argnums=1)(jax.random.key(0), cfg)


@pytest.fixture(scope="module")
def base(request):
  """`init_params` of the requesting test module's `CFG`, once per module."""
  return init_params(request.module.CFG)


def batch(cfg, seed: int = 0, rows: int = 2) -> dict:
  """A `[rows, 8]` training batch of random tokens below `cfg.vocab_size`."""
  key = jax.random.key(seed)
  tokens = jax.random.randint(key, (rows, 9), 0, cfg.vocab_size)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "mask": jnp.ones((rows, 8), jnp.float32),
  }


def random_b(adapters: dict, seed: int = 1) -> dict:
  """LoRA adapters with a non-zero `B ~ N(0, 0.1^2)` (a trained state)."""
  keys = iter(jax.random.split(jax.random.key(seed), len(adapters)))
  return {
    n: dict(ad, b=0.1 * jax.random.normal(next(keys), ad["b"].shape))
    for n, ad in adapters.items()
  }
