"""The MLorc step of one matrix: reconstruct, repair, inner update, compress.

Per compressed matrix and step (arXiv 2506.01897):

1. reconstruct each stored moment, M~ = U diag(s) V^T;
2. for a non-negative moment (a second moment), replace its negative entries,
   artefacts of the low-rank reconstruction, by the mean of their magnitudes;
3. run the inner optimizer's own update with the full moments;
4. compress the moments it returns with a randomized SVD of rank r.

The update of a step uses the fresh full moments; only their factors survive.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mlorc_optax._src import repair
from mlorc_optax._src.leafwise import LeafwiseTransformation
from mlorc_optax._src.randomized_svd import LowRankFactors, cast_factors, randomized_svd, reconstruct


class Compressor(NamedTuple):
  """How new moments become factors."""

  rank: int
  oversample: int
  power_iters: int
  factor_dtype: Any
  warm_start: bool

  def __call__(self, x: jax.Array, key: jax.Array, previous: LowRankFactors | None = None) -> LowRankFactors:
    # Factor in the moment's own (promoted) dtype; cast the factors once.
    f = randomized_svd(
        x, self.rank, key, oversample=self.oversample, power_iters=self.power_iters,
        warm_start=previous.v if self.warm_start and previous is not None else None,
    )
    return cast_factors(f, self.factor_dtype)


def compute_dtype(dtype: Any) -> Any:
  """float16 moments overflow (g * g above 256): compressed matrices are
  updated in float32 instead; other dtypes as they are."""
  return jnp.float32 if dtype == jnp.float16 else dtype


def negative_fills(lw: LeafwiseTransformation, entries: dict[str, Any]) -> dict[str, jax.Array]:
  """Step 2's fill of each non-negative moment of one matrix (from its factors)."""
  return {name: repair.negative_fill(entries[name]) for name in lw.nonnegative}


def _moment_dtypes(lw: LeafwiseTransformation, g: jax.Array) -> dict[str, Any]:
  """The dtypes the optimizer gives the moments of a matrix like g."""
  return {n: x.dtype for n, x in jax.eval_shape(lw.init_leaf, g).items()}


def full_moments(
    lw: LeafwiseTransformation, g: jax.Array, entries: dict[str, Any], fills: dict[str, jax.Array]
) -> dict[str, Any]:
  """Steps 1 and 2: the entries with each stored moment reconstructed and repaired."""
  dtypes = _moment_dtypes(lw, g)
  full = dict(entries)
  for name in lw.moments:
    x = reconstruct(entries[name])
    if name in lw.nonnegative:
      x = repair.repair_nonnegative(x, fills[name])
    full[name] = x.astype(compute_dtype(dtypes[name]))
  return full


def _working(g: jax.Array, p: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """The gradient and parameter in the dtype the step runs in."""
  work = compute_dtype(g.dtype)
  return g.astype(work), None if p is None else p.astype(work)


def _inner_update(lw, g, p, entries, fills, glob, glob_mid):
  """Step 3 in the working dtype: (update, new entries, stats)."""
  return lw.update_leaf(*_working(g, p), full_moments(lw, g, entries, fills), glob, glob_mid)


def new_factors(lw, compressor, key, g, p, entries, fills, glob, glob_mid) -> dict[str, LowRankFactors]:
  """Steps 1 to 4 for one matrix, keeping the compressed new moments."""
  _, new, _ = _inner_update(lw, g, p, entries, fills, glob, glob_mid)
  return {
      name: compressor(new[name], jax.random.fold_in(key, j), entries[name])
      for j, name in enumerate(lw.moments)
  }


def update(
    lw, g, p, entries, fills, glob, glob_mid, residual_weights=None, factors=None
) -> tuple[jax.Array, dict[str, Any], Any]:
  """Steps 1 to 3 for one matrix, keeping the update, the entries that are
  not moments, and the stats. Recomputed apart from `new_factors`, so that
  XLA can fuse the update into its consumers.

  With `residual_weights` ({moment name: w}) and the new `factors`, the
  update is computed again with each named moment M~ replaced by
  M~ + w R, where R = m_t - U diag(s) V^T is what compressing the new moment
  m_t discards (see `compress_moments`'s `residual_correction`); the new
  entries and stats are those of the uncorrected step.
  """
  g_work, p_work = _working(g, p)
  full = full_moments(lw, g, entries, fills)
  u, new, stats = lw.update_leaf(g_work, p_work, full, glob, glob_mid)
  if residual_weights:
    corrected = dict(full)
    for name, w in residual_weights.items():
      residual = new[name] - reconstruct(factors[name]).astype(new[name].dtype)
      corrected[name] = full[name] + jnp.asarray(w, full[name].dtype) * residual.astype(full[name].dtype)
    u, _, _ = lw.update_leaf(g_work, p_work, corrected, glob, glob_mid)
  # Entries that are not moments keep their dtype (float16 ones were updated in float32).
  others = {k: v.astype(entries[k].dtype) for k, v in new.items() if k not in lw.moments}
  return u.astype(g.dtype), others, stats


def prepare(lw, g, p, entries, fills, glob) -> Any:
  """The pre-pass of one matrix: `lw.prepare_leaf` on its full moments."""
  return lw.prepare_leaf(*_working(g, p), full_moments(lw, g, entries, fills), glob)
