"""Ready-made optimizers, built like optax's own aliases."""

from typing import Any, Callable

import optax

from mlorc_optax import transform

# Keyword arguments of the MLorc transforms that the aliases pass through.
_MLORC_KWARGS = ('compress', 'min_dim_size', 'oversample', 'power_iters', 'factor_dtype', 'seed')


def adam(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    nesterov: bool = False,
    **mlorc_kwargs: Any,
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
    **mlorc_kwargs: compress, min_dim_size, oversample, power_iters,
      factor_dtype, seed (see `compress_moments`).
  """
  return optax.chain(
      transform.scale_by_adam(
          rank, b1, b2, eps, eps_root, nesterov=nesterov, **_checked(mlorc_kwargs)
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
    **mlorc_kwargs: Any,
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
    **mlorc_kwargs: see `adam`.
  """
  return optax.chain(
      transform.scale_by_adam(
          rank, b1, b2, eps, eps_root, nesterov=nesterov, **_checked(mlorc_kwargs)
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
    **mlorc_kwargs: Any,
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
    **mlorc_kwargs: see `adam`.
  """
  return optax.chain(
      transform.scale_by_lion(rank, b1, b2, **_checked(mlorc_kwargs)),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _checked(kwargs: dict[str, Any]) -> dict[str, Any]:
  unknown = set(kwargs) - set(_MLORC_KWARGS)
  if unknown:
    raise TypeError(
        f'Unknown keyword arguments {sorted(unknown)}; the MLorc options are '
        f'{list(_MLORC_KWARGS)}.'
    )
  return kwargs
