"""Argument checks that run when a transformation is built or initialised.

Hyperparameters may arrive as traced arrays under `optax.inject_hyperparams`;
those cannot be checked in Python and are let through.
"""

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


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
  """Raises unless `value` is a Python int > 0 (or >= 0 with `allow_zero`)."""
  lowest = 0 if allow_zero else 1
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(
        f'`{name}` must be a Python int, got {value!r} of type '
        f'{type(value).__name__}. Under `optax.inject_hyperparams`, list '
        f'{name!r} in `static_args` so it stays a Python int.'
    )
  if value < lowest:
    raise ValueError(f'`{name}` must be >= {lowest}, got {value}.')


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
