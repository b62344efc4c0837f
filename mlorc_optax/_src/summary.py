"""A report of what an optimizer compresses: per parameter, its view, rank and bytes.

The numbers come from the optimizer's own state, built abstractly with
`jax.eval_shape(tx.init, params)`: a parameter-shaped tree in the state is a
moment tree, and a `LowRankFactors` in it is a compressed moment. This works
for any optax transformation, MLorc's inside chains and wrappers included.
"""

import itertools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src.randomized_svd import LowRankFactors


class ParameterSummary(NamedTuple):
  """What the optimizer state holds for one parameter.

  Attributes:
    path: the parameter's path, as 'blocks/0/attn/query/kernel'.
    shape: the parameter's shape.
    view: the `MatrixView` its moments are compressed through (found from
      the factors' shapes), or None for full moments.
    matrix: (batch_shape, m, n) of the compressed matrices, or None.
    rank: the rank of the stored factors, or None.
    state_bytes: bytes of its moments in the state.
    adam_bytes: bytes `optax.adam` keeps for it (two full moments).
  """

  path: str
  shape: tuple[int, ...]
  view: mv.MatrixView | None
  matrix: tuple[tuple[int, ...], int, int] | None
  rank: int | None
  state_bytes: int
  adam_bytes: int


class Summary(NamedTuple):
  """What an optimizer compresses, per parameter, with totals.

  Attributes:
    parameters: one `ParameterSummary` per parameter, in leaf order.
    other_bytes: bytes of the state not tied to a parameter (step counts).
    state_bytes: bytes of the whole state.
    adam_bytes: bytes of `optax.adam`'s whole state for the same parameters.
  """

  parameters: tuple[ParameterSummary, ...]
  other_bytes: int
  state_bytes: int
  adam_bytes: int

  @property
  def fraction(self) -> float:
    """The state's size as a fraction of `optax.adam`'s."""
    return self.state_bytes / self.adam_bytes if self.adam_bytes else float('nan')

  @property
  def compressed(self) -> int:
    """How many parameters have compressed moments."""
    return sum(p.matrix is not None for p in self.parameters)

  def table(self) -> str:
    """The report as a text table."""
    rows = [('parameter', 'shape', 'view', 'matrices', 'rank', 'state', 'Adam')]
    for p in self.parameters:
      if p.matrix is None:
        view, matrices, rank = 'full', '', '-'
      else:
        batch, m, n = p.matrix
        view = '?' if p.view is None else (
            ','.join(map(str, p.view.rows)) + '|' + ','.join(map(str, p.view.cols)))
        matrices = ('x'.join(map(str, batch)) + ' of ' if batch else '') + f'{m}x{n}'
        rank = str(p.rank)
      rows.append((p.path, str(p.shape), view, matrices, rank,
                   _human(p.state_bytes), _human(p.adam_bytes)))
    if self.other_bytes:
      rows.append(('(other state: step counts, ...)', '', '', '', '', _human(self.other_bytes), ''))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = (False, False, False, True, True, True, True)
    line = lambda r: '  '.join(
        c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(r, widths, right)
    ).rstrip()
    lines = [line(rows[0]), '-' * len(line(rows[0]))] + [line(r) for r in rows[1:]]
    lines.append(
        f'{self.compressed} of {len(self.parameters)} parameters compressed; state '
        f'{_human(self.state_bytes)} = {100 * self.fraction:.1f}% of optax.adam\'s '
        f'{_human(self.adam_bytes)}'
    )
    return '\n'.join(lines)

  def __str__(self) -> str:
    return self.table()


def _human(n: int) -> str:
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= size:
      return f'{n / size:.2f} {unit}'
  return f'{n} B'


def _nbytes(tree: Any) -> int:
  return int(sum(
      np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
  ))


def _is_boxed(x: Any) -> bool:
  """An NNX Variable or a Linen metadata box (nn.Partitioned)."""
  return hasattr(x, 'get_value') or (hasattr(x, 'unbox') and hasattr(x, 'replace_boxed'))


def _unbox(x: Any) -> Any:
  if hasattr(x, 'get_value'):
    return x.get_value()
  return x.unbox() if _is_boxed(x) else x


