"""Adam-atan2: Adam's rescaling with atan2 in place of the division by sqrt(v) + eps."""

import math

import jax
import jax.numpy as jnp
import optax

from mlorc_optax._src import validation

# atan2(x, |x|) = pi / 4: with this scale a first step is +-1, as Adam's is.
_SCALE = 4 / math.pi


def scale_by_adam_atan2(
    b1: float = 0.9,
    b2: float = 0.999,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformation:
  r"""Rescale updates by Adam-atan2, a full-state transformation.

  With optax's moments and bias corrections (t counts from 1),

  .. math::
    m_t = b_1 m_{t-1} + (1 - b_1) g_t,\quad
    v_t = b_2 v_{t-1} + (1 - b_2) g_t^2,\quad
    u_t = \tfrac{4}{\pi} \operatorname{atan2}\Big(\frac{m_t}{1 - b_1^t},
        \sqrt{\frac{v_t}{1 - b_2^t}}\Big).

  There is no epsilon: atan2 is defined at (0, 0) (as 0), |u_t| <= 2, and
  u_t ~ (4/pi) m_hat / sqrt(v_hat) where that ratio is small. The bias
  correction of m is inside the atan2, as in Everett et al.; the MLorc_optim
  package scales atan2(m_t, sqrt(v_hat)) by 1 / (1 - b_1^t) afterwards
  instead, which differs while t is small.

  The state is optax's `ScaleByAdamState`, so `compress_moments(...,
  nonnegative=('nu',))` compresses it as it does Adam's; `scale_by_adam(...,
  atan2=True)` is that combination.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from mlorc_optax._src.optimizers.adam_atan2 import scale_by_adam_atan2
    >>> tx = scale_by_adam_atan2()
    >>> params = {'w': jnp.array([1.0, -2.0, 0.0])}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> updates['w'].round(4)  # a first step is +-1, as Adam's
    Array([ 1., -1.,  0.], dtype=float32)

  Args:
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    mu_dtype: optional dtype of the first moment; None keeps the parameters'.
    nesterov: use Nesterov momentum for the first moment, as
      `optax.scale_by_adam` does.

  Returns:
    An `optax.GradientTransformation` with `optax.ScaleByAdamState`.

  References:
    Everett et al., `Scaling Exponents Across Parameterizations and
    Optimizers <https://arxiv.org/abs/2407.05872>`_, 2024
  """
  validation.check_in_unit_interval('b1', b1)
  validation.check_in_unit_interval('b2', b2)
  mu_dtype = None if mu_dtype is None else validation.canonical_float_dtype('mu_dtype', mu_dtype)

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    if nesterov:
      mu_hat = jax.tree.map(
          lambda m, g: b1 * m + (1 - b1) * g,
          optax.tree.bias_correction(mu, b1, optax.safe_increment(count)),
          optax.tree.bias_correction(updates, b1, count),
      )
    else:
      mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    updates = jax.tree.map(
        lambda m, v: None if m is None else _SCALE * jnp.arctan2(m, jnp.sqrt(v)),
        mu_hat,
        nu_hat,
        is_leaf=lambda x: x is None,
    )
    return updates, optax.ScaleByAdamState(
        count=count, mu=optax.tree.cast(mu, mu_dtype), nu=optax.tree.cast_like(nu, state.nu)
    )

  return optax.GradientTransformation(init_fn, update_fn)
