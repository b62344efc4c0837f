"""Argument checks that run when a transformation is built or initialised.

Hyperparameters may arrive as traced arrays under `optax.inject_hyperparams`;
float ones cannot be checked in Python and are let through. Integer ones fix
array shapes and must stay Python ints: a traced one is refused with the fix.
"""

import operator
from typing import Any

import jax
import jax.numpy as jnp


def _concrete_float(value: Any) -> float | None:
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def is_concrete_zero(value: Any) -> bool:
  """Whether `value` is known, at build time, to be 0."""
  return _concrete_float(value) == 0.0


def _as_int(name: str, value: Any) -> int:
  """`value` as a Python int: ints and integer-likes (np.int64, a 0-d integer
  array) are accepted through `operator.index`; bools, floats and strings are not."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f'`{name}` must be a Python int, got a traced value {value!r}. Under '
        f'`optax.inject_hyperparams`, list {name!r} in `static_args` so that '
        'it stays a Python int.'
    )
  if isinstance(value, (bool, jnp.bool_)):
    raise TypeError(f'`{name}` must be an int, got the bool {value!r}.')
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(
        f'`{name}` must be an int, got {value!r} of type {type(value).__name__}.'
    ) from None


def check_positive_int(name: str, value: Any) -> int:
  """Returns `value` as a Python int, raising unless it is an integer >= 1."""
  value = _as_int(name, value)
  if value < 1:
    raise ValueError(f'`{name}` must be a positive int (>= 1), got {value}.')
  return value


def check_non_negative_int(name: str, value: Any) -> int:
  """Returns `value` as a Python int, raising unless it is an integer >= 0."""
  value = _as_int(name, value)
  if value < 0:
    raise ValueError(f'`{name}` must be a non-negative int (>= 0), got {value}.')
  return value


def check_in_unit_interval(name: str, value: Any) -> None:
  """Raises unless `value` lies in [0, 1); traced values are not checked."""
  v = _concrete_float(value)
  if v is not None and not 0.0 <= v < 1.0:
    raise ValueError(f'`{name}` must lie in [0, 1), got {v}.')


def check_non_negative(name: str, value: Any) -> None:
  """Raises if `value` is negative; traced values are not checked."""
  v = _concrete_float(value)
  if v is not None and v < 0.0:
    raise ValueError(f'`{name}` must be >= 0, got {v}.')


def canonical_float_dtype(name: str, value: Any) -> jnp.dtype:
  """Accepts a floating dtype or its name ('float32'), returns the dtype."""
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise TypeError(
        f'`{name}` must be a floating dtype or its name such as "float32", '
        f'got {value!r}.'
    ) from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'`{name}` must be a floating dtype, got {dtype}.')
  return dtype