def _moment_trees(state: Any, treedef: Any, leaves: list[Any]) -> list[list[Any]]:
  """The parameter-shaped trees of `state`, each as its entries in leaf order."""
  found = []

  def entries_of(node):
    try:
      entries = treedef.flatten_up_to(node)
    except (ValueError, TypeError, KeyError):
      return None
    for p, e in zip(leaves, entries):
      if not isinstance(e, LowRankFactors) and getattr(e, 'shape', None) != p.shape:
        return None
    return entries

  def visit(node):
    entries = entries_of(node)
    if entries is not None:
      found.append(entries)
      return
    children = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)[0]
    if len(children) == 1 and children[0] is node:
      return
    for child in children:
      visit(child)

  visit(state)
  return found


def _all_views(ndim: int):
  """Every view of an `ndim`-D parameter: each axis a batch, row or column axis."""
  for roles in itertools.product((0, 1, 2), repeat=ndim):
    rows = tuple(a for a, r in enumerate(roles) if r == 1)
    cols = tuple(a for a, r in enumerate(roles) if r == 2)
    if rows and cols:
      yield mv.MatrixView(rows, cols)


def _view_of(shape, factors, candidates) -> mv.MatrixView | None:
  """The first candidate view that gives matrices of the factors' shapes."""
  target = (tuple(factors.u.shape[:-2]), factors.u.shape[-2], factors.v.shape[-2])
  for view in candidates:
    if view is not None and mv.matrix_shape(shape, view) == target:
      return view
  return None


def summarize(
    tx: optax.GradientTransformation,
    params: Any,
    *,
    compress: mv.CompressArg = None,
    print_table: bool = True,
) -> Summary:
  """Reports, per parameter, what the optimizer's state holds for it.

  For every parameter: its shape, the matrix view its moments are
  compressed through (or "full"), the rank of the factors, the bytes of its
  moments in the state, and the bytes `optax.adam` keeps for it; then the
  totals, against `optax.adam`'s whole state. The state is built with
  `jax.eval_shape`, so nothing is allocated and any optax transformation can
  be reported on (a full-state one shows every parameter "full").

  Example:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax as mlorc
    >>> params = {'kernel': jnp.zeros((512, 256)), 'bias': jnp.zeros(256)}
    >>> s = mlorc.summarize(mlorc.adamw(1e-3, rank=4), params, print_table=False)
    >>> [(p.path, p.view, p.rank) for p in s.parameters]
    [('bias', None, None), ('kernel', MatrixView(rows=(0,), cols=(1,)), 4)]
    >>> round(s.fraction, 3)
    0.025

  Args:
    tx: the optimizer (an MLorc transformation, or a chain or wrapper holding
      one, or any optax transformation).
    params: the parameters (arrays, shape structs, NNX Variables or Linen
      boxes), as given to `tx.init`.
    compress: the `compress` argument `tx` was built with, if any; it is used
      only to name the views (the bytes come from the state). The factors'
      shapes identify the view in most cases without it.
    print_table: print the report as a table.

  Returns:
    A `Summary`; `str(summary)` is the table.
  """
  params = jax.tree.map(_unbox, params, is_leaf=_is_boxed)
  structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(structs)
  paths = [p for p, _ in paths_leaves]
  leaves = [x for _, x in paths_leaves]
  state = jax.eval_shape(tx.init, structs)
  adam_bytes = _nbytes(jax.eval_shape(optax.adam(1e-3).init, structs))
  moments = _moment_trees(state, treedef, leaves)

  ranks = [e.u.shape[-1] for m in moments for e in m if isinstance(e, LowRankFactors)]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    named = treedef.flatten_up_to(
        mv.resolve_views(structs, compress, max(ranks, default=4))
    )
  others = {x.shape[-3:] for x in leaves if x.ndim >= 3}

  rows, moment_bytes = [], 0
  for i, (path, leaf) in enumerate(zip(paths, leaves)):
    entries = [m[i] for m in moments]
    nbytes = _nbytes(entries)
    moment_bytes += nbytes
    factors = next((e for e in entries if isinstance(e, LowRankFactors)), None)
    view = matrix = rank = None
    if factors is not None:
      candidates = itertools.chain(
          [named[i]], mv.shape_views(leaf.shape, others), _all_views(leaf.ndim)
      )
      view = _view_of(leaf.shape, factors, candidates)
      matrix = (tuple(factors.u.shape[:-2]), factors.u.shape[-2], factors.v.shape[-2])
      rank = factors.u.shape[-1]
    rows.append(ParameterSummary(
        mv.path_name(path), tuple(leaf.shape), view, matrix, rank, nbytes,
        2 * _nbytes(leaf),
    ))
  total = _nbytes(state)
  summary = Summary(tuple(rows), total - moment_bytes, total, adam_bytes)
  if print_table:
    print(summary.table())
  return summary
