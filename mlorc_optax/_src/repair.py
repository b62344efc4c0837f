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
    fill = _mean_magnitude(*_negative_sum_and_count(x))
  return jnp.where(x < 0, fill.astype(x.dtype), x)


def negative_fill(f: LowRankFactors) -> jax.Array:
  """`repair_nonnegative`'s fill for reconstruct(f), a block of rows at a time.

  Done apart from the update, so that the reconstruction is never stored: the
  update then rebuilds it inside its own fused loop.
  """
  m = f.u.shape[0]
  blocks = max(d for d in range(1, 9) if m % d == 0)
  # Interleaved blocks (rows i, i + blocks, ...) leave a row sharding on the
  # block's own rows, not on the mapped axis, which lax.map would refuse.
  interleaved = jnp.swapaxes(f.u.reshape(m // blocks, blocks, -1), 0, 1)
  totals, counts = jax.lax.map(
      lambda u: _negative_sum_and_count(reconstruct(f._replace(u=u))), interleaved
  )
  return _mean_magnitude(jnp.sum(totals), jnp.sum(counts))
