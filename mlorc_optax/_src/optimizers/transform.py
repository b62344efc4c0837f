"""MLorc-Adam and MLorc-Lion: optax's Adam and Lion with low-rank moments.

Both take optax's own arguments, in optax's order and with its defaults, then
the MLorc options, keyword-only and the same in every factory of the library:
`rank`, `compress`, `min_dim_size`, `oversample`, `power_iters`,
`factor_dtype`, `seed` and `warm_start` (see `compress_moments`). A None
option means the library's default, resolved inside, so that
`optax.inject_hyperparams` leaves it static.
"""

from typing import Any

import jax
import optax

from mlorc_optax._src.optimizers import adam_atan2
from mlorc_optax._src import validation
from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src.compress_moments import compress_moments

# The reference code sketches Lion's momentum without a power iteration.
_LION_POWER_ITERS = 0


def residual_weights(c, decay, moment: str = 'mu') -> dict[str, Any] | None:
  """`compress_moments`'s residual_correction for a heavy-ball first moment
  (m = decay M~ + ...) named `moment`: applying c of R's future weight
  decay / (1 - decay) now is the same as adding c / (1 - decay) R to the
  stored moment before the step."""
  if c is None or validation.is_concrete_zero(c):
    return None
  validation.check_non_negative('residual_correction', c)
  return {moment: c / (1 - decay)}


