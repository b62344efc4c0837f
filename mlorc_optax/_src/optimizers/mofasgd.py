r"""MoFaSGD: SGD whose momentum is a rank-r SVD, updated in its tangent space.

Mahdavinia and Mahdavi, "Low-Rank Momentum Factorization for Memory
Efficient Training", arXiv 2507.08091. Per matrix parameter (m, n), the
momentum M = U diag(s) V^T is stored as its factors, r(m + n + 1) numbers,
and never formed in full. With the gradient G of the step:

.. math::
  [U \mid G V] = U' R_U,\quad [V \mid G^T U] = V' R_V
  \quad\text{(thin orthonormalisations, } m \times 2r,\ n \times 2r),

  R_U \begin{bmatrix} \beta\,\mathrm{diag}(s) - U^T G V & I \\ I & 0 \end{bmatrix} R_V^T
  = \tilde X \tilde\Sigma \tilde Y^T \quad (2r \times 2r),

  U_+ = U' \tilde X_{:r},\quad s_+ = \tilde\sigma_{:r},\quad V_+ = V' \tilde Y_{:r}.

Since U' (...) V'^T = beta M + P_T(G), with P_T(G) = U U^T G + G V V^T -
U U^T G V V^T the projection of G on the tangent space of the rank-r
matrices at M, the new factors are the best rank-r approximation of
beta M + P_T(G), as in the reference code. The thin QRs are the library's
matmul-only `orthonormalize` (Gram eigenproblems of size 2r, no QR of a tall
matrix; sharded operands keep their sharding). Each step costs two passes
over G and no (m, n) temporary. U and V always keep r orthonormal columns,
also where s is zero (free columns are refilled inside U' and V'), and are
re-orthonormalised each step so that rounding does not accumulate.

Memory: the new factors of all matrices of one shape are computed by one
loop (`leaf_groups.map_matrices`), one matrix and one group at a time; the
direction is formed outside the loops from thin pieces, elementwise.

The direction returned is

.. math::
  u = \eta_1 U_+ \,\mathrm{diag}(h(s_+))\, V_+^T + \eta_2 G_\perp,

with h(s) = 1 (the spectrally normalised U_+ V_+^T) or h(s) = min(1/s,
max_inverse), and G_perp = (I - U U^T) G (I - V V^T) the part of G that the
momentum did not take in.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from mlorc_optax._src import flax_adapter
from mlorc_optax._src import leaf_groups
from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src import validation
from mlorc_optax._src.compress_moments import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS
from mlorc_optax._src.randomized_svd import (
    LowRankFactors, _gram, _left_product, _right_product, _spec, orthonormalize,
    randomized_svd, reconstruct,
)

_INITS = ('zero', 'params')
_HIGHEST = jax.lax.Precision.HIGHEST


class ScaleByMoFaSGDState(NamedTuple):
  """State of `scale_by_mofasgd`.

  Attributes:
    count: number of updates so far (int32).
    mu: per parameter, the momentum as `LowRankFactors` (matrix parameters),
      or Adam's first moment (the others).
    nu: per parameter, Adam's second moment, or `optax.MaskedNode()` for
      matrix parameters (which have none).
  """

  count: jax.Array
  mu: Any
  nu: Any


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """A product with a thin inner dimension, in full precision: it feeds
  subtractions that cancel (TPU's default float32 matmul uses bf16 passes)."""
  return jnp.matmul(a, b, precision=_HIGHEST)


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _explicit_mesh() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, axes: tuple) -> jax.Array:
  """Gaussian (..., d, r) whose leading dimensions are sharded as `axes`."""
  if not _explicit_mesh():
    return jax.random.normal(key, shape, dtype)
  return jax.random.normal(key, shape, dtype, out_sharding=P(*axes, None))


