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


def _state_bytes(tx, params):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, params)))


@pytest.mark.parametrize('make', [mlorc.adamw, mlorc.lion], ids=['adamw', 'lion'])
def test_update_temp_bytes_do_not_grow_with_depth(make):
  """Bounded by one matrix (read in the group loop), plus copies of the
  factors (2x the optimizer state, which is small), not by the model. Each
  update waits for its factors: computed before the loops, AdamW's updates
  took 2 matrices more."""
  tx = make(1e-3, rank=4)
  shallow, deep = _temp_bytes(tx, _model(2)), _temp_bytes(tx, _model(8))
  state_growth = _state_bytes(tx, _model(8)) - _state_bytes(tx, _model(2))
  assert deep - shallow <= 2.5 * state_growth
  assert deep <= MATRIX_BYTES + 2.5 * _state_bytes(tx, _model(8))


def test_scanned_layers_are_processed_one_at_a_time():
  tx = mlorc.adamw(1e-3, rank=4)
  stacked = lambda layers: {'up': jax.ShapeDtypeStruct((layers, M, N), jnp.float32)}
  # lax.map over the layer axis: one layer's moments at a time.
  assert _temp_bytes(tx, stacked(2)) <= 2 * MATRIX_BYTES
  assert _temp_bytes(tx, stacked(8)) <= 2 * MATRIX_BYTES
