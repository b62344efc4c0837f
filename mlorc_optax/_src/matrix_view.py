"""Which parameters are compressed, and how an N-D parameter is seen as matrices.

A `MatrixView` names the axes that form a matrix's rows and columns; every
other axis is a batch axis, so each slice along it is compressed on its own
(the layers of a scanned model, the kernels of a grouped convolution).
"""

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np


class MatrixView(NamedTuple):
  """Axes of a parameter flattened into the rows and the columns of a matrix.

  Axes in neither tuple are batch axes. Negative axes count from the end.

  Examples (Flax kernel layouts):
    - Dense (in, out), or scanned Dense (layers, in, out): ``MatrixView((-2,), (-1,))``
    - attention q/k/v (embed, heads, head_dim): ``MatrixView((0,), (1, 2))``
    - attention out (heads, head_dim, embed): ``MatrixView((0, 1), (2,))``
    - Conv (kh, kw, in, out): ``MatrixView((0, 1, 2), (3,))``
  """

  rows: tuple[int, ...] = (-2,)
  cols: tuple[int, ...] = (-1,)


# Per leaf: a MatrixView, True (the default view), or False/None (not compressed).
ViewSpec = Union[MatrixView, bool, None]
CompressArg = Union[None, Any, Callable[[Any], Any]]


def view_axes(view: MatrixView, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(batch, row, column) axes of an `ndim`-D parameter seen through `view`."""
  rows = tuple(a % ndim for a in view.rows)
  cols = tuple(a % ndim for a in view.cols)
  if not rows or not cols or len(set(rows + cols)) != len(rows + cols):
    raise ValueError(
        f'MatrixView {view} must name at least one row and one column axis, '
        f'each axis once, for a {ndim}-D parameter.'
    )
  batch = tuple(a for a in range(ndim) if a not in rows + cols)
  return batch, rows, cols


def matrix_shape(shape: tuple[int, ...], view: MatrixView) -> tuple[tuple[int, ...], int, int]:
  """Returns (batch_shape, m, n) of `shape` seen through `view`."""
  batch, rows, cols = view_axes(view, len(shape))
  size = lambda axes: int(np.prod([shape[a] for a in axes], dtype=np.int64))
  return tuple(shape[a] for a in batch), size(rows), size(cols)


def to_matrices(x: jax.Array, view: MatrixView) -> jax.Array:
  """Transposes and reshapes x to (batch, m, n), one flat batch axis."""
  batch, rows, cols = view_axes(view, x.ndim)
  _, m, n = matrix_shape(x.shape, view)
  return jnp.transpose(x, batch + rows + cols).reshape(-1, m, n)


def from_matrices(x: jax.Array, view: MatrixView, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `to_matrices`: a (batch, m, n) array back to `shape`."""
  batch, rows, cols = view_axes(view, len(shape))
  order = batch + rows + cols
  x = x.reshape(tuple(shape[a] for a in order))
  return jnp.transpose(x, np.argsort(order))


def default_view(shape: tuple[int, ...], rank: int, min_dim_size: int) -> MatrixView | None:
  """The default policy: compress the last two axes when that saves memory.

  A parameter is compressed when it has at least 2 axes and its last two,
  (m, n), both have at least `min_dim_size` entries and exceed `rank`; leading
  axes are batch axes (scanned layers). Vectors, scalars and small matrices,
  and the stacked (layers, d) biases of scanned models whose layer count is
  below `min_dim_size`, keep full moments.
  """
  if len(shape) < 2:
    return None
  m, n = shape[-2:]
  if min(m, n) < max(min_dim_size, rank + 1):
    return None
  return MatrixView()


def resolve_views(
    params: Any, compress: CompressArg, rank: int, min_dim_size: int
) -> Any:
  """A tree like `params` holding each leaf's `MatrixView`, or None if not compressed.

  Args:
    params: parameters (or updates, or shape structs).
    compress: None for `default_view` on every leaf; a tree with the structure
      of `params` (or a prefix of it) whose entries are `MatrixView`, True for
      the default `MatrixView()` on every leaf of 2 or more axes, or
      False/None; or a callable mapping `params` to such a tree.
    rank: the compression rank.
    min_dim_size: the `default_view` threshold.
  """
  def resolve(spec: ViewSpec, leaf: Any) -> MatrixView | None:
    shape = tuple(jnp.shape(leaf))
    if spec is None and compress is None:
      spec = default_view(shape, rank, min_dim_size)
    if spec is True:  # "compress if it is a matrix", also as a tree prefix
      spec = MatrixView() if len(shape) >= 2 else None
    if spec is None or spec is False:
      return None
    if not isinstance(spec, MatrixView):
      raise TypeError(
          '`compress` entries must be MatrixView, True, False or None; got '
          f'{spec!r}.'
      )
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      return None
    matrix_shape(shape, spec)  # validates the axes against the leaf
    return spec

  if compress is None:
    return jax.tree.map(lambda leaf: resolve(None, leaf), params)
  specs = compress(params) if callable(compress) else compress
  is_spec = lambda x: x is None or isinstance(x, (bool, MatrixView))
  try:
    pairs = jax.tree.map(_SpecAndSubtree, specs, params, is_leaf=is_spec)
  except ValueError as e:
    raise ValueError(
        '`compress` must be a tree with the structure of the parameters (or a '
        f'prefix of it), or a callable returning one: {e}'
    ) from e
  return jax.tree.map(
      lambda pair: jax.tree.map(lambda leaf: resolve(pair.spec, leaf), pair.subtree), pairs
  )


class _SpecAndSubtree:
  """One `compress` entry and the parameters under it (a pytree leaf: not registered)."""

  def __init__(self, spec: ViewSpec, subtree: Any):
    self.spec, self.subtree = spec, subtree

