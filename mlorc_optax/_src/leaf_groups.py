"""The order in which compressed matrices are visited: one loop per group of same-shaped matrices.

Compressed parameters whose matrices share (m, n), dtypes, state layout and
sharding form a group, processed by one `jax.lax.scan` over all of the
group's matrices (the layers of an unrolled model, and the batch axes of
stacked ones). The compiled program then holds one copy of the per-matrix
work per group, not per matrix, so compile time stays flat as the model
gets deeper.

A loop only returns small per-matrix results (new factors, fills): each step
reads its gradient with a `lax.switch` over the group's members (one matrix
is copied, the group is never stacked). Full-size results (the update) are
computed outside the loops, elementwise, where XLA fuses them into their
consumers: a loop's full-size outputs would all stay alive until the rest of
an optax chain consumes them. Groups run one after the other
(`xla_steering.serialize_after`), so the transient memory is one matrix's.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlorc_optax._src import xla_steering
from mlorc_optax._src.randomized_svd import LowRankFactors


class Leaf(NamedTuple):
  """One parameter's inputs to a pass.

  Attributes:
    index: its position among the parameters (it seeds its random keys).
    g: its gradient; as (B, m, n) matrices when compressed.
    p: its parameter, shaped like g, or None.
    entries: its state entries: factors with a leading B axis and other
      arrays with a leading B axis when compressed, full arrays otherwise.
    compressed: whether it is seen as matrices.
  """

  index: int
  g: jax.Array
  p: jax.Array | None
  entries: dict[str, Any]
  compressed: bool


def _is_factors(x: Any) -> bool:
  return isinstance(x, LowRankFactors)


def _split_entries(entries: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(factor entries, other entries)."""
  factors = {k: v for k, v in entries.items() if _is_factors(v)}
  return factors, {k: v for k, v in entries.items() if not _is_factors(v)}


def _signature(tree: Any) -> Any:
  """Shapes past the leading axis and dtypes of a tree's arrays, and its structure."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((x.shape[1:], x.dtype, str(jax.typeof(x).sharding.spec)) for x in leaves)


def _group_key(leaf: Leaf) -> Any:
  return _signature((leaf.g, leaf.p, leaf.entries))


def groups(leaves: list[Leaf]) -> list[list[Leaf]]:
  """The compressed leaves grouped by signature, in order of first appearance."""
  found: dict[Any, list[Leaf]] = {}
  for leaf in leaves:
    if leaf.compressed:
      found.setdefault(_group_key(leaf), []).append(leaf)
  return list(found.values())


def _used_inputs(fn: Callable[..., Any], args: list[jax.Array]) -> list[bool]:
  """Which of the arrays `args` the traced fn(*args) reads."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  read |= {id(v) for v in jaxpr.outvars}
  return [id(v) in read for v in jaxpr.invars]


def _index(tree: Any, b: jax.Array) -> Any:
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, b, keepdims=False), tree)


def _read(members: tuple[Any, ...], j: jax.Array, b: jax.Array) -> Any:
  """Matrix b of member j, copying one matrix only."""
  if len(members) == 1:
    return _index(members[0], b)
  branches = [functools.partial(lambda k, ms, b: _index(ms[k], b), k) for k in range(len(members))]
  return jax.lax.switch(j, branches, members, b)


MatrixFn = Callable[..., Any]


def _map_group(members: list[Leaf], fn: MatrixFn, key: jax.Array, xs: list[Any], after: Any):
  """fn(key, g, p, entries, x) on every matrix of a group: per member its
  results stacked, and all results stacked.

  `xs` holds, per member, extra small inputs with a leading batch axis.
  """
  sizes = [m.g.shape[0] for m in members]
  j_of = jnp.asarray(np.repeat(np.arange(len(members)), sizes), jnp.int32)
  b_of = jnp.asarray(np.concatenate([np.arange(s) for s in sizes]), jnp.int32)
  i_of = jnp.asarray(np.repeat([m.index for m in members], sizes), jnp.int32)
  split = [_split_entries(m.entries) for m in members]
  small = [(f, x) for (f, _), x in zip(split, xs)]
  small = jax.tree.map(lambda *ys: jnp.concatenate(ys), *small)
  small = xla_steering.serialize_after(after, small)
  big = [jax.tree.flatten((m.g, m.p, others)) for m, (_, others) in zip(members, split)]
  big_def = big[0][1]
  columns = list(zip(*[leaves for leaves, _ in big]))  # per array: its members

  def matrix(j, b, i, factors, extra, read):
    g, p, others = big_def.unflatten([read(n, j, b) for n in range(len(columns))])
    key_m = jax.random.fold_in(jax.random.fold_in(key, i), b)
    return fn(key_m, g, p, {**others, **factors}, extra)

  # One switch per array the step reads; an unused one (the parameter, the
  # gradient in the fill pass) stands as the first member's first matrix,
  # which XLA drops: every switch branch is a computation of its own to
  # compile. (A real slice, not zeros, so that it keeps its sharding.)
  stand_in = lambda n, j, b: _index(columns[n][0], 0)
  first = jax.tree.map(lambda x: x[0], small)
  used = _used_inputs(lambda *arrays: matrix(
      0, 0, 0, *first, lambda n, j, b: arrays[n]), [stand_in(n, 0, 0) for n in range(len(columns))])
  read = lambda n, j, b: _read(columns[n], j, b) if used[n] else stand_in(n, j, b)

  def body(carry, x):
    j, b, i, (factors, extra) = x
    return carry, matrix(j, b, i, factors, extra, read)

  _, ys = jax.lax.scan(body, (), (j_of, b_of, i_of, small))
  bounds = np.cumsum([0] + sizes)
  return [jax.tree.map(lambda y: y[bounds[k]:bounds[k + 1]], ys) for k in range(len(members))], ys


def map_matrices(
    leaves: list[Leaf], fn: MatrixFn, key: jax.Array, xs: dict[int, Any] | None = None
) -> dict[int, Any]:
  """fn on every matrix of every compressed leaf, one group after the other.

  Args:
    leaves: the parameters' inputs; those not compressed are skipped.
    fn: ``(key, g, p, entries, x) -> small results`` for one matrix, where
      entries hold factors and x is the matrix's slice of `xs`.
    key: matrix b of parameter i gets ``fold_in(fold_in(key, i), b)``.
    xs: optional extra inputs per leaf index, with a leading batch axis.

  Returns:
    Per compressed leaf index, the results with a leading batch axis.
  """
  return map_matrices_and_last(leaves, fn, key, xs)[0]


def map_matrices_and_last(
    leaves: list[Leaf], fn: MatrixFn, key: jax.Array, xs: dict[int, Any] | None = None
) -> tuple[dict[int, Any], Any]:
  """`map_matrices`, and the last group's stacked results, which are
  computed after every other group's: what to `serialize_after` to wait for
  all of them at the cost of one read."""
  results, done = {}, ()
  for members in groups(leaves):
    extra = [None if xs is None else xs[m.index] for m in members]
    outs, done = _map_group(members, fn, key, extra, done)
    results.update({m.index: out for m, out in zip(members, outs)})
  return results, done
