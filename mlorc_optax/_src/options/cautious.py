"""Cautious masking of an optimizer's update, and cautious weight decay."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mlorc_optax._src.options.grams import direction_sign

# Lower bound of the kept fraction in the rescaling: when almost nothing is
# kept, the few kept entries grow at most 1000-fold.
_MIN_KEPT_FRACTION = 1e-3


def _cautious_leaf(u: jax.Array, g: jax.Array, sign: int) -> jax.Array:
  dtype = jnp.promote_types(u.dtype, jnp.float32)
  kept = sign * u * g > 0
  fraction = jnp.maximum(jnp.mean(kept, dtype=dtype), _MIN_KEPT_FRACTION)
  return jnp.where(kept, u.astype(dtype) / fraction, 0).astype(u.dtype)


def cautious(
    inner: optax.GradientTransformation,
    *,
    direction: str = 'descent',
) -> optax.GradientTransformationExtraArgs:
  r"""Cautious masking: drops the update entries that disagree with the gradient.

  With g the incoming updates (the gradient) and u the updates `inner`
  returns for them, for each parameter tensor:

  .. math::
    \phi = \mathbb{1}[s\, u\, g > 0],\quad
    u \leftarrow \frac{u\, \phi}{\max(\mathrm{mean}(\phi), 10^{-3})},

  with s = -1 for ``direction='descent'`` (u is added to the parameters:
  `inner` is a full optimizer, the kept entries are those that descend) and
  s = +1 for ``direction='gradient'`` (`inner` is a ``scale_by_*``
  transformation, as where the reference code applies it, before weight
  decay and the learning rate). The mean is over the whole tensor (all
  layers of a scanned parameter together). The state is `inner`'s own.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.cautious(optax.sgd(0.1, momentum=0.9))
    >>> params = {'w': jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.array([1., 1.])}, state, params)
    >>> updates, state = tx.update({'w': jnp.array([1., -0.5])}, state, params)
    >>> updates['w']  # momentum alone: (-0.19, -0.04); entry 1 ascends: dropped
    Array([-0.38,  0.  ], dtype=float32)

  Args:
    inner: the transformation whose updates are masked.
    direction: ``'descent'`` or ``'gradient'``: which way `inner`'s updates
      point (see above).

  Returns:
    An `optax.GradientTransformationExtraArgs` with `inner`'s state.

  References:
    Liang et al., `Cautious Optimizers: Improving Training with One Line of
    Code <https://arxiv.org/abs/2411.16085>`_, 2024.
  """
  sign = direction_sign(direction)
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, state = inner.update(updates, state, params, **extra_args)
    new_updates = jax.tree.map(
        lambda u, g: _cautious_leaf(u, g, sign), new_updates, updates
    )
    return new_updates, state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


class CautiousWeightDecayState(NamedTuple):
  """State of `add_cautious_weight_decay` with a scheduled weight decay.

  Attributes:
    count: number of updates so far (int32), the schedule's argument.
  """

  count: jax.Array


def add_cautious_weight_decay(
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  r"""Adds decayed weights where the update and the parameter agree in sign.

  With u the incoming update, pointing along the gradient (the output of a
  ``scale_by_*`` transformation), and w the parameter:

  .. math::
    u \leftarrow u + \lambda\, \mathbb{1}[u\, w \ge 0]\, w,

  so that after the learning rate, :math:`w \leftarrow w - \eta (u + \lambda
  \mathbb{1}[u w \ge 0] w)`: the decay only acts where it pulls the same way
  as the optimizer. Put it where `optax.add_decayed_weights` goes in a chain:
  after the optimizer's ``scale_by_*`` (it must see the optimizer's update,
  not the raw gradient) and before `optax.scale_by_learning_rate`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = optax.chain(
    ...     mlorc.scale_by_adam(), mlorc.add_cautious_weight_decay(0.1),
    ...     optax.scale_by_learning_rate(1e-3))
    >>> params = {'w': jnp.array([1., 1.])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.array([1., -1.])}, state, params)
    >>> jnp.round(updates['w'], 6)  # entry 1: update and weight disagree, no decay
    Array([-0.0011,  0.001 ], dtype=float32)

  Args:
    weight_decay: the decay rate :math:`\lambda`, a float or a schedule of
      the step count.
    mask: a tree like the parameters (or a prefix of it), or a function of
      the parameters returning one, with True where to decay, as in
      `optax.add_decayed_weights`.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Chen et al., `Cautious Weight Decay <https://arxiv.org/abs/2510.12402>`_,
    2025.
  """

  def init_fn(params):
    del params
    if callable(weight_decay):
      return CautiousWeightDecayState(count=jnp.zeros([], jnp.int32))
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          '`add_cautious_weight_decay` needs the parameters: call update(updates, state, params).'
      )
    if callable(weight_decay):
      rate = weight_decay(state.count)
      state = CautiousWeightDecayState(optax.safe_increment(state.count))
    else:
      rate = weight_decay
    updates = jax.tree.map(
        lambda u, w: (u + rate * jnp.where(u * w >= 0, w, 0)).astype(u.dtype),
        updates, params,
    )
    return updates, state

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)
