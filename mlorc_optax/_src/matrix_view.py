"""Which parameters are compressed, and how an N-D parameter is seen as matrices.

A `MatrixView` names the axes that form a matrix's rows and columns; every
other axis is a batch axis, so each slice along it is compressed on its own
(the layers of a scanned model).

The default policy (`default_view`) reads Flax's kernel layouts from the
shapes alone: Dense (in, out), attention query/key/value (embed, heads,
head_dim) and output (heads, head_dim, embed), Conv (kh, kw, in, out) and
Embed (vocab, features), each with optional leading layer axes.
"""

import math
import warnings
from typing import Any, Callable, Collection, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

# Matrices whose smaller side is below this keep full moments by default.
DEFAULT_MIN_DIM_SIZE = 64
# Flax's names for biases and normalisation scales: never compressed by default,
# stacked or not.
UNCOMPRESSED_NAMES = ('bias', 'scale')


def _axes(name: str, axes: Any) -> tuple[int, ...]:
  """An int or a sequence of ints as a tuple of ints."""
  if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool):
    return (int(axes),)
  try:
    out = tuple(axes)
  except TypeError:
    out = None
  if not out or not all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in out
  ):
    raise TypeError(
        f'MatrixView `{name}` must be an int or a non-empty sequence of ints, '
        f'got {axes!r}.'
    )
  return tuple(int(a) for a in out)


class _MatrixViewFields(NamedTuple):
  rows: tuple[int, ...]
  cols: tuple[int, ...]


class MatrixView(_MatrixViewFields):
  """Axes of a parameter flattened into the rows and the columns of a matrix.

  Axes in neither field are batch axes: each slice along them is a matrix of
  its own. Negative axes count from the end; an int stands for a 1-tuple.

  Flax kernel layouts:
    - Dense (in, out): ``MatrixView(0, 1)``; scanned (layers, in, out):
      ``MatrixView(1, 2)`` or ``MatrixView(-2, -1)``
    - attention q/k/v (embed, heads, head_dim): ``MatrixView(0, (1, 2))``
    - attention out (heads, head_dim, embed): ``MatrixView((0, 1), 2)``
    - Conv (kh, kw, in, out): ``MatrixView((0, 1, 2), 3)``

  Example:
    >>> import mlorc_optax as mlorc
    >>> mlorc.MatrixView(rows=0, cols=(1, 2))
    MatrixView(rows=(0,), cols=(1, 2))

  Args:
    rows: the axes whose sizes multiply to the matrix's row count, in order.
    cols: the axes whose sizes multiply to its column count, in order.
  """

  __slots__ = ()

  def __new__(cls, rows: int | Sequence[int] = (-2,), cols: int | Sequence[int] = (-1,)):
    rows, cols = _axes('rows', rows), _axes('cols', cols)
    return super().__new__(cls, rows, cols)


# Per leaf: a MatrixView, True (the shape rule's view), or False/None (full).
ViewSpec = Union[MatrixView, bool, None]
CompressArg = Union[None, Any, Callable[[Any], Any]]


