"""The second-moment repair of MLorc (step 2 of the method).

A low-rank reconstruction of a non-negative matrix can have negative
entries; they are replaced by the mean of their magnitudes.
"""

import jax
import jax.numpy as jnp

from mlorc_optax._src.randomized_svd import LowRankFactors, reconstruct


def _negative_sum_and_count(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  negative = x < 0
  return jnp.sum(jnp.where(negative, -x, 0)), jnp.sum(negative)


def _mean_magnitude(total: jax.Array, count: jax.Array) -> jax.Array:
  """Mean |negative entry| from their summed magnitude and number (0 if none)."""
  return total / jnp.maximum(count, 1)


def repair_nonnegative(x: jax.Array, fill: jax.Array | None = None) -> jax.Array:
  """Replaces negative entries by the mean of their magnitudes (MLorc step 2)."""
  if fill is None:
    top = jnp.max(jnp.abs(x))
    scale = jnp.where(top > 0, top, jnp.ones_like(top))  # no overflow in the sum
    fill = _mean_magnitude(*_negative_sum_and_count(x / scale)) * scale
  return jnp.where(x < 0, fill.astype(x.dtype), x)


# Largest reconstruction chunk of `negative_fill`, in entries (4 MiB in float32).
_CHUNK_ENTRIES = 2**20
# Matrices below that size are still done in this many chunks, so that the
# pass's buffers stay a small fraction of the matrix.
_MIN_CHUNKS = 8


def _chunk_rows(m: int, n: int) -> int:
  return max(1, min(-(-m // _MIN_CHUNKS), _CHUNK_ENTRIES // n))


def negative_fill(f: LowRankFactors, *, chunk_rows: int | None = None) -> jax.Array:
  """`repair_nonnegative`'s fill for reconstruct(f), a chunk of rows at a time.

  Done apart from the update, so that the reconstruction is never stored: the
  update then rebuilds it inside its own fused loop. The m rows are taken in
  m // c chunks of c rows and a remainder of m % c rows; c is at most
  ceil(m / 8) and keeps a chunk within 2**20 entries.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from mlorc_optax._src import repair
    >>> f = repair.LowRankFactors(  # the rank-1 matrix [[1, -3], [-1, 3], [2, -6]]
    ...     u=jnp.array([[1.0], [-1.0], [2.0]]), s=jnp.ones(1), v=jnp.array([[1.0], [-3.0]]))
    >>> repair.negative_fill(f, chunk_rows=2)  # mean of |-3|, |-1|, |-6|
    Array(3.3333333, dtype=float32)

  Args:
    f: factors of one (m, n) matrix: u (m, r), s (r,), v (n, r).
    chunk_rows: rows per chunk; None for the default described above.

  Returns:
    The mean magnitude of the negative entries of reconstruct(f), 0 if none.
  """
  m, n = f.u.shape[0], f.v.shape[0]
  # Summed on the matrix divided by its largest singular value, so that the
  # sum cannot overflow for a moment near the float range (its mean is then
  # scaled back).
  top = jnp.max(f.s)
  scale = jnp.where(top > 0, top, jnp.ones_like(top))
  f = f._replace(s=f.s / scale)
  c = _chunk_rows(m, n) if chunk_rows is None else max(1, min(chunk_rows, m))
  chunks, rest = divmod(m, c)
  stats = lambda u: _negative_sum_and_count(reconstruct(f._replace(u=u)))
  if chunks == 1:
    total, count = stats(f.u[:c])
  else:
    # Interleaved chunks (rows i, i + chunks, ...) leave a row sharding on the
    # chunk's own rows, not on the mapped axis, which lax.map would refuse.
    main = f.u[: chunks * c].reshape(c, chunks, -1)
    totals, counts = jax.lax.map(stats, jnp.swapaxes(main, 0, 1))
    total, count = jnp.sum(totals), jnp.sum(counts)
  if rest:
    rest_total, rest_count = stats(f.u[chunks * c:])
    total, count = total + rest_total, count + rest_count
  return _mean_magnitude(total, count) * scale
