"""Optimizers written one parameter at a time, with optional global statistics.

Most optimizers treat each parameter on its own, and `compress_moments` can
wrap them as plain optax transformations. Some couple the parameters through
a few global scalars: Prodigy's and D-Adaptation's step size d is estimated
from sums over all parameters. A `LeafwiseTransformation` spells out that
structure, so that `compress_moments` can still visit one parameter at a time
(transient memory bounded by one matrix) and update the global state once:

1. optional pre-pass: ``pre = sum over parameters of prepare_leaf(g, p, entries, glob)``,
   then ``glob_mid = prepare(glob, pre)`` (for updates that need this step's
   global result, as Prodigy's ``d * eps``);
2. main pass: ``u, new_entries, stats = update_leaf(g, p, entries, glob, glob_mid)``;
3. ``new_glob = finalize(glob_mid, sum over parameters of stats)``.

`full_state_transformation` runs one as an ordinary full-state optax transformation;
`compress_moments` runs it with the entries named in `moments` stored as
low-rank factors. At full rank the two agree exactly.

What `compress_moments` relies on:

- For a compressed parameter, `init_leaf` and `update_leaf` see one matrix
  (m, n) of its view at a time (vmapped at init, mapped at update), and for
  any other parameter the whole array. So an entry's shape must follow from
  the shape of the array given (e.g. CAME's row statistics, ``shape[:-1]``),
  leading axes beyond two must be treated as batch axes, and an entry a
  parameter does not use should be a placeholder of one element (an empty
  one does not reshape along batch axes).
- Entries not named in `moments` are stored as they are: small ones (factored
  statistics), or a full copy where an approximation would not do (Prodigy's
  initial parameters; say so in the optimizer's memory notes).
- Without parameters the summed stats are ``()``; `prepare` and `finalize`
  must accept that.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class LeafwiseTransformation(NamedTuple):
  """An optimizer written for one parameter, plus global state.

  Attributes:
    init_leaf: ``param -> dict`` of the parameter's own state entries.
    init_global: ``params -> pytree`` of global state (small arrays; an
      optimizer that needs the step count keeps its own there).
    update_leaf: ``(g, p, entries, glob, glob_mid) -> (update, new_entries,
      stats)``; stats is a pytree of arrays summed over parameters.
    finalize: ``(glob_mid, summed_stats) -> new_glob``.
    moments: names of the entries that are parameter-shaped moments, which
      `compress_moments` may store as factors; other entries are kept as they
      are.
    nonnegative: names among `moments` of non-negative moments, repaired
      after reconstruction.
    prepare_leaf: optional ``(g, p, entries, glob) -> pre_stats`` of a
      read-only pre-pass; None when the main pass needs no global result.
    prepare: ``(glob, summed_pre_stats) -> glob_mid``; used with prepare_leaf.
  """

  init_leaf: Callable[[jax.Array], dict[str, jax.Array]]
  init_global: Callable[[Any], Any]
  update_leaf: Callable[..., tuple[jax.Array, dict[str, jax.Array], Any]]
  finalize: Callable[[Any, Any], Any]
  moments: tuple[str, ...]
  nonnegative: tuple[str, ...] = ()
  prepare_leaf: Callable[..., Any] | None = None
  prepare: Callable[[Any, Any], Any] | None = None


class LeafwiseState(NamedTuple):
  """State of a `LeafwiseTransformation`.

  Attributes:
    count: number of updates so far (int32).
    entries: dict mapping each entry name to a tree like the parameters.
    global_state: the transformation's global state.
  """

  count: jax.Array
  entries: dict[str, Any]
  global_state: Any


def sum_stats(stats: list[Any]) -> Any:
  """Elementwise sum of a list of equally structured stats trees; () if empty."""
  if not stats:
    return ()
  return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *stats)


def run_passes(
    lw: LeafwiseTransformation,
    leaves: list[tuple[jax.Array, jax.Array | None, dict[str, jax.Array]]],
    glob: Any,
) -> tuple[list[jax.Array], list[dict[str, jax.Array]], Any]:
  """The full-state reference: both passes over (g, p, entries) triples."""
  glob_mid = glob
  if lw.prepare_leaf is not None:
    glob_mid = lw.prepare(glob, sum_stats([lw.prepare_leaf(g, p, e, glob) for g, p, e in leaves]))
  results = [lw.update_leaf(g, p, e, glob, glob_mid) for g, p, e in leaves]
  updates, entries, stats = zip(*results) if results else ((), (), ())
  return list(updates), list(entries), lw.finalize(glob_mid, sum_stats(list(stats)))


def full_state_transformation(lw: LeafwiseTransformation) -> optax.GradientTransformationExtraArgs:
  """`lw` as an ordinary optax transformation with full state."""

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    per_leaf = [lw.init_leaf(p) for p in leaves]
    names = per_leaf[0].keys() if per_leaf else ()
    entries = {k: treedef.unflatten([e[k] for e in per_leaf]) for k in names}
    return LeafwiseState(jnp.zeros([], jnp.int32), entries, lw.init_global(params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    g_leaves, treedef = jax.tree.flatten(updates)
    p_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(g_leaves)
    per_name = {k: treedef.flatten_up_to(v) for k, v in state.entries.items()}
    leaves = [
        (g, p, {k: v[i] for k, v in per_name.items()})
        for i, (g, p) in enumerate(zip(g_leaves, p_leaves))
    ]
    new_updates, new_entries, glob = run_passes(lw, leaves, state.global_state)
    entries = {k: treedef.unflatten([e[k] for e in new_entries]) for k in per_name}
    return treedef.unflatten(new_updates), LeafwiseState(
        optax.safe_increment(state.count), entries, glob
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