def _check_betas(b1, b2) -> None:
  validation.check_in_unit_interval('b1', b1)
  validation.check_in_unit_interval('b2', b2)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    atan2: bool = False,
    rank: int = 4,
    compress: mv.CompressArg = None,
    min_dim_size: int | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
    residual_correction: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam's rescaling with both moments stored as rank-`rank` factors (MLorc-Adam).

  With the stored moments reconstructed as M~ and V~ (negative entries of V~
  replaced by the mean magnitude of the negative entries):

  .. math::
    m_t = b_1 \tilde M + (1 - b_1) g_t,\quad
    v_t = b_2 \tilde V + (1 - b_2) g_t^2,\quad
    u_t = \frac{m_t / (1 - b_1^t)}{\sqrt{v_t / (1 - b_2^t) + \epsilon_{root}} + \epsilon},

  then m_t and v_t are compressed by `randomized_svd`. With `atan2`, u_t is
  Adam-atan2's (4/pi) atan2(m_t / (1 - b_1^t), sqrt(v_t / (1 - b_2^t)))
  instead, and eps, eps_root are not used. Parameters that are not compressed
  (see `compress`) keep full moments, and at rank >= min(m, n) the result
  equals `optax.scale_by_adam`.

  Residual correction: compressing m_t to its rank-r factors M~_t discards
  R_t = m_t - M~_t. Had it been kept, the heavy-ball recursion would have
  added b_1^k R_t to the first moment k steps later, b_1 / (1 - b_1) R_t in
  all. With `residual_correction` c, c times that is applied now:

  .. math::
    u_t = \frac{(m_t + c \frac{b_1}{1 - b_1} R_t) / (1 - b_1^t)}
               {\sqrt{v_t / (1 - b_2^t) + \epsilon_{root}} + \epsilon}.

  It costs no state (R_t is formed from m_t and the new factors within the
  step) and leaves the stored moments as they are: only the update changes.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = optax.chain(mlorc.scale_by_adam(rank=4), optax.scale(-1e-3))
    >>> params = {'w': jnp.ones((256, 128))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)
    >>> state[0].inner_state.mu['w'].u.shape
    (256, 4)

  Args:
    b1: decay rate of the first moment, as in `optax.scale_by_adam`.
    b2: decay rate of the second moment.
    eps: term added to the denominator (not used with `atan2`).
    eps_root: term added to the second moment inside the square root (not
      used with `atan2`).
    mu_dtype: optional dtype of the first moment where it is kept in full,
      and of its reconstruction; None keeps the parameters' dtype.
    nesterov: use Nesterov momentum, as `optax.scale_by_adam` does.
    atan2: use Adam-atan2's bounded update, which needs no eps.
    rank: rank of the stored moments; a matrix with min(m, n) <= rank is
      stored exactly.
    compress: which parameters to compress and how to view them as
      matrices: None for `default_view`, or a tree (or a callable returning
      one) of `MatrixView` / True / False entries, see `resolve_views`.
    min_dim_size: the default policy compresses a parameter whose last two
      axes both have at least this many entries; None for the library
      default (`matrix_view.DEFAULT_MIN_DIM_SIZE`, 64).
    oversample: extra test vectors of the randomized SVD; None for 0.
    power_iters: power iterations of the randomized SVD; None for 1, as in
      the MLorc reference code.
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices, one per parameter and step.
    warm_start: start each step's sketch from the previous step's right
      factor (see `randomized_svd`); then power_iters=0 is usually enough.
    residual_correction: the fraction c >= 0 of the first moment's
      compression residual's future contribution applied to this step's
      update (see above); None or 0 for the paper's MLorc.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `CompressedMomentsState` around optax's `ScaleByAdamState`.

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025

    Halko, Martinsson and Tropp, `Finding Structure with Randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review, 2011

    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014
  """
  _check_betas(b1, b2)
  validation.check_non_negative('eps', eps)
  validation.check_non_negative('eps_root', eps_root)
  if atan2:
    inner = adam_atan2.scale_by_adam_atan2(b1, b2, mu_dtype, nesterov=nesterov)
  else:
    inner = optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)
  return compress_moments(
      inner,
      rank,
      nonnegative=('nu',),
      compress=compress,
      min_dim_size=min_dim_size,
      oversample=oversample,
      power_iters=power_iters,
      factor_dtype=factor_dtype,
      seed=seed,
      warm_start=warm_start,
      residual_correction=residual_weights(residual_correction, b1),
  )


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    rank: int = 4,
    compress: mv.CompressArg = None,
    min_dim_size: int | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
    residual_correction: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Lion's update with its momentum stored as rank-`rank` factors (MLorc-Lion).

  .. math::
    u_t = \mathrm{sign}(b_1 \tilde M + (1 - b_1) g_t),\quad
    m_t = b_2 \tilde M + (1 - b_2) g_t,

  with m_t compressed by `randomized_svd` (no power iteration by default, as
  in the reference code). At full rank it equals `optax.scale_by_lion`.

  Residual correction: compression discards R_t = m_t - M~_t; kept, it would
  have entered the next steps' sign arguments with weights b_1 b_2^(k-1),
  b_1 / (1 - b_2) in all. With `residual_correction` c, c times that enters
  this step's: u_t = sign(b_1 M~ + (1 - b_1) g_t + c b_1 / (1 - b_2) R_t).
  As for Adam it costs no state; the stored momentum is unchanged.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = optax.chain(mlorc.scale_by_lion(rank=4), optax.scale(-1e-4))
    >>> state = tx.init({'w': jnp.ones((256, 128))})
    >>> state[0].inner_state.mu['w'].v.shape
    (128, 4)

  Args:
    b1: rate of the interpolation that gives the update's sign, as in
      `optax.scale_by_lion`.
    b2: decay rate of the stored momentum.
    mu_dtype: optional dtype of the momentum where it is kept in full, and
      of its reconstruction; None keeps the parameters' dtype.
    rank: rank of the stored momentum; a matrix with min(m, n) <= rank is
      stored exactly.
    compress: which parameters to compress and how to view them as
      matrices: None for `default_view`, or a tree (or a callable returning
      one) of `MatrixView` / True / False entries, see `resolve_views`.
    min_dim_size: the default policy compresses a parameter whose last two
      axes both have at least this many entries; None for the library
      default (`matrix_view.DEFAULT_MIN_DIM_SIZE`, 64).
    oversample: extra test vectors of the randomized SVD; None for 0.
    power_iters: power iterations of the randomized SVD; None for 0, as in
      the MLorc reference code for Lion.
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices, one per parameter and step.
    warm_start: start each step's sketch from the previous step's right
      factor (see `randomized_svd`).
    residual_correction: the fraction c >= 0 of the momentum's compression
      residual's future contribution applied to this step's update (see
      above); None or 0 for the paper's MLorc.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `CompressedMomentsState` around optax's `ScaleByLionState`.

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025

    Halko, Martinsson and Tropp, `Finding Structure with Randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review, 2011

    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023
  """
  _check_betas(b1, b2)
  return compress_moments(
      optax.scale_by_lion(b1, b2, mu_dtype),
      rank,
      nonnegative=(),
      compress=compress,
      min_dim_size=min_dim_size,
      oversample=oversample,
      power_iters=_LION_POWER_ITERS if power_iters is None else power_iters,
      factor_dtype=factor_dtype,
      seed=seed,
      warm_start=warm_start,
      residual_correction=residual_weights(residual_correction, b2),
  )
