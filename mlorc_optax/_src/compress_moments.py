"""MLorc for any optax transformation: keep its moments as low-rank factors.

Per compressed parameter and step (arXiv 2506.01897):

1. reconstruct each stored moment, M~ = U diag(s) V^T;
2. for a non-negative moment (a second moment), replace its negative entries,
   artefacts of the low-rank reconstruction, by the mean of their magnitudes;
3. run the inner transformation's own update with the full moments;
4. compress the moments it returns with a randomized SVD of rank r.

The update of a step uses the fresh full moments; only their factors survive.

Memory: the inner update runs one parameter at a time, and over the batch
axes of a parameter (scanned layers) with `jax.lax.map`. Each parameter's
inputs carry a data dependency on the previous parameter's results (`_after`),
so the full-size moments alive at any moment belong to one matrix, never to
the whole model. An optimisation barrier is not enough: XLA:CPU expands it
before its concurrency-first scheduler, which then starts every parameter's
reconstruction at once.
"""

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from mlorc_optax._src import validation
from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src import flax_adapter
from mlorc_optax._src import repair
from mlorc_optax._src.randomized_svd import LowRankFactors, randomized_svd, reconstruct


class CompressedMomentsState(NamedTuple):
  """State of `compress_moments`.

  Attributes:
    count: number of updates so far (int32); with the seed it determines the
      random test matrices of each step.
    inner_state: the inner transformation's state, in which each compressed
      parameter's moment is a `LowRankFactors` instead of a full array.
  """

  count: jax.Array
  inner_state: Any


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


def _is_factors(x: Any) -> bool:
  return isinstance(x, LowRankFactors)


class _Layout(NamedTuple):
  """Where the inner state holds parameter-shaped trees (its moments)."""

  treedef: Any
  slots: tuple[int, ...]  # entries of the flattened state that are moment trees
  nonnegative: tuple[bool, ...]  # per slot

  @classmethod
  def of(cls, inner: optax.GradientTransformation, nonnegative: Sequence[str]) -> '_Layout':
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(
        inner.init(_ParamsSlot()), is_leaf=_is_slot
    )
    slots, signs = [], []
    for i, (path, leaf) in enumerate(paths_and_leaves):
      if _is_slot(leaf):
        names = {str(getattr(k, 'name', getattr(k, 'key', k))) for k in path}
        slots.append(i)
        signs.append(bool(names & set(nonnegative)))
    return cls(treedef, tuple(slots), tuple(signs))

  def split(self, state: Any) -> tuple[list[Any], list[Any]]:
    """(moments, other entries) of a state of the inner transformation."""
    entries = self.treedef.flatten_up_to(state)
    moments = [entries[j] for j in self.slots]
    return moments, [e for j, e in enumerate(entries) if j not in self.slots]

  def join(self, moments: Sequence[Any], others: Sequence[Any]) -> Any:
    """Inverse of `split`."""
    moments, others = iter(moments), iter(others)
    return self.treedef.unflatten(
        [next(moments) if j in self.slots else next(others) for j in range(self.treedef.num_leaves)]
    )


def _check_shape_args(rank, oversample, power_iters, min_dim_size):
  validation.check_positive_int('rank', rank)
  validation.check_positive_int('oversample', oversample, allow_zero=True)
  validation.check_positive_int('power_iters', power_iters, allow_zero=True)
  validation.check_positive_int('min_dim_size', min_dim_size, allow_zero=True)


