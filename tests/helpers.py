"""Shared test helpers: small parameter trees, gradient streams, and the list
of every optimizer the library exports (so that convention tests pick up a
new one without being edited).

Import with ``from helpers import ...`` (pytest puts tests/ on sys.path).
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import optax

import mlorc_optax as mlorc


def make_params(key, dtype=jnp.float32):
  """A Dense kernel, a bias, a scanned (layers, in, out) kernel and a scalar."""
  k1, k2 = jax.random.split(key)
  return {
      'w': jax.random.normal(k1, (12, 8), dtype),
      'b': jnp.zeros((8,), dtype),
      'stack': jax.random.normal(k2, (3, 10, 9), dtype),
      'scale': jnp.ones((), dtype),
  }


# Compress every matrix, including the small ones used in tests.
COMPRESS_ALL = {'w': True, 'b': False, 'stack': True, 'scale': False}


def gradient(params, t):
  """A deterministic, full-rank, step-dependent gradient."""
  return jax.tree.map(lambda x: jnp.sin(x * (t + 1.0)) + 0.1 * x + 0.01 * t, params)


# The MLorc options every factory of the library takes, keyword-only, with
# these defaults (None: the library's default, resolved inside).
MLORC_OPTIONS = {
    'rank': 4,
    'compress': None,
    'min_dim_size': None,
    'oversample': None,
    'power_iters': None,
    'factor_dtype': 'float32',
    'seed': 0,
    'warm_start': False,
}

# Learning rate for an optimizer whose `learning_rate` has no default.
DEFAULT_LEARNING_RATE = 1e-2


def run_steps(tx, params, steps):
  """`steps` jitted updates with `gradient`, applied; returns (params, state)."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    updates, state = update(gradient(params, t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _exported_functions():
  for name in mlorc.__all__:
    obj = getattr(mlorc, name)
    if inspect.isfunction(obj):
      yield name, obj


def _is_alias(name, fn) -> bool:
  """An optimizer alias: its first parameter is optax's `learning_rate` (a
  scale_by_ block that takes one too, as Prodigy's, is not an alias)."""
  parameters = list(inspect.signature(fn).parameters)
  return not name.startswith('scale_by_') and parameters[:1] == ['learning_rate']


def _with_learning_rate(fn):
  default = inspect.signature(fn).parameters['learning_rate'].default
  lr = DEFAULT_LEARNING_RATE if default is inspect.Parameter.empty else default
  return functools.partial(fn, learning_rate=lr)


# (name, factory) for every exported optimizer alias (a function whose first
# argument is `learning_rate`, not named scale_by_*), the learning rate bound: factory(**options)
# builds the optimizer, and `inspect.signature(factory)` still lists every
# argument, so optax.inject_hyperparams(factory, ...) works on it too.
OPTIMIZER_FACTORIES = [
    (name, _with_learning_rate(fn)) for name, fn in _exported_functions() if _is_alias(name, fn)
]

# (name, function) for every MLorc factory: the aliases and the scale_by_*
# transformations. They share the MLorc options above.
MLORC_FACTORIES = [
    (name, fn)
    for name, fn in _exported_functions()
    if _is_alias(name, fn) or name.startswith('scale_by_')
]

OPTIMIZER_NAMES = [name for name, _ in OPTIMIZER_FACTORIES]
