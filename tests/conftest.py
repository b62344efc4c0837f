"""Shared fixtures: small parameter trees and gradient streams."""

import jax
import jax.numpy as jnp
import pytest


def make_params(key, dtype=jnp.float32):
  """A Dense kernel, a bias, a scanned (layers, in, out) kernel and a scalar."""
  k1, k2 = jax.random.split(key)
  return {
      'w': jax.random.normal(k1, (12, 8), dtype),
      'b': jnp.zeros((8,), dtype),
      'stack': jax.random.normal(k2, (3, 10, 9), dtype),
      'scale': jnp.ones((), dtype),
  }


# Compress every matrix, including the small ones used in tests.
COMPRESS_ALL = {'w': True, 'b': False, 'stack': True, 'scale': False}


def gradient(params, t):
  """A deterministic, full-rank, step-dependent gradient."""
  return jax.tree.map(lambda x: jnp.sin(x * (t + 1.0)) + 0.1 * x + 0.01 * t, params)


@pytest.fixture
def params():
  return make_params(jax.random.key(0))
