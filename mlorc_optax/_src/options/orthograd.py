"""OrthoGrad: the gradient without its component along the parameter."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

# Guards the two divisions (a zero parameter, a gradient parallel to it), as
# in the reference code.
_TINY = 1e-30


def _orthogonalize(g: jax.Array, w: jax.Array) -> jax.Array:
  dtype = jnp.promote_types(g.dtype, jnp.float32)
  g_, w_ = g.astype(dtype).ravel(), w.astype(dtype).ravel()
  g_perp = g_ - (jnp.vdot(w_, g_) / (jnp.vdot(w_, w_) + _TINY)) * w_
  g_perp = g_perp * (jnp.linalg.norm(g_) / (jnp.linalg.norm(g_perp) + _TINY))
  return g_perp.reshape(g.shape).astype(g.dtype)


def orthograd(
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  r"""Removes from each gradient its component along the parameter, keeps its norm.

  For each parameter w and its gradient g, both flattened:

  .. math::
    g_\perp = g - \frac{\langle w, g\rangle}{\langle w, w\rangle + 10^{-30}} w,
    \quad g \leftarrow g_\perp \frac{\|g\|}{\|g_\perp\| + 10^{-30}}.

  Put it first in a chain, before the optimizer, so that the optimizer's
  moments (and Grams' or cautious masking's sign tests) see the orthogonal
  gradient. A parameter with a single entry is always parallel to its
  gradient, which this would replace by rounding noise: leave such
  parameters out with `mask`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = optax.chain(mlorc.orthograd(), optax.sgd(1.0))
    >>> params = {'w': jnp.array([1., 0.])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.array([3., 4.])}, state, params)
    >>> updates['w']  # (0, 4) rescaled to the norm 5 of (3, 4)
    Array([-0., -5.], dtype=float32)

  Args:
    mask: a tree like the parameters (or a prefix of it), or a function of
      the parameters returning one, with True where to orthogonalize, as in
      `optax.masked`; None for every parameter.

  Returns:
    An `optax.GradientTransformation` (stateless; it needs `params`).

  References:
    Prieto et al., `Grokking at the Edge of Numerical Stability
    <https://arxiv.org/abs/2501.04697>`_, 2025.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          '`orthograd` needs the parameters: call update(updates, state, params).'
      )
    return jax.tree.map(_orthogonalize, updates, params), state

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)
