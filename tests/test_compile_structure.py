"""Structural facts of the compiled update that keep compile time flat in depth.

Compile time is measured in benchmarks/compile_time.py; here only the
program's structure is asserted: the randomized SVD (its eigen-solves) and
the loops appear once per group of same-shaped matrices, not per layer.
"""

import re

import jax
import jax.numpy as jnp
import pytest

import mlorc_optax as mlorc


def _unrolled(layers, d=64):
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  block = lambda: {'q': s(d, d), 'k': s(d, d), 'up': s(d, 4 * d), 'down': s(4 * d, d), 'norm': s(d)}
  return {f'layer{i}': block() for i in range(layers)}


def _program(tx, params) -> str:
  state = jax.eval_shape(tx.init, params)
  return jax.jit(tx.update).lower(params, state, params).as_text()


def _counts(text: str) -> tuple[int, int]:
  return text.count('stablehlo.while'), len(re.findall(r'eigh|syevd', text))


@pytest.mark.parametrize('make', [mlorc.adamw, mlorc.lion], ids=['adamw', 'lion'])
def test_randomized_svd_appears_once_per_shape_not_per_layer(make):
  tx = make(1e-3, rank=4, min_dim_size=16)
  shallow, deep = _counts(_program(tx, _unrolled(2))), _counts(_program(tx, _unrolled(8)))
  assert shallow == deep
  loops, eigen_solves = deep
  assert eigen_solves > 0 and loops > 0


def test_one_group_per_distinct_matrix_shape():
  tx = mlorc.lion(1e-3, rank=4, min_dim_size=16)
  layers = lambda n: {f'layer{i}': jax.ShapeDtypeStruct((64, 64), jnp.float32) for i in range(n)}
  one, six = _counts(_program(tx, layers(1))), _counts(_program(tx, layers(6)))
  two_shapes = _counts(_program(tx, dict(layers(6), extra=jax.ShapeDtypeStruct((64, 32), jnp.float32))))
  assert six == one
  assert two_shapes[0] > six[0]  # a second shape gets loops of its own