def _fill_free(x: jax.Array, keep: jax.Array, fill: jax.Array) -> jax.Array:
  """Column j of x where keep[j], else column j - (number kept) of fill.

  `keep` is a prefix (singular values in decreasing order above a
  threshold), so the free columns take fill's leading columns, in order. The
  selection is a product with a one-hot matrix: no gather on sharded rows.
  """
  r, k = x.shape[-1], fill.shape[-1]
  kept = jnp.sum(keep, axis=-1, keepdims=True)
  source = jnp.clip(jnp.arange(r) - kept, 0, k - 1)
  picked = _mm(fill, jax.nn.one_hot(source, k, dtype=fill.dtype, axis=-2))
  return jnp.where(keep[..., None, :], x, picked)


def _complete_columns(x: jax.Array, keep: jax.Array, valid: jax.Array) -> jax.Array:
  """x (2r, r) with its free columns replaced by orthonormal vectors inside
  the `valid` coordinates and orthogonal to the kept columns.

  The singular vectors of zero singular values are arbitrary and may point
  at a zero column of U' (or V'); U_+ would lose a column for good, and a
  momentum whose factors are all zero never moves again (a first gradient
  of zero, as behind a zero-initialised layer, would freeze the parameter).
  The fill comes from the eigenvectors of diag(valid) - X_k X_k^T of
  eigenvalue 1; there are at least r of them, since U' spans U's r
  orthonormal columns.
  """
  kept = x * keep[..., None, :]
  projector = jnp.diag(valid.astype(x.dtype)) - _mm(kept, _t(kept))
  _, e = jnp.linalg.eigh(projector)
  return _fill_free(x, keep, jnp.flip(e, -1))


def _orthonormal_start(
    u: jax.Array, keep: jax.Array, key: jax.Array, axes: tuple
) -> jax.Array:
  """u (..., d, r) with its free columns replaced by orthonormal directions
  orthogonal to the kept ones: a full tangent space from the first step."""
  kept = u * keep[..., None, :]
  omega = _normal(key, u.shape, u.dtype, axes)
  for _ in range(2):  # twice: orthogonal to working precision
    omega = omega - _mm(kept, _gram(kept, omega))
  fill = orthonormalize(omega)
  # Where d - kept < r some columns of the fill are not new directions (zero,
  # or inside span(kept)): those go last.
  outside = fill - _mm(kept, _gram(kept, fill))
  order = jnp.argsort(-jnp.sum(outside * outside, axis=-2), axis=-1, stable=True)
  fill = _mm(fill, jax.nn.one_hot(order, u.shape[-1], dtype=u.dtype, axis=-2))
  return _fill_free(u, keep, fill)


def _kept(s: jax.Array) -> jax.Array:
  """Singular values above the rounding level of the largest one."""
  tol = s[..., :1] * 2 * s.shape[-1] * jnp.finfo(s.dtype).eps
  return s > tol


def _init_matrices(
    w: jax.Array, rank: int, init: str, key: jax.Array, oversample: int,
    power_iters: int, dtype: Any,
) -> LowRankFactors:
  """Initial factors of a (batch, m, n) stack of matrices."""
  spec = _spec(w)
  batch, (m, n) = w.shape[:-2], w.shape[-2:]
  r = min(rank, m, n)
  key_svd, key_u, key_v = jax.random.split(key, 3)
  if init == 'params':
    f = randomized_svd(w.astype(dtype), r, key_svd, oversample=oversample, power_iters=power_iters)
    keep = _kept(f.s) & (f.s > 0)
    u, s, v = f.u.astype(dtype), jnp.where(keep, f.s, 0).astype(dtype), f.v.astype(dtype)
  else:
    u, v = jnp.zeros(batch + (m, r), dtype), jnp.zeros(batch + (n, r), dtype)
    s = jnp.zeros(batch + (r,), dtype)
    keep = jnp.zeros(batch + (r,), bool)
  u = _orthonormal_start(u, keep, key_u, spec[:-1])
  v = _orthonormal_start(v, keep, key_v, spec[:-2] + spec[-1:])
  return LowRankFactors(u, s, v)


