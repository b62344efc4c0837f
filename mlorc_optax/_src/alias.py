"""Ready-made optimizers, built like optax's own aliases."""

from typing import Any, Callable

import optax

from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src import transform

# Arguments that fix array shapes or are callables: under optax.inject_hyperparams
# they must be static, e.g. `inject_hyperparams(mlorc.adamw, static_args=STATIC_ARGS)`.
STATIC_ARGS = ('rank', 'compress', 'min_dim_size', 'oversample', 'power_iters')


def adam(
    learning_rate: optax.ScalarOrSchedule,
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
  """MLorc-Adam: `optax.adam` with rank-`rank` moments.

  Example:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.adam(1e-3, rank=4)
    >>> state = tx.init({'w': jnp.ones((256, 128))})

  Args:
    learning_rate: a float or an optax schedule.
    rank, b1, b2, eps, eps_root, nesterov: see `scale_by_adam`.
    compress, min_dim_size, oversample, power_iters, factor_dtype, seed: see
      `compress_moments`.
  """
  return optax.chain(
      transform.scale_by_adam(
          rank, b1, b2, eps, eps_root, nesterov=nesterov, **_options(locals())
      ),
      optax.scale_by_learning_rate(learning_rate),
  )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
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
  """MLorc-AdamW: `optax.adamw` (decoupled weight decay) with rank-`rank` moments.

  Example:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.adamw(1e-3, rank=4, weight_decay=0.01)
    >>> state = tx.init({'w': jnp.ones((256, 128))})

  Args:
    learning_rate: a float or an optax schedule.
    rank, b1, b2, eps, eps_root, nesterov: see `scale_by_adam`.
    weight_decay, mask: as in `optax.adamw`.
    compress, ..., seed: see `compress_moments`.
  """
  return optax.chain(
      transform.scale_by_adam(
          rank, b1, b2, eps, eps_root, nesterov=nesterov, **_options(locals())
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def lion(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 4,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    compress: mv.CompressArg = None,
    min_dim_size: int = 128,
    oversample: int = 0,
    power_iters: int = 0,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """MLorc-Lion: `optax.lion` with a rank-`rank` momentum.

  Example:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.lion(1e-4, rank=4)
    >>> state = tx.init({'w': jnp.ones((256, 128))})

  Args:
    learning_rate: a float or an optax schedule.
    rank, b1, b2: see `scale_by_lion`.
    weight_decay, mask: as in `optax.lion`.
    compress, ..., seed: see `compress_moments`.
  """
  return optax.chain(
      transform.scale_by_lion(rank, b1, b2, **_options(locals())),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _options(arguments: dict[str, Any]) -> dict[str, Any]:
  """The MLorc options among an alias's arguments (its `locals()`), to pass on."""
  names = ('compress', 'min_dim_size', 'oversample', 'power_iters', 'factor_dtype', 'seed', 'warm_start')
  return {name: arguments[name] for name in names}