def view_axes(view: MatrixView, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(batch, row, column) axes of an `ndim`-D parameter seen through `view`.

  Raises ValueError for an axis outside [-ndim, ndim) or an axis named twice.
  """
  named = view.rows + view.cols
  bad = [a for a in named if not -ndim <= a < ndim]
  if bad:
    raise ValueError(
        f'{view} names axis {bad[0]}, out of range for a {ndim}-D parameter '
        f'(axes lie in [{-ndim}, {ndim})).'
    )
  rows = tuple(a % ndim for a in view.rows)
  cols = tuple(a % ndim for a in view.cols)
  if len(set(rows + cols)) != len(named):
    raise ValueError(f'{view} names an axis twice for a {ndim}-D parameter.')
  batch = tuple(a for a in range(ndim) if a not in rows + cols)
  return batch, rows, cols


def matrix_shape(shape: Sequence[int], view: MatrixView) -> tuple[tuple[int, ...], int, int]:
  """Returns (batch_shape, m, n) of `shape` seen through `view`."""
  shape = tuple(shape)
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


def saves_memory(shape: Sequence[int], view: MatrixView, rank: int) -> bool:
  """Whether rank-`rank` factors hold fewer numbers than the full moment.

  Per matrix of shape (m, n) the factors hold r (m + n + 1) numbers, with
  r = min(rank, m, n), against m n for the moment itself.
  """
  _, m, n = matrix_shape(shape, view)
  return min(rank, m, n) * (m + n + 1) < m * n


def _best_split(shape: tuple[int, ...]) -> MatrixView:
  """Leading axes as rows, the rest as columns, with the largest smaller side."""
  size = lambda axes: math.prod(shape[a] for a in axes)
  ndim = len(shape)
  k = max(range(1, ndim), key=lambda k: (min(size(range(k)), size(range(k, ndim))), k))
  return MatrixView(tuple(range(k)), tuple(range(k, ndim)))


def shape_views(shape: Sequence[int], other_shapes: Collection[tuple[int, ...]] = ()) -> list[MatrixView]:
  """The shape rule's candidate views of a parameter, most likely first.

  For a shape ``(*batch, a, b, c)`` (any number of leading batch axes):

  1. ``a == b * c``: attention query/key/value (embed, heads, head_dim),
     rows ``a``, columns ``(b, c)``;
  2. ``c == a * b`` and `other_shapes` holds ``(..., c, a, b)``, the query
     kernel of the same attention: attention output (heads, head_dim, embed),
     rows ``(a, b)``, columns ``c``. Without that kernel the shape is taken as
     a scanned Dense kernel (layers, d, layers * d);
  3. 3 axes: a scanned Dense or Embed kernel, (layers, in, out);
  4. rows the leading axes, columns the trailing ones, split where the
     smaller side is largest: a Conv (kh, kw, in, out) kernel gives rows
     (kh, kw, in), columns out.

  A 2-D shape has the one view rows 0, columns 1; a 0-D or 1-D shape none.

  Args:
    shape: the parameter's shape.
    other_shapes: the trailing three sizes of every parameter of 3 or more axes
      in the same tree (for rule 2).

  Returns:
    Candidate views with non-negative axes.
  """
  shape = tuple(int(d) for d in shape)
  ndim = len(shape)
  if ndim < 2:
    return []
  if ndim == 2:
    return [MatrixView(0, 1)]
  lead = ndim - 3
  a, b, c = shape[-3:]
  views = []
  if a == b * c:
    views.append(MatrixView(lead, (lead + 1, lead + 2)))
  if c == a * b and (c, a, b) in other_shapes:
    views.append(MatrixView((lead, lead + 1), lead + 2))
  if ndim == 3:
    views.append(MatrixView(1, 2))
  views.append(_best_split(shape))
  return list(dict.fromkeys(views))


def view_by_shape(
    shape: Sequence[int], min_dim_size: int = 0, other_shapes: Collection[tuple[int, ...]] = ()
) -> MatrixView | None:
  """The first of `shape_views` whose matrices have both sides >= `min_dim_size`."""
  for view in shape_views(shape, other_shapes):
    _, m, n = matrix_shape(shape, view)
    if min(m, n) >= min_dim_size:
      return view
  return None


def default_view(
    shape: Sequence[int],
    rank: int,
    min_dim_size: int | None = None,
    *,
    name: str = '',
    other_shapes: Collection[tuple[int, ...]] = (),
) -> MatrixView | None:
  """The default policy: the shape rule's view, where it pays off.

  A parameter is compressed unless it is named ``bias`` or ``scale``, when
  `view_by_shape` finds a view whose matrices have both sides at least
  `min_dim_size` and whose rank-`rank` factors hold fewer numbers than the
  moment (r (m + n + 1) < m n). Vectors, scalars, small matrices, and the
  stacked (layers, d) biases and scales of scanned models keep full moments.

  Example:
    >>> import mlorc_optax as mlorc
    >>> mlorc.default_view((512, 8, 64), rank=4)  # attention query
    MatrixView(rows=(0,), cols=(1, 2))
    >>> mlorc.default_view((6, 512, 2048), rank=4)  # 6 scanned Dense layers
    MatrixView(rows=(1,), cols=(2,))
    >>> mlorc.default_view((3, 3, 64, 128), rank=4)  # Conv
    MatrixView(rows=(0, 1, 2), cols=(3,))
    >>> print(mlorc.default_view((6, 512), rank=4))  # stacked biases
    None

  Args:
    shape: the parameter's shape.
    rank: the compression rank.
    min_dim_size: the smallest matrix side compressed; None for
      `DEFAULT_MIN_DIM_SIZE` (64).
    name: the parameter's name (the last entry of its path).
    other_shapes: see `shape_views`.
  """
  if min_dim_size is None:
    min_dim_size = DEFAULT_MIN_DIM_SIZE
  if name in UNCOMPRESSED_NAMES:
    return None
  view = view_by_shape(shape, min_dim_size, other_shapes)
  if view is None or not saves_memory(shape, view, rank):
    return None
  return view


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _trim(path: Sequence[Any]) -> tuple[Any, ...]:
  """The path without a trailing `.value`, the field of a metadata box."""
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    return path[:-1]
  return path


def path_name(path: Sequence[Any]) -> str:
  """A parameter's path as 'a/b/0/kernel' (an NNX Variable's `.value` dropped)."""
  return '/'.join(_key_name(k) for k in _trim(path)) or '(root)'


def leaf_name(path: Sequence[Any]) -> str:
  """The last entry of a parameter's path ('kernel', 'bias', ...)."""
  path = _trim(path)
  return _key_name(path[-1]) if path else ''


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, 'shape', None) or jnp.shape(leaf))


