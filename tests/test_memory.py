"""Structural memory facts of the compiled update (sizes, not timings)."""

import jax
import jax.numpy as jnp
import pytest

import mlorc_optax as mlorc

M, N = 256, 1024
MATRIX_BYTES = M * N * 4


def _model(layers):
  return {
      f'layer{i}': {
          'up': jax.ShapeDtypeStruct((M, N), jnp.float32),
          'down': jax.ShapeDtypeStruct((N, M), jnp.float32),
          'bias': jax.ShapeDtypeStruct((M,), jnp.float32),
      }
      for i in range(layers)
  }


def _temp_bytes(tx, params):
  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(tx.update, donate_argnums=(1,)).lower(params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('make', [mlorc.adamw, mlorc.lion], ids=['adamw', 'lion'])
def test_update_temp_bytes_do_not_grow_with_depth(make):
  tx = make(1e-3, rank=4)
  shallow, deep = _temp_bytes(tx, _model(2)), _temp_bytes(tx, _model(8))
  assert deep <= 1.05 * shallow
  assert deep <= 3 * MATRIX_BYTES  # bounded by one layer's matrix, not the model


def test_scanned_layers_are_processed_one_at_a_time():
  tx = mlorc.adamw(1e-3, rank=4)
  stacked = lambda layers: {'up': jax.ShapeDtypeStruct((layers, M, N), jnp.float32)}
  # lax.map over the layer axis: one layer's moments at a time.
  assert _temp_bytes(tx, stacked(2)) <= 3 * MATRIX_BYTES
  assert _temp_bytes(tx, stacked(8)) <= 3 * MATRIX_BYTES
