"""MLorc for any optimizer: keep its moments as low-rank factors.

`compress_moments` wraps an optax transformation (or a `LeafwiseTransformation`)
and runs `matrix_step` on every compressed matrix: reconstruct the stored
moments, run the optimizer's own update with them, compress the new moments.
How the parameters are visited (one loop per group of same-shaped matrices,
one group after the other) is `leaf_groups`; how an optax state is split into
moments and the rest is `optax_inner`.
"""

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlorc_optax._src import flax_adapter
from mlorc_optax._src import leaf_groups
from mlorc_optax._src import leafwise
from mlorc_optax._src import matrix_step
from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src import optax_inner
from mlorc_optax._src import tree_checks
from mlorc_optax._src import validation
from mlorc_optax._src import xla_steering
from mlorc_optax._src.leafwise import LeafwiseState, LeafwiseTransformation
from mlorc_optax._src.randomized_svd import LowRankFactors

DEFAULT_OVERSAMPLE = 0
DEFAULT_POWER_ITERS = 1


class CompressedMomentsState(NamedTuple):
  """State of `compress_moments`.

  Attributes:
    count: number of updates so far (int32); with the seed it determines the
      random test matrices of each step.
    inner_state: the inner transformation's state, in which each compressed
      parameter's moment is a `LowRankFactors` instead of a full array (for
      a `LeafwiseTransformation`, a `LeafwiseState`).
  """

  count: jax.Array
  inner_state: Any


def _is_factors(x: Any) -> bool:
  return isinstance(x, LowRankFactors)


class _Inner(NamedTuple):
  """The wrapped optimizer as a LeafwiseTransformation, and how its state is stored."""

  lw: LeafwiseTransformation
  layout: optax_inner.StateLayout | None  # None: stored as a LeafwiseState

  def entry_trees(self, inner_state) -> tuple[dict[str, Any], Any]:
    """({entry name: tree like the parameters}, global state)."""
    if self.layout is None:
      return dict(inner_state.entries), inner_state.global_state
    moments, others = self.layout.split(inner_state)
    return dict(zip(self.layout.names, moments)), others

  def state(self, entries: dict[str, Any], glob: Any, count: jax.Array) -> Any:
    if self.layout is None:
      return LeafwiseState(count, entries, glob)
    return self.layout.join([entries[n] for n in self.layout.names], glob)


def _wrap(inner, nonnegative, extra_args=None) -> _Inner:
  if isinstance(inner, LeafwiseTransformation):
    return _Inner(inner, None)
  return _Inner(*optax_inner.as_leafwise(inner, nonnegative, extra_args))


def _batch_flat(tree: Any, batch_shape: tuple[int, ...]) -> Any:
  size = int(np.prod(batch_shape, dtype=np.int64))  # not -1: entries may be empty
  return jax.tree.map(lambda x: x.reshape((size,) + x.shape[len(batch_shape):]), tree)


def _batch_shaped(tree: Any, batch_shape: tuple[int, ...]) -> Any:
  return jax.tree.map(lambda x: x.reshape(batch_shape + x.shape[1:]), tree)


