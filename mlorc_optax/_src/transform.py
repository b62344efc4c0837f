"""MLorc-Adam and MLorc-Lion: optax's Adam and Lion with low-rank moments."""

from typing import Any

import optax

from mlorc_optax._src import validation
from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src.compress_moments import compress_moments


def _check_betas(b1, b2) -> None:
  validation.check_in_unit_interval('b1', b1)
  validation.check_in_unit_interval('b2', b2)


def scale_by_adam(
    rank: int = 4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    nesterov: bool = False,
    compress: mv.CompressArg = None,
    min_dim_size: int = 128,
    oversample: int = 0,
    power_iters: int = 1,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam's rescaling with both moments stored as rank-`rank` factors (MLorc-Adam).

  With the stored moments reconstructed as M~ and V~ (negative entries of V~
  replaced by their mean magnitude):

  .. math::
    m_t = b_1 \tilde M + (1 - b_1) g_t,\quad
    v_t = b_2 \tilde V + (1 - b_2) g_t^2,\quad
    u_t = \frac{m_t / (1 - b_1^t)}{\sqrt{v_t / (1 - b_2^t) + \epsilon_{root}} + \epsilon},

  then m_t and v_t are compressed by `randomized_svd`. Parameters that are
  not compressed (see `compress`) keep optax's full Adam moments, and at
  rank >= min(m, n) the result equals `optax.scale_by_adam`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = optax.chain(mlorc.scale_by_adam(rank=4), optax.scale(-1e-3))
    >>> params = {'w': jnp.ones((256, 128))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)

  Args:
    rank: rank of the stored moments.
    b1, b2, eps, eps_root, nesterov: as in `optax.scale_by_adam`.
    compress, min_dim_size, oversample, power_iters, factor_dtype, seed,
      warm_start: as in `compress_moments`. Defaults follow the MLorc reference code.
  """
  _check_betas(b1, b2)
  validation.check_non_negative('eps', eps)
  validation.check_non_negative('eps_root', eps_root)
  return compress_moments(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov),
      rank, nonnegative=('nu',), compress=compress, min_dim_size=min_dim_size,
      oversample=oversample, power_iters=power_iters,
      factor_dtype=factor_dtype, seed=seed, warm_start=warm_start,
  )


def scale_by_lion(
    rank: int = 4,
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    compress: mv.CompressArg = None,
    min_dim_size: int = 128,
    oversample: int = 0,
    power_iters: int = 0,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Lion's update with its momentum stored as rank-`rank` factors (MLorc-Lion).

  .. math::
    u_t = \mathrm{sign}(b_1 \tilde M + (1 - b_1) g_t),\quad
    m_t = b_2 \tilde M + (1 - b_2) g_t,

  with m_t compressed by `randomized_svd` (no power iteration by default, as
  in the reference code). At full rank it equals `optax.scale_by_lion`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = optax.chain(mlorc.scale_by_lion(rank=4), optax.scale(-1e-4))
    >>> state = tx.init({'w': jnp.ones((256, 128))})

  Args:
    rank: rank of the stored momentum.
    b1, b2: as in `optax.scale_by_lion`.
    compress, min_dim_size, oversample, power_iters, factor_dtype, seed,
      warm_start: as in `compress_moments`.
  """
  _check_betas(b1, b2)
  return compress_moments(
      optax.scale_by_lion(b1=b1, b2=b2),
      rank, nonnegative=(), compress=compress, min_dim_size=min_dim_size,
      oversample=oversample, power_iters=power_iters,
      factor_dtype=factor_dtype, seed=seed, warm_start=warm_start,
  )