def _is_float(leaf: Any) -> bool:
  dtype = getattr(leaf, 'dtype', None)
  return jnp.issubdtype(dtype if dtype is not None else jnp.result_type(leaf), jnp.floating)


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, (bool, MatrixView))


def resolve_views(
    params: Any, compress: CompressArg, rank: int, min_dim_size: int | None = None
) -> Any:
  """A tree like `params` holding each leaf's `MatrixView`, or None if not compressed.

  The views returned have non-negative axes. Non-floating leaves are never
  compressed. Explicit entries whose factors would hold as many numbers as
  the moment, or more, are compressed as asked, with a warning naming them.

  Example:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax as mlorc
    >>> params = {'attn': {'kernel': jnp.zeros((128, 4, 32)), 'bias': jnp.zeros((4, 32))}}
    >>> mlorc.resolve_views(params, None, rank=4)
    {'attn': {'bias': None, 'kernel': MatrixView(rows=(0,), cols=(1, 2))}}
    >>> mlorc.resolve_views(params, {'attn': {'kernel': mlorc.MatrixView(-3, (-2, -1)),
    ...                                       'bias': False}}, rank=4)['attn']['kernel']
    MatrixView(rows=(0,), cols=(1, 2))

  Args:
    params: parameters (or updates, or shape structs).
    compress: None for `default_view` on every leaf; a tree with the
      structure of `params` (or a prefix of it) whose entries are a
      `MatrixView`, True (compress every leaf of 2 or more axes under it,
      whatever its size or name, seen as `view_by_shape` sees it), or
      False/None (full moments); or a callable mapping `params` to such a
      tree.
    rank: the compression rank.
    min_dim_size: the `default_view` threshold; None for
      `DEFAULT_MIN_DIM_SIZE`.

  Raises:
    ValueError: naming the parameter's path, for a view whose axes do not fit
      it, or a `compress` tree that does not fit the parameters.
  """
  if min_dim_size is None:
    min_dim_size = DEFAULT_MIN_DIM_SIZE
  others = {
      _shape(x)[-3:] for x in jax.tree.leaves(params) if len(_shape(x)) >= 3
  }
  wasteful = []

  def resolve(spec: ViewSpec, path: tuple[Any, ...], leaf: Any) -> MatrixView | None:
    shape = _shape(leaf)
    if compress is None:
      return default_view(
          shape, rank, min_dim_size, name=leaf_name(path), other_shapes=others
      ) if _is_float(leaf) else None
    if spec is True:
      spec = view_by_shape(shape, min_dim_size, others) or view_by_shape(shape, 0, others)
    if spec is None or spec is False or not _is_float(leaf):
      return None
    try:
      batch, rows, cols = view_axes(spec, len(shape))
    except ValueError as e:
      raise ValueError(
          f'`compress` for parameter {path_name(path)!r} of shape {shape}: {e} '
          'Name each axis once, within range.'
      ) from None
    view = MatrixView(rows, cols)
    if not saves_memory(shape, view, rank):
      wasteful.append((path_name(path), shape, view))
    return view

  if compress is None:
    views = jax.tree_util.tree_map_with_path(lambda p, x: resolve(None, p, x), params)
  else:
    specs = compress(params) if callable(compress) else compress

    def resolve_subtree(path, spec, subtree):
      if not _is_spec(spec):
        raise TypeError(
            f'`compress` entries must be MatrixView, True, False or None; got '
            f'{spec!r} for {path_name(path)!r}.'
        )
      return jax.tree_util.tree_map_with_path(
          lambda p, x: resolve(spec, tuple(path) + tuple(p), x), subtree
      )

    try:
      views = jax.tree_util.tree_map_with_path(resolve_subtree, specs, params, is_leaf=_is_spec)
    except ValueError as e:
      if str(e).startswith('`compress`'):
        raise
      raise ValueError(
          '`compress` must be a tree with the structure of the parameters (or a '
          f'prefix of it), or a callable returning one: {e}'
      ) from e
  if wasteful:
    listed = '; '.join(
        f'{p!r} {s} seen as {matrix_shape(s, v)[1]}x{matrix_shape(s, v)[2]}'
        for p, s, v in wasteful
    )
    warnings.warn(
        f'`compress` asks for rank-{rank} factors that hold at least as many '
        f'numbers as the full moment for: {listed}. They are compressed as '
        'asked; for a memory saving lower the rank below mn / (m + n + 1), or '
        'pass False for these parameters.',
        stacklevel=2,
    )
  return views