def compress_moments(
    inner: optax.GradientTransformation,
    rank: int = 4,
    *,
    nonnegative: Sequence[str] = ('nu',),
    compress: mv.CompressArg = None,
    min_dim_size: int = 128,
    oversample: int = 0,
    power_iters: int = 1,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Stores the parameter-shaped moments of `inner` as rank-`rank` factors.

  The inner update is applied to one parameter (one matrix of a batch) at a
  time. That is exact for transformations that treat every parameter on its
  own, as optax's Adam, Lion, ADOPT, AdaBelief, RMSProp, SGD with momentum and
  their kin do, and not for those that couple parameters (Prodigy's global
  step size, for one).

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
    inner: the transformation whose moments to compress. Its state's
      parameter-shaped trees (found as optax.tree.map_params finds them) are
      the moments.
    rank: rank of the stored factors; a matrix with min(m, n) <= rank is
      stored exactly.
    nonnegative: names of the state fields that hold non-negative moments
      (``'nu'`` in optax's Adam family); their reconstructions are repaired.
    compress: which parameters to compress and how to view them as matrices:
      None for `default_view`, or a tree (or callable returning a
      tree) of `MatrixView` / True / False entries, see `resolve_views`.
    min_dim_size: the default policy compresses a parameter whose last two
      axes both have at least this many entries.
    oversample: extra test vectors of the randomized SVD.
    power_iters: power iterations of the randomized SVD.
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices; one per parameter and step are
      derived from it and the step count.
    warm_start: start each step's sketch from the previous step's right
      factor (see `randomized_svd`); then power_iters=0 is usually enough.

  Returns:
    An `optax.GradientTransformationExtraArgs` with `CompressedMomentsState`.
  """
  _check_shape_args(rank, oversample, power_iters, min_dim_size)
  factor_dtype = validation.canonical_float_dtype('factor_dtype', factor_dtype)
  if isinstance(nonnegative, str):
    nonnegative = (nonnegative,)
  inner = optax.with_extra_args_support(inner)

  def factorize(x, key, previous=None):
    f = randomized_svd(
        x.astype(factor_dtype), rank, key, oversample=oversample, power_iters=power_iters,
        warm_start=previous.v if warm_start and previous is not None else None,
    )
    return jax.tree.map(lambda y: y.astype(factor_dtype), f)

  def compress_full(moment, view, key):
    batch_shape, _, _ = mv.matrix_shape(moment.shape, view)
    factors = factorize(mv.to_matrices(moment, view), key)
    return jax.tree.map(lambda x: x.reshape(batch_shape + x.shape[1:]), factors)

  def views_of(tree):
    return mv.resolve_views(tree, compress, rank, min_dim_size)

  def init_fn(params):
    layout = _Layout.of(inner, nonnegative)
    leaves, params_def = jax.tree.flatten(params)
    count = jnp.zeros([], jnp.int32)
    if not leaves:
      return CompressedMomentsState(count, inner.init(params))
    views = params_def.flatten_up_to(views_of(params))
    key = jax.random.fold_in(jax.random.key(seed), 0)
    per_leaf, others = [], None
    for i, (leaf, view) in enumerate(zip(leaves, views)):
      moments, others = layout.split(inner.init(leaf))
      if view is not None:
        moments = [
            compress_full(m, view, jax.random.fold_in(key, i * len(moments) + j))
            for j, m in enumerate(moments)
        ]
      per_leaf.append(moments)
    moments = [flax_adapter.place(params, m, views) for m in zip(*per_leaf)] if layout.slots else []
    return CompressedMomentsState(count, layout.join(moments, others))

  def update_leaf(layout, old_others, g, p, moments, view, dtypes, key, extra_args):
    """One parameter's update: returns (update, new moments, new other entries)."""

    def step(g, p, moments):
      u, new_state = inner.update(g, layout.join(moments, old_others), p, **extra_args)
      return (u.astype(g.dtype), *layout.split(new_state))

    if view is None:
      return step(g, p, moments)

    batch_shape, _, _ = mv.matrix_shape(g.shape, view)
    flat = lambda f: jax.tree.map(lambda x: x.reshape((-1,) + x.shape[len(batch_shape):]), f)

    def one_matrix(xs):
      g, p, factors, b = xs
      full = []
      for f, dtype, positive in zip(factors, dtypes, layout.nonnegative):
        x = reconstruct(f)
        full.append((repair.repair_nonnegative(x, repair.negative_fill(f)) if positive else x).astype(dtype))
      u, new_moments, others = step(g, p, full)
      key_b = jax.random.fold_in(key, b)
      new_factors = [
          factorize(x, jax.random.fold_in(key_b, j), f)
          for j, (x, f) in enumerate(zip(new_moments, factors))
      ]
      return u, new_factors, others

    g_mat = mv.to_matrices(g, view)
    p_mat = None if p is None else mv.to_matrices(p, view)
    factors = [flat(f) for f in moments]
    if g_mat.shape[0] == 1:
      first = lambda t: jax.tree.map(lambda x: x[0], t)
      u, new_factors, others = one_matrix((first(g_mat), first(p_mat), first(factors), 0))
      u, new_factors = jax.tree.map(lambda x: x[None], (u, new_factors))
    else:
      u, new_factors, others = jax.lax.map(
          one_matrix, (g_mat, p_mat, factors, jnp.arange(g_mat.shape[0]))
      )
      others = jax.tree.map(lambda x: x[0], others)
    unflat = lambda x: x.reshape(batch_shape + x.shape[1:])
    return (
        mv.from_matrices(u, view, g.shape),
        jax.tree.map(unflat, new_factors),
        others,
    )

  def update_fn(updates, state, params=None, **extra_args):
    layout = _Layout.of(inner, nonnegative)
    g_leaves, params_def = jax.tree.flatten(updates)
    if not g_leaves:
      updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
      return updates, CompressedMomentsState(optax.safe_increment(state.count), inner_state)
    views = params_def.flatten_up_to(views_of(updates))
    p_leaves = [None] * len(g_leaves) if params is None else params_def.flatten_up_to(params)
    moment_trees, others = layout.split(state.inner_state)
    moments = [_leaves_matching(params_def, m) for m in moment_trees]
    abstract, _ = layout.split(jax.eval_shape(inner.init, updates))
    dtypes = [[x.dtype for x in params_def.flatten_up_to(a)] for a in abstract]

    key = jax.random.fold_in(jax.random.key(seed), optax.safe_increment(state.count))
    results = []
    for i, (g, p, view) in enumerate(zip(g_leaves, p_leaves, views)):
      leaf_moments = [m[i] for m in moments]
      _check_leaf(g, leaf_moments, view, rank)
      if results:  # wait for the previous parameter's new moments (not its
        # update: reading that would keep it in a temporary buffer)
        g, leaf_moments = _after(results[-1][1], (g, leaf_moments))
      results.append(update_leaf(
          layout, others, g, p, leaf_moments, view, [d[i] for d in dtypes],
          jax.random.fold_in(key, i), extra_args,
      ))

    updates_out, new_moments, new_others = zip(*results)
    new_moments = [params_def.unflatten(m) for m in zip(*new_moments)] if layout.slots else []
    return params_def.unflatten(updates_out), CompressedMomentsState(
        optax.safe_increment(state.count), layout.join(new_moments, new_others[-1])
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_float(x: Any) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _after(done: Sequence[Any], tree: Any) -> Any:
  """`tree`, unchanged in value, but computed only once the moments `done` are.

  Adds to every float array of `tree` a zero read from each new moment: the
  singular values of factors (computed last, tiny and replicated, so this
  also holds under sharding), or the sum of a full moment. A non-finite read
  counts as zero, so nothing leaks from one parameter into the next.
  """
  probe = sum(
      jnp.sum(x.s if _is_factors(x) else x).astype(jnp.float32) for x in done
  )
  zero = jnp.where(jnp.isfinite(probe), probe, 0.0) * 0.0
  return jax.tree.map(lambda x: x + zero.astype(x.dtype) if _is_float(x) else x, tree)


def _leaves_matching(params_def, moment_tree) -> list[Any]:
  """The moment tree's entries (arrays or factors) in the parameters' order."""
  try:
    entries = params_def.flatten_up_to(moment_tree)
    return [flax_adapter.as_moment(x) for x in entries]
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(
        f'`updates` do not match the optimizer state: the updates have tree '
        f'structure {params_def}, which the state, initialised for '
        f'{jax.tree.structure(moment_tree, is_leaf=_is_factors)}, does not '
        'have. Call init with parameters of the same structure as the updates.'
    ) from e


def _check_leaf(g, moments, view, rank) -> None:
  for moment in moments:
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
          f'`updates` do not match the optimizer state: an update of shape '
          f'{g.shape} needs a moment of shape {expected}, the state holds '
          f'{found}. Call init with parameters shaped like the updates, and '
          'keep `compress` the same between init and update.'
      )
