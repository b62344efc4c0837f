"""A batched, matmul-only randomized SVD (Halko, Martinsson and Tropp, 2011).

Every step is a matrix product with the full (m, n) operand or a small
(k, k) eigenproblem or SVD, with k = rank + oversample. No QR or SVD of a
tall matrix is ever taken, which keeps the algorithm fast on TPU and GPU
(where batched QR is a loop) and lets it run on sharded operands: the Gram
matrices are tiny and replicated, the tall factors keep the operand's sharding.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mlorc_optax._src import validation

_HIGHEST = jax.lax.Precision.HIGHEST


class LowRankFactors(NamedTuple):
  """A rank-r matrix ``u @ diag(s) @ v.T``; leading axes are batch axes.

  Attributes:
    u: left factor, shape (..., m, r), orthonormal columns (a column whose
      singular value is zero may be zero).
    s: non-negative singular values, shape (..., r), in decreasing order.
    v: right factor, shape (..., n, r), orthonormal columns.
  """

  u: jax.Array
  s: jax.Array
  v: jax.Array


# Up to this rank the product is written as r outer products, which XLA fuses
# into the consumer instead of giving a matmul's (m, n) output its own buffer.
_FUSED_RECONSTRUCT_MAX_RANK = 16


def reconstruct(factors: LowRankFactors) -> jax.Array:
  """Returns the dense matrix ``u @ diag(s) @ v.T`` of shape (..., m, n)."""
  u, s, v = factors
  us = u * s[..., None, :]
  if u.shape[-1] > _FUSED_RECONSTRUCT_MAX_RANK:
    return jnp.matmul(us, jnp.swapaxes(v, -1, -2))
  out = jnp.zeros(u.shape[:-1] + v.shape[-2:-1], u.dtype)
  for k in range(u.shape[-1]):
    out = out + us[..., :, k, None] * v[..., None, :, k]
  return out


def _spec(x: jax.Array) -> tuple:
  """The mesh axes of each dimension of x (None where not sharded)."""
  spec = tuple(jax.typeof(x).sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def _matmul(a: jax.Array, b: jax.Array, out_axes: tuple, precision=None) -> jax.Array:
  """a @ b, sharded as `out_axes` under an explicit mesh.

  With explicit sharding a product that contracts a sharded axis must name
  its output sharding: the tiny Gram matrices are replicated, tall products
  keep the rows (or columns) of the operand they come from.
  """
  batch = tuple(range(a.ndim - 2))
  dims = (((a.ndim - 1,), (a.ndim - 2,)), (batch, batch))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.lax.dot_general(a, b, dims, precision=precision)
  # (jnp.matmul drops a size-1 batch axis before applying out_sharding.)
  return jax.lax.dot_general(a, b, dims, precision=precision, out_sharding=P(*out_axes))


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
  """a^T b, small and replicated, in full precision (TPU's default float32
  matmul uses bf16 passes, too coarse for a Gram matrix)."""
  batch = _spec(a)[:-2]
  return _matmul(jnp.swapaxes(a, -1, -2), b, batch + (None, None), precision=_HIGHEST)


def _scale(a: jax.Array) -> jax.Array:
  """Largest |entry| of each matrix, or 1 for a zero matrix, shape (..., 1, 1)."""
  top = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
  return jnp.where(top > 0, top, jnp.ones_like(top))


def _finite(a: jax.Array) -> jax.Array:
  """a with NaN read as 0 and +-Inf as +-F, the largest finite value.

  Elementwise, so XLA fuses it into the computation that produces `a`.
  """
  return jnp.nan_to_num(a, nan=0.0)


def _thin_scale(m: int, n: int) -> float:
  """The power of two 2^-e <= 1 / (16 max(m, n)) that the thin operand of
  every product with an (m, n) matrix is multiplied by.

  Then no product overflows, even with entries of `a` near F: a row or
  column sums at most max(m, n) terms, each below F 2^-e times a unit-vector
  entry or a Gaussian one (under 16 in magnitude). A power of two rounds
  like 1, so the results are exact multiples of the unscaled ones, at no
  extra pass over `a`; only entries below ~1e-38 * 16 max(m, n) (float32)
  underflow.
  """
  return 2.0 ** -math.ceil(math.log2(16 * max(m, n)))


def _capped(f: LowRankFactors, dtype=None) -> LowRankFactors:
  """Singular values capped at F / 2 of `dtype` (default: their own), so that
  `reconstruct` stays finite: its entries and partial sums are at most s_1."""
  top = float(jnp.finfo(f.s.dtype).max) / 2
  if dtype is not None:
    top = min(top, float(jnp.finfo(dtype).max) / 2)
  return f._replace(s=jnp.minimum(f.s, top))


def cast_factors(factors: LowRankFactors, dtype) -> LowRankFactors:
  """`factors` in `dtype`, singular values capped at half its largest value.

  A float64 moment beyond float32's range would otherwise get singular
  values of inf as float32 factors, and `reconstruct` would give NaN.
  """
  return jax.tree.map(lambda y: y.astype(dtype), _capped(factors, dtype))


def _eps(x: jax.Array) -> float:
  return float(jnp.finfo(x.dtype).eps)


def _whitening(gram: jax.Array, shifted: bool) -> jax.Array:
  """W = E diag(w + shift)^(-1/2) for gram = E diag(w) E^T: y @ W is whitened.

  Shifted (shift = k eps trace(gram)), no eigenvalue is trusted below the
  rounding level of the Gram matrix: directions that small are scaled up by
  1/sqrt(shift) only, not by a noisy 1/sqrt(w). Unshifted, eigenvalues at
  rounding level (k eps max(w)) give zero columns instead of NaN.
  """
  k = gram.shape[-1]
  w, e = jnp.linalg.eigh(gram)
  if shifted:
    shift = k * _eps(gram) * jnp.trace(gram, axis1=-2, axis2=-1)[..., None]
    w = jnp.maximum(w, 0) + shift
    keep = w > 0  # only a zero matrix has none
  else:
    keep = w > k * _eps(gram) * jnp.max(w, axis=-1, keepdims=True)
  return e * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, w, 1)), 0)[..., None, :]


# Gram passes (True: shifted), see `orthonormalize`: two shifted passes give
# a well-conditioned basis of the span, which is all that the inner steps of
# the power iteration need; two plain ones then make it orthonormal.
_SPANNING = (True, True)
_ORTHONORMAL = (True, True, False, False)


def orthonormalize(y: jax.Array) -> jax.Array:
  r"""Orthonormal basis of the columns of y (..., m, k), by four Gram passes.

  Each pass forms G = y^T y = E diag(w) E^T and sets
  y <- y E diag(w + shift)^(-1/2): a CholeskyQR with an eigendecomposition in
  place of the Cholesky factor, so that only (k, k) matrices are factored.

  An unshifted pass squares the condition number: in float32 a direction
  below sqrt(eps) ~ 3e-4 of the largest drowns in the rounding of G, and
  came out as a zero column (one that a power iteration cannot revive). The
  first two passes therefore add shift = k eps trace(G) (shifted CholeskyQR,
  Fukaya et al. 2020), which bounds the amplification of a direction to
  1/sqrt(shift): each pass lifts a direction of relative size rho to about
  rho / sqrt(k eps), so after two every direction down to rounding level is
  within a factor ~10 of the largest, and two plain passes make the columns
  orthonormal to working precision. A direction at rounding level comes out
  as some unit vector orthogonal to the others, as Householder QR gives;
  only an exactly degenerate one (a zero y, or columns that stay exactly
  dependent) becomes a zero column, never NaN.
  """
  return _columns(y, _ORTHONORMAL)


def _columns(y: jax.Array, passes: tuple[bool, ...]) -> jax.Array:
  """y after the Gram passes `passes` (True: shifted) of `orthonormalize`."""
  y = y / _scale(y)  # Gram entries of 1e30-sized inputs would overflow
  for shifted in passes:
    y = jnp.matmul(y, _whitening(_gram(y, y), shifted))
  return y


def _left_product(q: jax.Array, a: jax.Array) -> jax.Array:
  """q^T a, (..., k, n): also standing for a^T q, which XLA:CPU computes by
  transposing all of `a` first (ten times slower for a (512, 2048) matrix)."""
  spec = _spec(a)
  return _matmul(jnp.swapaxes(q, -1, -2), a, spec[:-2] + (None, spec[-1]))


def _right_product(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b for a thin b (..., n, k), sharded like the rows of a."""
  spec = _spec(a)
  return _matmul(a, b, spec[:-1] + (None,))


