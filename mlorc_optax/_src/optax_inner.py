"""An optax transformation seen one parameter at a time (a `LeafwiseTransformation`).

Where an optax transformation's state holds parameter-shaped trees (its
moments) is found as `optax.tree.map_params` finds it: by initialising it on
a placeholder that stands for the parameters. Those trees are the moments;
every other entry (the step count) is global state, whose next value comes
from running the transformation on an empty tree.
"""

from typing import Any, NamedTuple, Sequence

import jax
import optax

from mlorc_optax._src.leafwise import LeafwiseTransformation


@jax.tree_util.register_pytree_node_class
class _ParamsSlot:
  """Stands for the parameters when asking an init function where it puts them."""

  def tree_flatten(self):
    return (), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux, children
    return cls()


def _is_slot(x: Any) -> bool:
  return isinstance(x, _ParamsSlot)


def _entry_name(path) -> str:
  return '/'.join(str(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', k)))) for k in path)


class StateLayout(NamedTuple):
  """Where an optax state holds parameter-shaped trees (its moments)."""

  treedef: Any
  slots: tuple[int, ...]  # entries of the flattened state that are moment trees
  names: tuple[str, ...]  # per slot: its path in the state, e.g. 'mu'

  @classmethod
  def of(cls, inner: optax.GradientTransformation) -> 'StateLayout':
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(
        inner.init(_ParamsSlot()), is_leaf=_is_slot
    )
    found = [(i, _entry_name(path)) for i, (path, leaf) in enumerate(paths_and_leaves) if _is_slot(leaf)]
    return cls(treedef, tuple(i for i, _ in found), tuple(n for _, n in found))

  def split(self, state: Any) -> tuple[list[Any], list[Any]]:
    """(moments, other entries) of a state of the transformation."""
    entries = self.treedef.flatten_up_to(state)
    moments = [entries[j] for j in self.slots]
    return moments, [e for j, e in enumerate(entries) if j not in self.slots]

  def join(self, moments: Sequence[Any], others: Sequence[Any]) -> Any:
    """Inverse of `split`."""
    moments, others = iter(moments), iter(others)
    return self.treedef.unflatten(
        [next(moments) if j in self.slots else next(others) for j in range(self.treedef.num_leaves)]
    )


def as_leafwise(
    inner: optax.GradientTransformation,
    nonnegative: Sequence[str],
    extra_args: dict[str, Any] | None = None,
) -> tuple[LeafwiseTransformation, StateLayout]:
  """`inner` as a `LeafwiseTransformation` whose entries are its moment slots.

  A slot is non-negative when a name in its state path is in `nonnegative`.
  """
  layout = StateLayout.of(inner)
  extra_args = extra_args or {}
  nonneg = tuple(n for n in layout.names if set(n.split('/')) & set(nonnegative))

  def init_leaf(param):
    moments, _ = layout.split(inner.init(param))
    return dict(zip(layout.names, moments))

  def init_global(params):
    del params
    return layout.split(inner.init({}))[1]

  def update_leaf(g, p, entries, glob, glob_mid):
    del glob_mid
    state = layout.join([entries[n] for n in layout.names], glob)
    u, new_state = inner.update(g, state, p, **extra_args)
    return u, dict(zip(layout.names, layout.split(new_state)[0])), ()

  def finalize(glob, stats):
    del stats
    empty = layout.join([{} for _ in layout.names], glob)
    return layout.split(inner.update({}, empty, {}, **extra_args)[1])[1]

  lw = LeafwiseTransformation(
      init_leaf=init_leaf, init_global=init_global, update_leaf=update_leaf,
      finalize=finalize, moments=layout.names, nonnegative=nonneg,
  )
  return lw, layout
