"""Every factory of the library has optax's signature plus the same MLorc options."""

import inspect
import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from helpers import MLORC_FACTORIES, MLORC_OPTIONS, OPTIMIZER_FACTORIES

FACTORY_NAMES = [name for name, _ in MLORC_FACTORIES]
FACTORIES = dict(MLORC_FACTORIES)


def _documented_args(fn) -> list[str]:
  """The names given an entry of their own in the docstring's Args section."""
  doc = inspect.getdoc(fn) or ''
  lines = doc.splitlines()
  if 'Args:' not in lines:
    return []
  names = []
  for line in lines[lines.index('Args:') + 1:]:
    if line and not line.startswith(' '):
      break  # the next section
    match = re.match(r'^  (\w+)( \([^)]*\))?:', line)
    if match:
      names.append(match.group(1))
  return names


# optax keyword-only arguments a factory does not take, and why.
_NOT_TAKEN = {
    # Recent optax only; the library supports optax >= 0.2.5.
    ('scale_by_lion', 'mode'),
    ('scale_by_lion', 'smooth_beta'),
}


def _optax_counterpart(name):
  for module in (optax, optax.contrib):
    if hasattr(module, name):
      return getattr(module, name)
  return None


def test_the_lists_find_the_known_optimizers():
  assert {'adam', 'adamw', 'lion'} <= {name for name, _ in OPTIMIZER_FACTORIES}
  assert {'adam', 'adamw', 'lion', 'scale_by_adam', 'scale_by_lion'} <= set(FACTORY_NAMES)


# MLorc options a factory does not take, and why.
_OPTION_NOT_TAKEN = {
    # MoFaSGD updates its factors in the tangent space: no per-step sketch to warm-start.
    ('mofasgd', 'warm_start'),
    ('scale_by_mofasgd', 'warm_start'),
}


@pytest.mark.parametrize('name', FACTORY_NAMES)
def test_mlorc_options_are_keyword_only_with_the_same_defaults(name):
  parameters = inspect.signature(FACTORIES[name]).parameters
  for option, default in MLORC_OPTIONS.items():
    if (name, option) in _OPTION_NOT_TAKEN:
      assert option not in parameters
      continue
    assert option in parameters, f'{name} lacks the MLorc option {option!r}'
    p = parameters[option]
    assert p.kind == inspect.Parameter.KEYWORD_ONLY, f'{name}: {option!r} must be keyword-only'
    assert p.default == default, f'{name}: {option!r} defaults to {p.default!r}, not {default!r}'


@pytest.mark.parametrize('name', FACTORY_NAMES)
def test_static_args_are_a_subset_of_every_signature(name):
  assert set(mlorc.STATIC_ARGS) <= set(inspect.signature(FACTORIES[name]).parameters)


@pytest.mark.parametrize('name', FACTORY_NAMES)
def test_every_parameter_has_its_own_args_entry(name):
  fn = FACTORIES[name]
  documented = _documented_args(fn)
  parameters = list(inspect.signature(fn).parameters)
  missing = [p for p in parameters if p not in documented]
  assert not missing, f'{name}: no Args entry for {missing}'
  assert not set(documented) - set(parameters), f'{name}: Args documents unknown names'


@pytest.mark.parametrize('name', FACTORY_NAMES)
def test_docstring_has_references_and_an_example(name):
  doc = inspect.getdoc(FACTORIES[name])
  assert 'References:' in doc and '2506.01897' in doc  # the MLorc paper
  assert 'Example:' in doc and '>>>' in doc


@pytest.mark.parametrize(
    'name', [n for n in FACTORY_NAMES if _optax_counterpart(n) is not None]
)
def test_optax_arguments_keep_their_order_kind_and_defaults(name):
  ours = inspect.signature(FACTORIES[name]).parameters
  theirs = inspect.signature(_optax_counterpart(name)).parameters
  positional = lambda ps: [
      n for n, p in ps.items() if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
  ]
  assert positional(ours) == positional(theirs)
  for n, p in theirs.items():
    if (name, n) in _NOT_TAKEN:
      continue
    assert n in ours, f'{name} lacks optax argument {n!r}'
    assert ours[n].kind == p.kind, n
    if not callable(p.default):
      assert ours[n].default == p.default, n


def test_optax_positional_call_means_what_it_means_in_optax():
  params = {'w': jnp.ones((4, 3))}
  grads = {'w': jnp.arange(12.0).reshape(4, 3) - 5}
  # b1=0.5, b2=0.6, eps=0.7: far from the defaults, so a shifted argument shows.
  ours = mlorc.adam(0.1, 0.5, 0.6, 0.7, rank=2)
  want, _ = optax.adam(0.1, 0.5, 0.6, 0.7).update(grads, optax.adam(0.1).init(params))
  got, _ = ours.update(grads, ours.init(params), params)
  np.testing.assert_allclose(got['w'], want['w'], rtol=1e-6)
  with pytest.raises(TypeError):
    mlorc.adamw(1e-3, 4, 0.9, 0.99, 1e-8, 0.0, None, 1e-4, None, 2)  # rank is keyword-only


@pytest.mark.parametrize('rank', [np.int64(2), np.int32(2), jnp.asarray(2)])
def test_integer_like_rank_is_accepted(rank):
  params = {'w': jnp.ones((8, 6))}
  tx = mlorc.adamw(1e-3, rank=rank, compress=True, oversample=np.int64(1), power_iters=np.int8(1))
  state = tx.init(params)
  assert state[0].inner_state.mu['w'].u.shape == (8, 2)
  tx.update(params, state, params)
