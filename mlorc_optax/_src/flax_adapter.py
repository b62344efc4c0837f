"""The Flax adapter: moments of parameters held in metadata boxes (NNX Variables).

`nnx.Optimizer` copies a parameter's metadata, its sharding among it, onto
every state leaf under that parameter. A parameter's (m, n) sharding does
not fit its factors, so each factor gets a box of its own whose sharding
names fit its shape: U keeps the parameter's row axis, V its column axis,
s neither; batch axes keep theirs. The box is recognised by its interface
(`get_metadata`, `replace`), so no Flax import is needed.
"""

from typing import Any, Sequence

import jax

from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src.randomized_svd import LowRankFactors


def is_box(x: Any) -> bool:
  return hasattr(x, 'get_metadata') and hasattr(x, 'replace')


def _factor_shardings(names: Sequence[Any], view: mv.MatrixView):
  batch, rows, cols = mv.view_axes(view, len(names))
  single = lambda axes: names[axes[0]] if len(axes) == 1 else None
  lead = tuple(names[a] for a in batch)
  return lead + (single(rows), None), lead + (None,), lead + (single(cols), None)


def _boxed_factors(box: Any, factors: LowRankFactors, view: mv.MatrixView) -> LowRankFactors:
  names = box.get_metadata().get('out_sharding')
  if not names:
    return LowRankFactors(*(box.replace(x) for x in factors))
  specs = _factor_shardings(tuple(names), view)
  return LowRankFactors(*(box.replace(x, out_sharding=s) for x, s in zip(factors, specs)))


def place(params: Any, moments: Sequence[Any], views: Sequence[Any]) -> Any:
  """A tree like `params` holding `moments` (in leaf order), boxed like the parameters."""
  entries = iter(zip(moments, views))

  def put(node):
    moment, view = next(entries)
    if not is_box(node):
      return moment
    if isinstance(moment, LowRankFactors):
      return _boxed_factors(node, moment, view)
    return node.replace(moment)

  return jax.tree.map(put, params, is_leaf=is_box)


def as_moment(x: Any) -> Any:
  """A full moment, or its factors; Flax NNX's Optimizer stores a factor
  triple as a State with keys 'u', 's', 'v', which reads back here."""
  if hasattr(x, "shape") or isinstance(x, LowRankFactors):
    return x
  return LowRankFactors(u=x['u'], s=x['s'], v=x['v'])


def _einsum_view(einsum_str: str) -> mv.MatrixView | None:
  """The kernel's view in an 'inputs,kernel->output' einsum (nnx.Einsum's form).

  Kernel axes summed against the input are rows, axes that reach the output
  only through the kernel are columns, axes shared by all three are batch.
  """
  operands, _, out = einsum_str.replace(' ', '').partition('->')
  parts = operands.split(',')
  if len(parts) != 2 or '.' in parts[1] or not out:
    return None
  x, k = parts
  rows = tuple(i for i, c in enumerate(k) if c not in out)
  cols = tuple(i for i, c in enumerate(k) if c in out and c not in x)
  return mv.MatrixView(rows, cols) if rows and cols else None


def _declared_view(module: Any, name: str) -> tuple[mv.MatrixView, int] | None:
  """The view of `module`'s parameter `name` by the module's own layout, and
  the number of axes the layout has (before any stacking)."""
  from flax import nnx  # only for users of this function

  if name == 'embedding':
    return (mv.MatrixView(0, 1), 2) if isinstance(module, nnx.Embed) else None
  if isinstance(module, nnx.Linear):
    return mv.MatrixView(0, 1), 2
  if isinstance(module, nnx.LinearGeneral):
    nb, ni, no = len(module.batch_axis), len(module.in_features), len(module.out_features)
    return mv.MatrixView(tuple(range(nb, nb + ni)), tuple(range(nb + ni, nb + ni + no))), nb + ni + no
  if isinstance(module, nnx.Einsum):
    view = _einsum_view(module.einsum_str)
    kernel = module.einsum_str.replace(' ', '').partition('->')[0].split(',')[-1]
    return (view, len(kernel)) if view is not None else None
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    size = module.kernel_size
    spatial = 1 if isinstance(size, int) else len(size)
    return mv.MatrixView(tuple(range(spatial + 1)), spatial + 1), spatial + 2
  return None


def nnx_views(model: Any, *, min_dim_size: int | None = None):
  """Reads a Flax NNX model's layers and returns their exact views, for `compress`.

  The kernels of `nnx.Linear`, `nnx.LinearGeneral` (so `nnx.MultiHeadAttention`),
  `nnx.Einsum`, `nnx.Conv`, `nnx.ConvTranspose` and the table of `nnx.Embed`
  get the view their layer declares: input axes as rows, output axes as
  columns, `LinearGeneral`'s batch axes and the leading layer axes of
  stacked (`nnx.vmap`) layers as batch axes. An Einsum kernel's rows are the
  axes it contracts with the input. Such a kernel is compressed when its
  matrices have both sides at least `min_dim_size`; every other parameter
  follows the default policy's rule. This removes the guesses of the shape
  rule, for Einsum kernels such as Gemma's (heads, features, head_dim) query
  and for 1-D convolutions.

  Example:
    >>> from flax import nnx
    >>> import mlorc_optax as mlorc
    >>> model = nnx.Einsum('btd,ndh->btnh', (8, 256, 32), rngs=nnx.Rngs(0))
    >>> views = mlorc.nnx_views(model)
    >>> tx = mlorc.adamw(1e-3, rank=4, compress=views)
    >>> s = mlorc.summarize(tx, nnx.state(model, nnx.Param), compress=views,
    ...                     print_table=False)
    >>> s.parameters[0].view
    MatrixView(rows=(1,), cols=(0, 2))

  Args:
    model: an NNX module (or any graph node holding modules).
    min_dim_size: the smallest matrix side compressed; None for the library
      default (`DEFAULT_MIN_DIM_SIZE`).

  Returns:
    A callable mapping the parameters (as `nnx.Optimizer` hands them to
    `init` and `update`) to a tree of views, to pass as `compress`.
  """
  from flax import nnx  # only for users of this function

  threshold = mv.DEFAULT_MIN_DIM_SIZE if min_dim_size is None else min_dim_size
  declared = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      for name in ('kernel', 'embedding'):
        value = getattr(node, name, None)
        found = _declared_view(node, name) if isinstance(value, nnx.Variable) else None
        if found is not None:
          declared[tuple(map(str, path)) + (name,)] = found

  def views(params):
    others = {
        tuple(x.shape[-3:]) for x in jax.tree.leaves(params) if len(x.shape) >= 3
    }

    def view_of(path, leaf):
      shape = tuple(leaf.shape)
      key = tuple(mv._key_name(k) for k in mv._trim(path))
      if key in declared:
        view, ndim = declared[key]
        extra = len(shape) - ndim  # leading axes of stacked layers
        if extra >= 0:
          view = mv.MatrixView(
              tuple(a + extra for a in view.rows), tuple(a + extra for a in view.cols)
          )
          _, m, n = mv.matrix_shape(shape, view)
          return view if min(m, n) >= threshold else False
      if mv.leaf_name(path) in mv.UNCOMPRESSED_NAMES:
        return False
      return mv.view_by_shape(shape, threshold, others) or False

    return jax.tree_util.tree_map_with_path(view_of, params)

  return views
