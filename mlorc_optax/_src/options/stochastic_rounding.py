"""Applying updates to bfloat16 parameters with stochastic rounding."""

import jax
import jax.numpy as jnp
import optax


def _round_to_bfloat16(x: jax.Array, key: jax.Array) -> jax.Array:
  """Rounds float32 `x` to a neighbouring bfloat16 value, unbiased.

  bfloat16 is float32 without its low 16 bits. Adding a uniform integer in
  [0, 2^16) to the bit pattern carries into bit 16 with probability (low bits)
  / 2^16, which is the distance to the lower neighbour in units of the gap,
  so the expectation is x (the sign bit is apart: magnitudes round alike).
  """
  noise = jax.random.bits(key, x.shape, jnp.uint16).astype(jnp.uint32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
  # Infinities and NaNs stay what they are (clearing the low bits could turn
  # a NaN into an infinity).
  return jnp.where(jnp.isfinite(x), rounded, x).astype(jnp.bfloat16)


def apply_updates_stochastic(
    params: optax.Params, updates: optax.Updates, key: jax.Array
) -> optax.Params:
  r"""`optax.apply_updates` with stochastic rounding for bfloat16 parameters.

  For a bfloat16 parameter w with update u, computes :math:`x = w + u` in
  float32 and rounds it up or down to a neighbouring bfloat16 value with
  probabilities that make :math:`E[\mathrm{round}(x)] = x` (a uniform random
  integer in :math:`[0, 2^{16})` is added to the bit pattern of x and the low
  16 bits are cleared). Updates smaller than the bfloat16 spacing of w then
  accumulate on average instead of being lost. Every other parameter gets
  exactly `optax.apply_updates`. The same key gives the same result; use a
  fresh key each step (each parameter gets its own from `key`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import mlorc_optax as mlorc
    >>> params = {'w': jnp.ones(4, jnp.bfloat16)}
    >>> updates = {'w': jnp.full(4, 1e-3)}  # below bfloat16's spacing 2^-7 at 1
    >>> key = jax.random.key(0)
    >>> for step in range(100):
    ...   params = mlorc.apply_updates_stochastic(params, updates, jax.random.fold_in(key, step))
    >>> bool(jnp.all(params['w'] > 1))  # deterministic rounding leaves 1.0
    True

  Args:
    params: a tree of parameters.
    updates: a tree of updates with the structure and shapes of `params`.
    key: a JAX PRNG key.

  Returns:
    The updated parameters, with the structure and dtypes of `params`.
  """
  leaves, treedef = jax.tree.flatten(params, is_leaf=lambda x: x is None)
  new_leaves = []
  for i, (w, u) in enumerate(zip(leaves, treedef.flatten_up_to(updates))):
    if w is None:
      new_leaves.append(None)
    elif jnp.asarray(w).dtype == jnp.bfloat16:
      x = jnp.asarray(w).astype(jnp.float32) + jnp.asarray(u).astype(jnp.float32)
      new_leaves.append(_round_to_bfloat16(x, jax.random.fold_in(key, i)))
    else:
      new_leaves.append(jnp.asarray(w + u).astype(jnp.asarray(w).dtype))
  return treedef.unflatten(new_leaves)
