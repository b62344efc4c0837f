"""Grams: the update takes the gradient's sign and the optimizer's magnitude."""

import jax
import jax.numpy as jnp
import optax

_DIRECTIONS = ('descent', 'gradient')


def direction_sign(direction: str) -> int:
  """-1 for updates that are added to the parameters, +1 for gradient-like ones.

  Args:
    direction: ``'descent'`` when the wrapped transformation's updates are
      added to the parameters (a full optimizer such as `mlorc.adamw`, or
      anything after `optax.scale_by_learning_rate`); ``'gradient'`` when they
      point along the gradient (a ``scale_by_*`` transformation before the
      learning rate).
  """
  if direction not in _DIRECTIONS:
    raise ValueError(
        f"`direction` must be 'descent' (the wrapped transformation is a full "
        f"optimizer, its updates are added to the parameters) or 'gradient' "
        f"(a scale_by_* transformation, before the learning rate), got "
        f'{direction!r}.'
    )
  return -1 if direction == 'descent' else 1


def grams(
    inner: optax.GradientTransformation,
    *,
    direction: str = 'descent',
) -> optax.GradientTransformationExtraArgs:
  r"""Grams: gives `inner`'s update the sign of the gradient, keeps its magnitude.

  With g the incoming updates (the gradient) and u the updates `inner`
  returns for them,

  .. math::
    u \leftarrow s\, \mathrm{sign}(g)\, |u|,

  elementwise, with s = -1 for ``direction='descent'`` (u is added to the
  parameters: `inner` is a full optimizer) and s = +1 for
  ``direction='gradient'`` (u points along the gradient: `inner` is a
  ``scale_by_*`` transformation, as where the reference code applies it,
  before weight decay and the learning rate). The state is `inner`'s own, so
  `optax.tree.map_params`, `optax.inject_hyperparams` fields and
  `nnx.Optimizer` see it unchanged.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.grams(optax.sgd(0.1, momentum=0.9))
    >>> params = {'w': jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.array([1., 1.])}, state, params)
    >>> updates, state = tx.update({'w': jnp.array([1., -0.5])}, state, params)
    >>> updates['w']  # momentum alone would give (-0.19, -0.04)
    Array([-0.19,  0.04], dtype=float32)

  Args:
    inner: the transformation whose updates get the gradient's sign.
    direction: ``'descent'`` or ``'gradient'``: which way `inner`'s updates
      point (see above).

  Returns:
    An `optax.GradientTransformationExtraArgs` with `inner`'s state.

  References:
    Cao et al., `Grams: Gradient Descent with Adaptive Momentum Scaling
    <https://arxiv.org/abs/2412.17107>`_, 2024.
  """
  sign = direction_sign(direction)
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, state = inner.update(updates, state, params, **extra_args)
    new_updates = jax.tree.map(
        lambda u, g: (sign * jnp.sign(g) * jnp.abs(u)).astype(u.dtype),
        new_updates, updates,
    )
    return new_updates, state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