def _rows(w: jax.Array, passes: tuple[bool, ...] = _ORTHONORMAL) -> jax.Array:
  """`_columns` of w^T, returned transposed, without transposing w."""
  w = w / _scale(w)
  for shifted in passes:
    wt = jnp.swapaxes(w, -1, -2)
    w = jnp.matmul(jnp.swapaxes(_whitening(_gram(wt, wt), shifted), -1, -2), w)
  return w


def _small_svd(q: jax.Array, b: jax.Array, rank: int) -> LowRankFactors:
  """Top-`rank` SVD of q @ b, for orthonormal q (..., m, k) and b (..., k, n).

  b = R Z with Z (k, n) an orthonormal basis of b's rows and R = b Z^T
  (k, k); with R = X diag(s) Y^T: u = q X, v = Z^T Y. Unlike an
  eigendecomposition of b b^T, this does not square b's condition number,
  so singular values down to rounding level (~eps s_1) are resolved; those
  below k eps s_1 are set to zero, with their columns of u and v.
  """
  c = _scale(b)
  b = b / c
  z = _rows(b)
  x, s, yt = jnp.linalg.svd(_gram(jnp.swapaxes(b, -1, -2), jnp.swapaxes(z, -1, -2)))
  x, s, yt = x[..., :rank], s[..., :rank], yt[..., :rank, :]
  keep = s > b.shape[-2] * _eps(b) * s[..., :1]
  keep_cols = keep[..., None, :].astype(b.dtype)
  u = jnp.matmul(q, x) * keep_cols
  v = jnp.matmul(jnp.swapaxes(z, -1, -2), jnp.swapaxes(yt, -1, -2)) * keep_cols
  return LowRankFactors(u=u, s=jnp.where(keep, s, 0) * c[..., 0], v=v)


