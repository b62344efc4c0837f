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