def compress_moments(
    inner: optax.GradientTransformation | LeafwiseTransformation,
    rank: int = 4,
    *,
    nonnegative: Sequence[str] = ('nu',),
    compress: mv.CompressArg = None,
    min_dim_size: int | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
    residual_correction: Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Stores the parameter-shaped moments of `inner` as rank-`rank` factors.

  Per compressed matrix and step: reconstruct each moment M~ = U diag(s) V^T
  (repairing the negative entries of a non-negative one), run `inner`'s
  update with the full moments, and compress the new moments with
  `randomized_svd`; this step's update uses the full moments.

  The inner update is applied to one matrix at a time. That is exact for
  transformations that treat every parameter on its own, as optax's Adam,
  Lion, ADOPT, AdaBelief, RMSProp, SGD with momentum and their kin do.
  Optimizers that couple parameters through global statistics (Prodigy's
  step size) are written as a `LeafwiseTransformation`, which this also
  accepts.

  Numerics: a moment holding Inf or NaN entries is factored as
  `randomized_svd` documents (its factors stay finite). float16 parameters
  are updated in float32 inside the step (their g * g overflows float16) and
  the update is cast back; uncompressed float16 parameters keep optax's own
  behaviour.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.compress_moments(optax.scale_by_adam(), rank=2, min_dim_size=4)
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
    >>> state = tx.init(params)
    >>> state.inner_state.mu['w'].u.shape, state.inner_state.mu['b'].shape
    ((8, 2), (6,))
    >>> updates, state = tx.update(params, state, params)

  Args:
    inner: the optimizer whose moments to compress: an optax transformation,
      whose state's parameter-shaped trees (found as optax.tree.map_params
      finds them) are the moments, or a `LeafwiseTransformation`.
    rank: rank of the stored factors; a matrix with min(m, n) <= rank is
      stored exactly.
    nonnegative: names of the state fields that hold non-negative moments
      (``'nu'`` in optax's Adam family); their reconstructions are repaired.
      Ignored for a `LeafwiseTransformation`, which names its own.
    compress: which parameters to compress and how to view them as matrices:
      None for `default_view`, or a tree (or callable returning a tree) of
      `MatrixView` / True / False entries, see `resolve_views`.
    min_dim_size: smallest matrix side the default policy compresses (None:
      `matrix_view.DEFAULT_MIN_DIM_SIZE`, 64).
    oversample: extra test vectors of the randomized SVD (None: 0).
    power_iters: power iterations of the randomized SVD (None: 1).
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices; one per matrix and step are
      derived from it and the step count. May be traced.
    warm_start: start each step's sketch from the previous step's right
      factor (see `randomized_svd`); then power_iters=0 is usually enough.
    residual_correction: optional {moment name: w}. Compression discards
      R = m_t - U diag(s) V^T of each new moment m_t; with this, the update
      of a compressed matrix is computed with the stored moment M~ replaced
      by M~ + w R (the state is unchanged). `scale_by_adam`'s and
      `scale_by_lion`'s `residual_correction` set w; see there for the math.

  Returns:
    An `optax.GradientTransformationExtraArgs` with `CompressedMomentsState`.

  References:
    Shen et al., MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation, arXiv 2506.01897.
    Halko, Martinsson and Tropp, Finding Structure with Randomness, SIAM
    Review 2011.
  """
  rank = validation.check_positive_int('rank', rank)
  if min_dim_size is not None:
    min_dim_size = validation.check_non_negative_int('min_dim_size', min_dim_size)
  compressor = matrix_step.Compressor(
      rank=rank,
      oversample=validation.check_non_negative_int(
          'oversample', DEFAULT_OVERSAMPLE if oversample is None else oversample),
      power_iters=validation.check_non_negative_int(
          'power_iters', DEFAULT_POWER_ITERS if power_iters is None else power_iters),
      factor_dtype=validation.canonical_float_dtype('factor_dtype', factor_dtype),
      warm_start=bool(warm_start),
  )
  if isinstance(nonnegative, str):
    nonnegative = (nonnegative,)
  residual_weights = dict(residual_correction or {})
  for name, w in residual_weights.items():
    validation.check_non_negative(f'residual_correction[{name!r}]', w)
  if not isinstance(inner, LeafwiseTransformation):
    inner = optax.with_extra_args_support(inner)

  def views_of(tree):
    return mv.resolve_views(tree, compress, rank, min_dim_size)

  def init_leaf(lw, param, view, key):
    """A parameter's entries, its moments compressed when it has a view."""
    if view is None:
      return lw.init_leaf(param)
    batch_shape, _, _ = mv.matrix_shape(param.shape, view)
    matrices = mv.to_matrices(param, view)
    entries = jax.vmap(lw.init_leaf)(matrices)
    for j, name in enumerate(lw.moments):
      entries[name] = compressor(entries[name], jax.random.fold_in(key, j))
    return _batch_shaped(entries, batch_shape)

  def init_fn(params):
    wrapped = _wrap(inner, nonnegative)
    lw = wrapped.lw
    _check_residual_names(residual_weights, lw.moments)
    leaves, params_def = jax.tree.flatten(params)
    count = jnp.zeros([], jnp.int32)
    if not leaves:  # no parameters, or optax.tree.map_params's placeholder
      names = jax.eval_shape(lw.init_leaf, jax.ShapeDtypeStruct((2, 2), jnp.float32))
      entries = {n: params for n in names}
      return CompressedMomentsState(count, wrapped.state(entries, lw.init_global(params), count))
    views = params_def.flatten_up_to(views_of(params))
    key = jax.random.fold_in(jax.random.key(seed), 0)
    per_leaf = [
        init_leaf(lw, leaf, view, jax.random.fold_in(key, i * len(lw.moments)))
        for i, (leaf, view) in enumerate(zip(leaves, views))
    ]
    entries = {n: flax_adapter.place(params, [e[n] for e in per_leaf], views) for n in per_leaf[0]}
    return CompressedMomentsState(count, wrapped.state(entries, lw.init_global(params), count))

  def update_fn(updates, state, params=None, **extra_args):
    wrapped = _wrap(inner, nonnegative, extra_args)
    lw = wrapped.lw
    count = optax.safe_increment(state.count)
    entry_trees, glob = wrapped.entry_trees(state.inner_state)
    g_leaves, params_def = jax.tree.flatten(updates)
    _check_structures(updates, params, entry_trees)
    views = params_def.flatten_up_to(views_of(updates)) if g_leaves else []
    p_leaves = [None] * len(g_leaves) if params is None else params_def.flatten_up_to(params)
    per_name = {
        n: [flax_adapter.as_moment(x) for x in params_def.flatten_up_to(t)]
        for n, t in entry_trees.items()
    }
    leaves = _leaves(updates, p_leaves, per_name, views, lw.moments, rank)
    key = jax.random.fold_in(jax.random.key(seed), count)
    glob_mid, results, stats = _passes(lw, compressor, leaves, glob, key, residual_weights)

    out_updates, out_entries = _unflattened(updates, views, results, per_name)
    new_glob = lw.finalize(glob_mid, stats)
    return out_updates, CompressedMomentsState(count, wrapped.state(out_entries, new_glob, count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _leaves(updates, p_leaves, per_name, views, moments, rank) -> list[leaf_groups.Leaf]:
  """Each parameter's inputs to the passes; compressed ones as (B, m, n) matrices."""
  paths_and_g = jax.tree_util.tree_flatten_with_path(updates)[0]
  leaves = []
  for i, ((path, g), p, view) in enumerate(zip(paths_and_g, p_leaves, views)):
    entries = {n: per_name[n][i] for n in per_name}
    _check_leaf(jax.tree_util.keystr(path), g, entries, moments, view, rank)
    if view is None:
      leaves.append(leaf_groups.Leaf(i, g, p, entries, False))
      continue
    batch_shape = mv.matrix_shape(g.shape, view)[0]
    leaves.append(leaf_groups.Leaf(
        i, mv.to_matrices(g, view), None if p is None else mv.to_matrices(p, view),
        _batch_flat(entries, batch_shape), True,
    ))
  return leaves


def _unflattened(updates, views, results, per_name) -> tuple[Any, dict[str, Any]]:
  """The passes' (update, new entries) per leaf, back in the parameters' layout and tree."""
  g_leaves, params_def = jax.tree.flatten(updates)
  out_updates, out_entries = [], {n: [] for n in per_name}
  for view, g, (u, new) in zip(views, g_leaves, results):
    if view is not None:
      u = mv.from_matrices(u, view, g.shape)
      new = _batch_shaped(new, mv.matrix_shape(g.shape, view)[0])
    out_updates.append(u)
    for n in out_entries:
      out_entries[n].append(new[n])
  return params_def.unflatten(out_updates), {n: params_def.unflatten(e) for n, e in out_entries.items()}


def _batch_sum(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), tree)


def _passes(lw, compressor, leaves, glob, key, residual_weights):
  """All passes of one step over the parameters.

  1. the repair's fill of every non-negative moment;
  2. optionally the read-only pre-pass and `lw.prepare`;
  3. the new factors of every compressed matrix (a loop per group; without
     a pre-pass, the fills of 1. are found in the same loop);
  4. updates (corrected by `residual_weights`) and the other new entries,
     elementwise, and their stats.

  Returns (glob_mid, per leaf (update, new entries), summed stats).
  """
  def over_batch(fn, leaf, *args, **batched):
    """`fn` over the leaf's matrices; `args` shared, `batched` per matrix."""
    return jax.vmap(lambda g, p, e, f, kw: fn(lw, g, p, e, f, *args, **kw))(
        leaf.g, leaf.p, leaf.entries, fills[leaf.index], batched
    )

  glob_mid = glob
  if lw.prepare_leaf is None:
    both, last = leaf_groups.map_matrices_and_last(leaves, lambda k, g, p, e, _: _fills_and_factors(
        lw, compressor, k, g, p, e, glob, glob_mid), key)
    fills = {i: f for i, (f, _) in both.items()}
    factors = {i: x for i, (_, x) in both.items()}
  else:
    fills = leaf_groups.map_matrices(leaves, lambda k, g, p, e, x: matrix_step.negative_fills(lw, e), key)
    pre = [
        _batch_sum(over_batch(matrix_step.prepare, leaf, glob)) if leaf.compressed
        else lw.prepare_leaf(leaf.g, leaf.p, leaf.entries, glob)
        for leaf in leaves
    ]
    glob_mid = lw.prepare(glob, leafwise.sum_stats(pre))
    factors, last = leaf_groups.map_matrices_and_last(
        leaves,
        lambda k, g, p, e, f: matrix_step.new_factors(lw, compressor, k, g, p, e, f, glob, glob_mid),
        key, xs=fills,
    )

  # The updates are computed once the loops are done: otherwise XLA starts
  # them before the loops and keeps their full-size results alive meanwhile.
  waiting = iter(xla_steering.serialize_after(last, [leaf.entries for leaf in leaves if leaf.compressed]))
  results, stats = [], []
  for leaf in leaves:
    if leaf.compressed:
      leaf = leaf._replace(entries=next(waiting))
      corrected = dict(factors=factors[leaf.index]) if residual_weights else {}
      u, others, st = over_batch(matrix_step.update, leaf, glob, glob_mid, residual_weights, **corrected)
      results.append((u, {**others, **factors[leaf.index]}))
      stats.append(_batch_sum(st))
    else:
      u, new, st = lw.update_leaf(leaf.g, leaf.p, leaf.entries, glob, glob_mid)
      results.append((u, new))
      stats.append(st)
  return glob_mid, results, leafwise.sum_stats(stats)


def _fills_and_factors(lw, compressor, key, g, p, entries, glob, glob_mid):
  """Steps 1 and 3 of one matrix in one loop body: (fills, new factors)."""
  fills = matrix_step.negative_fills(lw, entries)
  return fills, matrix_step.new_factors(lw, compressor, key, g, p, entries, fills, glob, glob_mid)


def _check_residual_names(residual_weights, moments) -> None:
  unknown = sorted(set(residual_weights) - set(moments))
  if unknown:
    raise ValueError(
        f'residual_correction names {unknown}, which are not moments of the inner '
        f'optimizer; its moments are {list(moments)}.'
    )


_FIX = ('Call init with parameters of the same structure and shapes as the '
        'updates, and keep `compress` the same between init and update.')


def _check_structures(updates, params, entry_trees) -> None:
  if params is not None:
    tree_checks.check_matches(updates, params, '`params`', 'Pass parameters shaped like the updates.')
  for tree in entry_trees.values():
    tree_checks.check_matches(updates, tree, 'the optimizer state', _FIX)


def _check_leaf(path, g, entries, moments, view, rank) -> None:
  """Raises unless the leaf's stored moments fit its gradient and view."""
  for name in moments:
    moment = entries[name]
    if view is None:
      ok = not _is_factors(moment) and moment.shape == g.shape
      expected = g.shape
    else:
      batch_shape, m, n = mv.matrix_shape(g.shape, view)
      r = min(rank, m, n)
      expected = (batch_shape + (m, r), batch_shape + (n, r))
      ok = _is_factors(moment) and (moment.u.shape, moment.v.shape) == expected
    if not ok:
      found = (moment.u.shape, moment.v.shape) if _is_factors(moment) else moment.shape
      raise ValueError(
          f'`updates` do not match the optimizer state at {path}: an update of '
          f'shape {g.shape} needs a moment {name!r} of shape {expected}, the '
          f'state holds {found}. {_FIX}'
      )
