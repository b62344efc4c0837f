"""Helpers shared by the D-Adaptation family (Prodigy, D-Adapt Lion)."""

from typing import Any

import jax

from mlorc_optax._src import validation

# Every k-th entry of each matrix holds the statistics behind d by default, as
# the MLorc reference package's `slice_p`.
DEFAULT_S_STRIDE = 11


def resolve_s_stride(s_stride: Any) -> int:
  """`s_stride` as a Python int >= 1; None for the default."""
  return validation.check_positive_int('s_stride', DEFAULT_S_STRIDE if s_stride is None else s_stride)


def check_positive(name: str, value: Any) -> None:
  """Raises unless `value` is > 0; traced values are not checked."""
  if isinstance(value, jax.core.Tracer):
    return
  if not float(value) > 0.0:
    raise ValueError(f'`{name}` must be > 0, got {value}.')


def strided(x: jax.Array, stride: int) -> jax.Array:
  """Every `stride`-th entry of each matrix of `x` (its last two axes,
  flattened), or of `x` flattened when it has fewer than two axes.

  The sums behind d (over s, and Prodigy's <g, w0 - w>) are then taken over a
  uniform subsample of each matrix: numerator and denominator shrink by the
  same factor, so their ratio stays close, and the stored arrays are
  `stride` times smaller (the MLorc reference package's ``slice_p``). Leading
  axes are batch axes, so a scanned stack is sampled as its layers would be.
  """
  if stride == 1:
    return x
  flat = x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],)) if x.ndim >= 2 else x.reshape(-1)
  return flat[..., ::stride]