def _exact_svd(a: jax.Array, rank: int) -> LowRankFactors:
  u, s, vt = jnp.linalg.svd(a, full_matrices=False)
  return LowRankFactors(u[..., :rank], s[..., :rank], jnp.swapaxes(vt, -1, -2)[..., :rank])


def randomized_svd(
    a: jax.Array,
    rank: int,
    key: jax.Array,
    *,
    oversample: int = 0,
    power_iters: int = 1,
    warm_start: jax.Array | None = None,
) -> LowRankFactors:
  r"""Rank-`rank` approximate SVD of a (batch of) matrices.

  With k = rank + oversample and a Gaussian test matrix Omega (n, k):

  .. math::
    Q = \mathrm{orth}(A \Omega);\quad
    \text{repeat } q \text{ times: } Z = \mathrm{orth}(A^T Q),\ Q = \mathrm{orth}(A Z);
    \quad B = Q^T A = U_B S V^T;\quad U = Q U_B,

  keeping the leading `rank` triplets. Work is O(mnk(2q + 2)) and the only
  factorisations are of (k, k) matrices (Gram eigenproblems and the final
  small SVD). Each orth is a shifted CholeskyQR (see `orthonormalize`) and
  B's SVD goes through an orthonormal basis of its rows, so no step squares
  a condition number: in float32 a direction of a rank <= k matrix is found
  down to sigma_i / sigma_1 ~ 1e-6 (no key of 2000 lost one in tests, with
  one power iteration), and the sketch returns singular values below
  k eps s_1, rounding noise, as exact zeros with zero columns of u and v.

  The defaults (no oversampling, one power iteration) follow the MLorc
  reference code (``torch.pca_lowrank(q=rank, niter=1)``). The error shrinks
  towards the optimal truncated SVD as oversample and power_iters grow, each
  power iteration costing two more passes over `a`; for a matrix of rank <=
  rank + oversample the result is exact. When rank + oversample >= min(m, n)
  a sketch saves nothing and the exact SVD is returned instead.

  Non-finite and extreme entries: NaN is read as 0 and +-Inf as +-F, the
  largest finite value of the computation dtype, so the factors are always
  finite (the moment of an optimizer whose g * g overflowed is factored as
  if it held F there). Every product with `a` is scaled by a power of two
  that rules out overflow for entries up to F, and singular values are
  capped at F / 2, so that `reconstruct` stays finite too. Relative to such
  entries the rest of the matrix is below float32 resolution, and its
  directions are lost. Entries smaller than about 1e-38 * 16 max(m, n)
  (float32) underflow in the products and read as zero.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import mlorc_optax as mlorc
    >>> a = jnp.outer(jnp.arange(1., 5.), jnp.arange(1., 4.))  # rank 1
    >>> f = mlorc.randomized_svd(a, 2, jax.random.key(0))
    >>> bool(jnp.allclose(mlorc.reconstruct(f), a, atol=1e-4))
    True

  Args:
    a: array of shape (..., m, n); leading axes are batch axes. Half-precision
      inputs are factored in float32 (CPU linear algebra rejects bf16/f16).
    rank: number of singular triplets to keep; values above min(m, n) keep
      min(m, n).
    key: a JAX PRNG key for the test matrix.
    oversample: extra test vectors beyond `rank`.
    power_iters: subspace (power) iterations, which sharpen the basis for
      matrices with slowly decaying spectra.
    warm_start: optional (..., n, j) right factor of a nearby matrix (the
      previous step's V), j <= rank + oversample. Its columns lead the test
      matrix, mixed with 0.1 of the Gaussian one so that new directions are
      still found and a zero `warm_start` is a plain random sketch. With a
      good warm start, power_iters=0 gives what a power iteration would.

  Returns:
    `LowRankFactors` with u (..., m, r), s (..., r), v (..., n, r),
    r = min(rank, m, n), in the computation dtype (float32 or float64).
  """
  rank = validation.check_positive_int('rank', rank)
  oversample = validation.check_non_negative_int('oversample', oversample)
  power_iters = validation.check_non_negative_int('power_iters', power_iters)
  if a.ndim < 2:
    raise ValueError(f'`a` must have at least 2 dimensions, got shape {a.shape}.')
  a = _finite(a.astype(jnp.promote_types(a.dtype, jnp.float32)))
  *batch, m, n = a.shape
  rank = min(rank, m, n)
  k = min(rank + oversample, m, n)
  if k == min(m, n):
    # A sketch as wide as the matrix saves nothing, and its Gram matrices
    # would square a condition number that a square Omega makes large.
    p = _thin_scale(m, n)
    f = _exact_svd(a * p, rank)
    return _capped(f._replace(s=f.s / p))
  p = _thin_scale(m, n)  # every product is of p a, computed as a (p x)
  omega = jax.random.normal(key, (*batch, n, k), a.dtype)
  if warm_start is not None:
    j = min(warm_start.shape[-1], k)
    lead = jnp.nan_to_num(warm_start[..., :j].astype(a.dtype), posinf=0, neginf=0)
    lead = lead + 0.1 * omega[..., :j] / n**0.5
    omega = jnp.concatenate([lead, omega[..., j:]], axis=-1)
  # Only the last basis of A's range must be orthonormal (it becomes u);
  # the ones before need only span.
  last = lambda i: _ORTHONORMAL if i == power_iters else _SPANNING
  q = _columns(_right_product(a, p * omega), last(0))
  for i in range(1, power_iters + 1):
    z = _rows(_left_product(p * q, a), _SPANNING)  # a^T q, kept as (k, n) rows
    q = _columns(_right_product(a, p * jnp.swapaxes(z, -1, -2)), last(i))
  f = _small_svd(q, _left_product(p * q, a), rank)
  return _capped(f._replace(s=f.s / p))
