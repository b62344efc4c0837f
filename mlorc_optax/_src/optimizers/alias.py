"""Ready-made optimizers, built like optax's own aliases.

Each takes optax's positional arguments in optax's order and with its
defaults, so that ``mlorc.adamw(1e-3, 0.9, 0.95)`` means what
``optax.adamw(1e-3, 0.9, 0.95)`` does, then the MLorc options, keyword-only.
"""

from typing import Any, Callable

import jax
import optax

from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src.optimizers import transform

# The MLorc options that fix array shapes or dtypes, or may be callables. Under
# `optax.inject_hyperparams` an int or a callable argument is traced or taken
# for a schedule unless it is static; None (the default of all but `rank`)
# and strings stay static anyway, so `static_args=('rank',)` is enough unless
# you pass the others: `inject_hyperparams(mlorc.adamw, static_args=STATIC_ARGS)`.
STATIC_ARGS = ('rank', 'compress', 'min_dim_size', 'oversample', 'power_iters', 'factor_dtype')


def adam(
    learning_rate: optax.ScalarOrSchedule,
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
  """MLorc-Adam: `optax.adam` with both moments stored as rank-`rank` factors.

  The update is `scale_by_adam`'s, scaled by -learning_rate.

  Example:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.adam(1e-3, rank=4)
    >>> params = {'w': jnp.ones((256, 128)), 'b': jnp.ones(128)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> state[0].inner_state.nu['w'].s.shape, state[0].inner_state.nu['b'].shape
    ((4,), (128,))

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: term added to the denominator (not used with `atan2`).
    eps_root: term added to the second moment inside the square root.
    mu_dtype: optional dtype of the first moment; see `scale_by_adam`.
    nesterov: use Nesterov momentum.
    atan2: use Adam-atan2's bounded update; see `scale_by_adam`.
    rank: rank of the stored moments.
    compress: which parameters to compress, and how; see `compress_moments`.
    min_dim_size: smallest matrix side the default policy compresses; None
      for the library default (64).
    oversample: extra test vectors of the randomized SVD; None for 0.
    power_iters: power iterations of the randomized SVD; None for 1.
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices.
    warm_start: start each sketch from the previous step's right factor.
    residual_correction: apply now this fraction of the future contribution
      of what compressing the momentum discards; see `scale_by_adam`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025

    Halko, Martinsson and Tropp, `Finding Structure with Randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review, 2011

    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014
  """
  return optax.chain(
      transform.scale_by_adam(
          b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, atan2=atan2,
          rank=rank, compress=compress, min_dim_size=min_dim_size,
          oversample=oversample, power_iters=power_iters,
          factor_dtype=factor_dtype, seed=seed, warm_start=warm_start,
          residual_correction=residual_correction,
      ),
      optax.scale_by_learning_rate(learning_rate),
  )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
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
  """MLorc-AdamW: `optax.adamw` (decoupled weight decay) with rank-`rank` moments.

  The update is -learning_rate (u_t + weight_decay * params), u_t being
  `scale_by_adam`'s.

  Example:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.adamw(1e-3, weight_decay=0.01, rank=4)
    >>> params = {'w': jnp.ones((256, 128))}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates['w'].shape
    (256, 128)

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: term added to the denominator (not used with `atan2`).
    eps_root: term added to the second moment inside the square root.
    mu_dtype: optional dtype of the first moment; see `scale_by_adam`.
    weight_decay: strength of the decoupled weight decay (a float or a
      schedule), as in `optax.adamw`.
    mask: a tree of booleans like the parameters, or a callable returning
      one, marking the parameters to decay; None decays all.
    nesterov: use Nesterov momentum.
    atan2: use Adam-atan2's bounded update; see `scale_by_adam`.
    rank: rank of the stored moments.
    compress: which parameters to compress, and how; see `compress_moments`.
    min_dim_size: smallest matrix side the default policy compresses; None
      for the library default (64).
    oversample: extra test vectors of the randomized SVD; None for 0.
    power_iters: power iterations of the randomized SVD; None for 1.
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices.
    warm_start: start each sketch from the previous step's right factor.
    residual_correction: apply now this fraction of the future contribution
      of what compressing the momentum discards; see `scale_by_adam`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025

    Halko, Martinsson and Tropp, `Finding Structure with Randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review, 2011

    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019
  """
  return optax.chain(
      transform.scale_by_adam(
          b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, atan2=atan2,
          rank=rank, compress=compress, min_dim_size=min_dim_size,
          oversample=oversample, power_iters=power_iters,
          factor_dtype=factor_dtype, seed=seed, warm_start=warm_start,
          residual_correction=residual_correction,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: jax.typing.DTypeLike | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask: Any | Callable[[optax.Params], Any] | None = None,
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
  """MLorc-Lion: `optax.lion` with its momentum stored as rank-`rank` factors.

  Example:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.lion(1e-4, rank=4)
    >>> params = {'w': jnp.ones((256, 128))}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates['w'].dtype
    dtype('float32')

  Args:
    learning_rate: a float or an optax schedule.
    b1: rate of the interpolation that gives the update's sign.
    b2: decay rate of the stored momentum.
    mu_dtype: optional dtype of the momentum; see `scale_by_lion`.
    weight_decay: strength of the decoupled weight decay (a float or a
      schedule), as in `optax.lion`.
    mask: a tree of booleans like the parameters, or a callable returning
      one, marking the parameters to decay; None decays all.
    rank: rank of the stored momentum.
    compress: which parameters to compress, and how; see `compress_moments`.
    min_dim_size: smallest matrix side the default policy compresses; None
      for the library default (64).
    oversample: extra test vectors of the randomized SVD; None for 0.
    power_iters: power iterations of the randomized SVD; None for 0 (Lion's
      reference default).
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices.
    warm_start: start each sketch from the previous step's right factor.
    residual_correction: apply now this fraction of the future contribution
      of what compressing the momentum discards; see `scale_by_lion`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025

    Halko, Martinsson and Tropp, `Finding Structure with Randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review, 2011

    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023
  """
  return optax.chain(
      transform.scale_by_lion(
          b1, b2, mu_dtype, rank=rank, compress=compress,
          min_dim_size=min_dim_size, oversample=oversample,
          power_iters=power_iters, factor_dtype=factor_dtype, seed=seed,
          warm_start=warm_start, residual_correction=residual_correction,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