def _thin_qr(u: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[u | y] = Q R (Q: (d, 2r), R = Q^T [u | y]: (2r, 2r)), and which columns
  of Q are nonzero.

  y is scaled to entries of at most 1 first (the span is the same), so that
  the unit columns of u are never lost next to a large gradient's.
  `orthonormalize` returns a zero column for an exactly degenerate direction
  (a zero gradient) and a unit one orthogonal to the others for a direction
  at rounding level; both are handled by the caller.
  """
  top = jnp.max(jnp.abs(y))
  if _explicit_mesh():  # the blocks must share one sharding: u's (thin)
    y = jax.sharding.reshard(y, P(*_spec(u)))
  q = orthonormalize(jnp.concatenate([u, y / jnp.where(top > 0, top, 1)], axis=-1))
  r = _gram(q, jnp.concatenate([u, y], axis=-1))
  return q, r, jnp.diagonal(_gram(q, q)) > 0.5


def _reorthonormalize(u: jax.Array) -> jax.Array:
  """u (u^T u)^(-1/2), the nearest matrix with orthonormal columns.

  Each step builds U_+ from U, so rounding errors in its orthogonality
  would add up over a run; this undoes them without rotating U (unlike a
  QR), so s and V stay matched to it.
  """
  w, e = jnp.linalg.eigh(_gram(u, u))
  w = jnp.maximum(w, 0.25)  # a degenerate column is not repaired here
  return _mm(u, _mm(e * jax.lax.rsqrt(w)[None, :], _t(e)))


def momentum_step(
    g: jax.Array, factors: LowRankFactors, b: Any, gradient_scale: Any = 1.0
) -> tuple[LowRankFactors, tuple[jax.Array, jax.Array]]:
  r"""One MoFaSGD momentum update of one matrix, in the factors' dtype.

  Returns the factors of the best rank-r approximation of
  ``b * U diag(s) V^T + gradient_scale * P_T(G)``, and (U^T G, G V - U U^T G V)
  of the old factors, from which G_perp is formed without another pass.
  U and V keep r orthonormal columns even where s is zero.

  Args:
    g: the gradient (m, n).
    factors: the momentum's (u (m, r), s (r,), v (n, r)), u and v orthonormal.
    b: the momentum decay beta.
    gradient_scale: factor on P_T(G): 1 (the reference code) or 1 - b.
  """
  u, s, v = factors
  dtype = u.dtype
  r = s.shape[-1]
  gv = _right_product(g, v).astype(dtype)  # G V, rows sharded like G's
  utg = _left_product(u, g).astype(dtype)  # U^T G, columns sharded like G's
  c = _gram(u, gv)  # U^T G V
  q_u, r_u, valid_u = _thin_qr(u, gv)  # [U | G V] = U' R_U
  q_v, r_v, valid_v = _thin_qr(v, _t(utg))  # [V | G^T U] = V' R_V
  eye, zero = jnp.eye(r, dtype=dtype), jnp.zeros((r, r), dtype)
  block = jnp.block([
      [b * jnp.diag(s) - gradient_scale * c, gradient_scale * eye],
      [gradient_scale * eye, zero],
  ])
  x, sigma, yt = jnp.linalg.svd(_mm(r_u, _mm(block, _t(r_v))))
  keep = _kept(sigma)[:r]
  x = _complete_columns(x[:, :r], keep, valid_u)
  y = _complete_columns(_t(yt)[:, :r], keep, valid_v)
  new = LowRankFactors(
      u=_reorthonormalize(_mm(q_u, x)),
      s=jnp.where(keep, sigma[:r], 0),
      v=_reorthonormalize(_mm(q_v, y)),
  )
  outside_v = gv - _mm(u, c)  # (I - U U^T) G V, for G_perp
  return new, (utg, outside_v)


class _Perp(NamedTuple):
  """G_perp - G = -U (U^T G) - ((I - U U^T) G V) V^T, as thin pieces."""

  u: jax.Array  # (m, r)
  utg: jax.Array  # (r, n): U^T G
  outside_v: jax.Array  # (m, r): (I - U U^T) G V
  v: jax.Array  # (n, r)


def _perp_pieces(g, old: LowRankFactors, new: LowRankFactors, pieces, current_projection: bool) -> _Perp:
  """The pieces of G_perp, on the old factors (those G was projected on, whose
  products with G the momentum step already formed) or on the new ones (two
  more passes over G)."""
  if not current_projection:
    return _Perp(old.u, pieces[0], pieces[1], old.v)
  dtype = new.u.dtype
  utg = _left_product(new.u, g).astype(dtype)
  gv = _right_product(g, new.v).astype(dtype)
  return _Perp(new.u, utg, gv - _mm(new.u, _gram(new.u, gv)), new.v)


def _direction(
    g: jax.Array, new: LowRankFactors, perp: _Perp | None, *, eta1, eta2, max_inverse, eps,
) -> jax.Array:
  """eta1 U_+ diag(h(s_+)) V_+^T (+ eta2 G_perp) for one matrix, written as
  eta2 G plus one low-rank product, which XLA fuses into its consumer: no
  (m, n) temporary."""
  u, s, v = new
  dtype = jnp.promote_types(u.dtype, jnp.float32)
  s = s.astype(dtype)
  live = (s > 0) & (s > eps)
  if max_inverse is None:
    h = jnp.where(live, 1, 0).astype(dtype)
  else:
    h = jnp.where(live, jnp.minimum(1 / jnp.where(live, s, 1), max_inverse), 0).astype(dtype)
  lefts, rights = [eta1 * u.astype(dtype) * h], [v.astype(dtype)]
  if perp is not None:
    lefts += [-eta2 * perp.u.astype(dtype), -eta2 * perp.outside_v.astype(dtype)]
    rights += [_t(perp.utg).astype(dtype), perp.v.astype(dtype)]
  left, right = jnp.concatenate(lefts, -1), jnp.concatenate(rights, -1)
  out = reconstruct(LowRankFactors(left, jnp.ones(left.shape[-1], dtype), right))
  if perp is not None:
    out = eta2 * g + out
  return out.astype(g.dtype)


def _check_args(
    rank, b, eta1, eta2, max_inverse, eps, init, adam_b1, adam_b2, adam_eps, adam_eps_root
) -> None:
  validation.check_positive_int('rank', rank)
  if not callable(b):
    validation.check_in_unit_interval('b', b)
  validation.check_in_unit_interval('adam_b1', adam_b1)
  validation.check_in_unit_interval('adam_b2', adam_b2)
  non_negative = dict(eta1=eta1, eta2=eta2, eps=eps, adam_eps=adam_eps, adam_eps_root=adam_eps_root)
  for name, value in non_negative.items():
    validation.check_non_negative(name, value)
  if max_inverse is not None:
    validation.check_non_negative('max_inverse', max_inverse)
  if init not in _INITS:
    raise ValueError(f'`init` must be one of {_INITS}, got {init!r}.')


def _static_zero(x: Any) -> bool:
  return isinstance(x, (int, float)) and x == 0


def scale_by_mofasgd(
    *,
    rank: int = 4,
    b: float | Callable[[jax.Array], Any] = 0.9,
    eta1: float = 1.0,
    eta2: float = 0.0,
    max_inverse: float | None = None,
    eps: float = 1e-10,
    ema: bool = False,
    current_projection: bool = False,
    init: str = 'zero',
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_eps_root: float = 0.0,
    compress: mv.CompressArg = None,
    min_dim_size: int | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    factor_dtype: Any = 'float32',
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""MoFaSGD's direction: a rank-`rank` momentum kept as SVD factors.

  For each matrix parameter (chosen and viewed as in `compress_moments`),
  with gradient G and momentum factors (U, s, V):

  .. math::
    U_+ \mathrm{diag}(s_+) V_+^T = \mathrm{best}_r\big(\beta\, U \mathrm{diag}(s) V^T
      + c\, P_T(G)\big),\qquad
    u = \eta_1 U_+ \mathrm{diag}(h(s_+)) V_+^T + \eta_2 (I - UU^T) G (I - VV^T),

  computed from two thin orthonormalisations, of [U | G V] (m x 2r) and
  [V | G^T U] (n x 2r), and the SVD of a (2r x 2r) matrix; the full momentum
  is never formed, and the state of an (m, n) matrix is r(m + n + 1) numbers.
  Every other parameter (vectors, scalars, small matrices) is updated with
  `optax.scale_by_adam`, as in the paper's setup.

  Momentum convention: by default c = 1, M_+ = beta M + P_T(G), as the
  authors' code computes it (heavy-ball momentum, no dampening). With
  ``ema=True``, c = 1 - beta, the exponential moving average of the paper's
  text. With a constant beta, a zero start and h = 1, the two give the same
  directions (the factors differ by the scale 1 - beta); they differ with
  h(s) = 1/s, with a schedule for beta, or with ``init='params'``.

  Initialisation: ``init='zero'`` (default) starts from a zero momentum whose
  U and V are random orthonormal bases, so the first step's tangent space
  holds the randomized range finder G V of the first gradient; it needs no
  pass over the parameters. ``init='params'`` follows the reference code:
  U, s, V from the top-r SVD of the parameter (a randomized SVD with
  `oversample` and `power_iters`), so the momentum starts as W's rank-r
  part and decays as beta^t. Either way U and V always keep r orthonormal
  columns, also where s is zero (e.g. for a zero parameter, or a first
  gradient of zero), so the tangent space never collapses.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = optax.chain(mlorc.scale_by_mofasgd(rank=2, min_dim_size=4), optax.scale(-1e-2))
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
    >>> state = tx.init(params)
    >>> state[0].mu['w'].u.shape, state[0].mu['b'].shape
    ((8, 2), (6,))
    >>> updates, state = tx.update(params, state, params)

  Args:
    rank: rank r of the momentum factors; a matrix with min(m, n) <= rank
      keeps a full-rank (exact) momentum.
    b: momentum decay beta, a float or a schedule of the step count (the
      reference GPT runs warm it up from 0.65 to 0.85 over 300 steps).
    eta1: scale of the low-rank momentum term.
    eta2: scale of the orthogonal-complement gradient term; 0 (default, as in
      the reference GPT runs) leaves it out at no cost.
    max_inverse: None (default) for the spectrally normalised update
      h(s) = 1; a number for h(s) = min(1/s, max_inverse), the reference
      code's default (its ``max_value``; 5 in its GPT runs).
    eps: singular values at or below eps get h(s) = 0.
    ema: False for M_+ = beta M + P_T(G) (the reference code); True for
      M_+ = beta M + (1 - beta) P_T(G) (the paper's text).
    current_projection: project G_perp with the new factors (U_+, V_+)
      instead of those of the tangent space G was projected on; costs two
      more passes over G. Only used when eta2 is not 0.
    init: 'zero' or 'params', see above.
    adam_b1: Adam's b1 for the non-matrix parameters.
    adam_b2: Adam's b2 for the non-matrix parameters.
    adam_eps: Adam's eps for the non-matrix parameters.
    adam_eps_root: Adam's eps_root for the non-matrix parameters.
    compress: which parameters are matrices and how they are viewed, as in
      `compress_moments` (None: `default_view`).
    min_dim_size: smallest matrix side the default policy takes as a matrix
      (None: `matrix_view.DEFAULT_MIN_DIM_SIZE`, 64).
    oversample: oversampling of the initial SVD with ``init='params'``
      (None: 0); unused otherwise.
    power_iters: power iterations of the initial SVD with ``init='params'``
      (None: 1); unused otherwise.
    factor_dtype: dtype (or its name) of the stored factors; the update is
      computed in it (at least float32).
    seed: seed of the random initial bases.

  Returns:
    An `optax.GradientTransformationExtraArgs` with `ScaleByMoFaSGDState`.

  References:
    Mahdavinia and Mahdavi, Low-Rank Momentum Factorization for Memory
    Efficient Training, arXiv 2507.08091, 2025.
    Shen et al., MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation, arXiv 2506.01897.
    Halko, Martinsson and Tropp, Finding Structure with Randomness, SIAM
    Review 2011 (the initial SVD of ``init='params'``).
  """
  _check_args(rank, b, eta1, eta2, max_inverse, eps, init, adam_b1, adam_b2, adam_eps, adam_eps_root)
  if min_dim_size is not None:
    min_dim_size = validation.check_non_negative_int('min_dim_size', min_dim_size)
  oversample = validation.check_non_negative_int(
      'oversample', DEFAULT_OVERSAMPLE if oversample is None else oversample)
  power_iters = validation.check_non_negative_int(
      'power_iters', DEFAULT_POWER_ITERS if power_iters is None else power_iters)
  factor_dtype = validation.canonical_float_dtype('factor_dtype', factor_dtype)
  adam = optax.scale_by_adam(b1=adam_b1, b2=adam_b2, eps=adam_eps, eps_root=adam_eps_root)
  with_perp = not _static_zero(eta2)

  def views_of(tree):
    return mv.resolve_views(tree, compress, rank, min_dim_size)

  def compute_dtype(g_dtype):
    return jnp.promote_types(jnp.promote_types(factor_dtype, g_dtype), jnp.float32)

  def init_fn(params):
    leaves, params_def = jax.tree.flatten(params)
    if not leaves:  # no parameters, or optax.tree.map_params's placeholder
      return ScaleByMoFaSGDState(count=jnp.zeros([], jnp.int32), mu=params, nu=params)
    views = params_def.flatten_up_to(views_of(params))
    key = jax.random.key(seed)
    mus, nus = [], []
    for i, (leaf, view) in enumerate(zip(leaves, views)):
      if view is None:
        adam_state = adam.init(leaf)
        mus.append(adam_state.mu)
        nus.append(adam_state.nu)
        continue
      batch_shape, _, _ = mv.matrix_shape(leaf.shape, view)
      f = _init_matrices(
          mv.to_matrices(leaf, view), rank, init, jax.random.fold_in(key, i),
          oversample, power_iters, compute_dtype(leaf.dtype),
      )
      mus.append(jax.tree.map(lambda x: x.astype(factor_dtype).reshape(batch_shape + x.shape[1:]), f))
      nus.append(optax.MaskedNode())
    return ScaleByMoFaSGDState(
        count=jnp.zeros([], jnp.int32),
        mu=flax_adapter.place(params, mus, views),
        nu=_place_plain(params, nus),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    paths_and_g, params_def = jax.tree_util.tree_flatten_with_path(updates)
    count = optax.safe_increment(state.count)
    if not paths_and_g:
      return updates, state._replace(count=count)
    views = params_def.flatten_up_to(views_of(updates))
    mus = _entries(params_def, state.mu, 'mu')
    nus = _entries(params_def, state.nu, 'nu')
    b_t = b(state.count) if callable(b) else b
    scale = 1 - b_t if ema else 1.0

    leaves = []
    for i, ((path, g), view, mu, nu) in enumerate(zip(paths_and_g, views, mus, nus)):
      _check_leaf(path, g, mu, nu, view, rank)
      if view is not None:
        batch_ndim = len(mv.matrix_shape(g.shape, view)[0])
        factors = jax.tree.map(
            lambda x: x.reshape((-1,) + x.shape[batch_ndim:]), flax_adapter.as_moment(mu))
        leaves.append(leaf_groups.Leaf(i, mv.to_matrices(g, view), None, {'mu': factors}, True))

    def matrix(key, g, p, entries, x):
      """One matrix's new factors (and G_perp's pieces): small results only."""
      del key, p, x
      old = jax.tree.map(lambda y: y.astype(compute_dtype(g.dtype)), entries['mu'])
      # A NaN or inf entry of G would spread through G V and G^T U into every
      # factor for good; the factors see it as 0 (optax's momentum methods
      # would keep it in that one entry).
      g = jnp.where(jnp.isfinite(g), g, 0)
      new, pieces = momentum_step(g, old, b_t, scale)
      out = {'mu': jax.tree.map(lambda y: y.astype(factor_dtype), new)}
      if with_perp:
        out['perp'] = _perp_pieces(g, old, new, pieces, current_projection)
      return out

    # One loop per group of same-shaped matrices, one group at a time.
    results = leaf_groups.map_matrices(leaves, matrix, jax.random.key(0))

    outs, new_mus, new_nus = [], [], []
    for i, ((_, g), view, mu, nu) in enumerate(zip(paths_and_g, views, mus, nus)):
      if view is None:
        u, adam_state = adam.update(g, optax.ScaleByAdamState(state.count, mu, nu))
        outs.append(u)
        new_mus.append(adam_state.mu)
        new_nus.append(adam_state.nu)
        continue
      new, perp = results[i]['mu'], results[i].get('perp')
      # Elementwise over the matrices: fused into the consumer of the update.
      u = jax.vmap(functools.partial(
          _direction, eta1=eta1, eta2=eta2, max_inverse=max_inverse, eps=eps,
      ))(mv.to_matrices(g, view), new, perp)
      batch_shape = mv.matrix_shape(g.shape, view)[0]
      outs.append(mv.from_matrices(u, view, g.shape))
      new_mus.append(jax.tree.map(lambda x: x.reshape(batch_shape + x.shape[1:]), new))
      new_nus.append(optax.MaskedNode())
    return params_def.unflatten(outs), ScaleByMoFaSGDState(
        count=count, mu=params_def.unflatten(new_mus), nu=params_def.unflatten(new_nus),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _place_plain(params: Any, entries: list[Any]) -> Any:
  """A tree like `params` holding `entries`: arrays boxed like their
  parameters, `optax.MaskedNode` placeholders as they are."""
  entries = iter(entries)

  def put(node):
    entry = next(entries)
    if flax_adapter.is_box(node) and not isinstance(entry, optax.MaskedNode):
      return node.replace(entry)
    return entry

  return jax.tree.map(put, params, is_leaf=flax_adapter.is_box)


def _entries(params_def, tree: Any, name: str) -> list[Any]:
  try:
    return params_def.flatten_up_to(tree)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(
        f'`updates` do not match the optimizer state: the updates have tree '
        f'structure {params_def}, the state\'s {name!r} does not. Call init '
        'with parameters of the same structure as the updates.'
    ) from e


def _check_leaf(path, g, mu, nu, view, rank) -> None:
  where = jax.tree_util.keystr(path)
  fix = ('Call init with parameters shaped like the updates, and keep '
         '`compress`, `rank` and `min_dim_size` the same between init and update.')
  if view is None:
    if isinstance(mu, LowRankFactors) or jnp.shape(mu) != g.shape:
      raise ValueError(
          f'`updates` do not match the optimizer state at {where}: an update '
          f'of shape {g.shape} needs Adam moments of that shape. {fix}'
      )
    return
  mu = flax_adapter.as_moment(mu)
  batch_shape, m, n = mv.matrix_shape(g.shape, view)
  r = min(rank, m, n)
  expected = (batch_shape + (m, r), batch_shape + (n, r))
  if not isinstance(mu, LowRankFactors) or (mu.u.shape, mu.v.shape) != expected:
    found = (mu.u.shape, mu.v.shape) if isinstance(mu, LowRankFactors) else jnp.shape(mu)
    raise ValueError(
        f'`updates` do not match the optimizer state at {where}: an update of '
        f'shape {g.shape} needs momentum factors of shapes {expected}, the '
        f'state holds {found}. {fix}'
    )


def _scale_by_learning_rates(
    learning_rate: optax.ScalarOrSchedule,
    adam_learning_rate: optax.ScalarOrSchedule,
    views_of: Callable[[Any], Any],
) -> optax.GradientTransformation:
  """-learning_rate on matrix parameters, -adam_learning_rate on the others."""

  def value(rate, count):
    return rate(count) if callable(rate) else rate

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    rates = (value(learning_rate, state.count), value(adam_learning_rate, state.count))
    scale = lambda u, view: (-rates[view is None] * u).astype(u.dtype)
    views = jax.tree.structure(updates).flatten_up_to(views_of(updates))
    leaves, treedef = jax.tree.flatten(updates)
    out = treedef.unflatten([scale(u, view) for u, view in zip(leaves, views)])
    return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def mofasgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 4,
    b: float | Callable[[jax.Array], Any] = 0.9,
    eta1: float = 1.0,
    eta2: float = 0.0,
    max_inverse: float | None = None,
    eps: float = 1e-10,
    ema: bool = False,
    current_projection: bool = False,
    init: str = 'zero',
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_eps_root: float = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    compress: mv.CompressArg = None,
    min_dim_size: int | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    factor_dtype: Any = 'float32',
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""MoFaSGD: W <- W - lr (eta1 U_+ diag(h(s_+)) V_+^T + eta2 G_perp).

  Matrix parameters follow `scale_by_mofasgd` (momentum kept as rank-`rank`
  SVD factors, updated in their tangent space); the others follow Adam, with
  `adam_learning_rate` (by default the same learning rate).

  Example:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.mofasgd(1e-2, rank=4)
    >>> state = tx.init({'w': jnp.ones((256, 128)), 'b': jnp.zeros(128)})

  Args:
    learning_rate: a float or an optax schedule, for the matrix parameters.
    rank: see `scale_by_mofasgd`.
    b: see `scale_by_mofasgd`.
    eta1: see `scale_by_mofasgd`.
    eta2: see `scale_by_mofasgd`.
    max_inverse: see `scale_by_mofasgd`.
    eps: see `scale_by_mofasgd`.
    ema: see `scale_by_mofasgd`.
    current_projection: see `scale_by_mofasgd`.
    init: see `scale_by_mofasgd`.
    adam_b1: see `scale_by_mofasgd`.
    adam_b2: see `scale_by_mofasgd`.
    adam_eps: see `scale_by_mofasgd`.
    adam_eps_root: see `scale_by_mofasgd`.
    adam_learning_rate: learning rate (or schedule) of the Adam parameters;
      None for `learning_rate`.
    compress: see `scale_by_mofasgd`.
    min_dim_size: see `scale_by_mofasgd`.
    oversample: see `scale_by_mofasgd`.
    power_iters: see `scale_by_mofasgd`.
    factor_dtype: see `scale_by_mofasgd`.
    seed: see `scale_by_mofasgd`.

  References:
    Mahdavinia and Mahdavi, Low-Rank Momentum Factorization for Memory
    Efficient Training, arXiv 2507.08091, 2025.
    Shen et al., MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation, arXiv 2506.01897.
  """
  inner = scale_by_mofasgd(
      rank=rank, b=b, eta1=eta1, eta2=eta2, max_inverse=max_inverse, eps=eps, ema=ema,
      current_projection=current_projection, init=init, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_eps_root=adam_eps_root, compress=compress,
      min_dim_size=min_dim_size, oversample=oversample, power_iters=power_iters,
      factor_dtype=factor_dtype, seed=seed,
  )
  if adam_learning_rate is None:
    return optax.chain(inner, optax.scale_by_learning_rate(learning_rate))
  views_of = lambda tree: mv.resolve_views(tree, compress, rank, min_dim_size)
  return optax.chain(inner, _scale_by_learning_rates(learning_rate, adam_learning_rate, views_of))
