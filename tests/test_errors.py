"""Bad input fails early, with a message that names the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from helpers import OPTIMIZER_FACTORIES


@pytest.mark.parametrize(
    'kwargs,error,match',
    [
        (dict(rank=0), ValueError, '`rank`'),
        (dict(rank=-3), ValueError, '`rank`'),
        (dict(rank=2.0), TypeError, '`rank`'),
        (dict(rank='4'), TypeError, '`rank`'),
        (dict(rank=True), TypeError, '`rank`'),
        (dict(rank=np.float32(4)), TypeError, '`rank`'),
        (dict(b1=1.0), ValueError, '`b1`'),
        (dict(b1=-0.1), ValueError, '`b1`'),
        (dict(b2=1.5), ValueError, '`b2`'),
        (dict(eps=-1e-8), ValueError, '`eps`'),
        (dict(eps_root=-1.0), ValueError, '`eps_root`'),
        (dict(oversample=-1), ValueError, '`oversample` must be a non-negative int'),
        (dict(power_iters=-1), ValueError, '`power_iters` must be a non-negative int'),
        (dict(min_dim_size=-1), ValueError, '`min_dim_size`'),
        (dict(min_dim_size=1.5), TypeError, '`min_dim_size`'),
        (dict(factor_dtype='int32'), ValueError, '`factor_dtype`'),
        (dict(factor_dtype='not-a-dtype'), TypeError, '`factor_dtype`'),
    ],
)
def test_bad_hyperparameters_fail_when_built(kwargs, error, match):
  with pytest.raises(error, match=match):
    mlorc.adamw(1e-3, **kwargs)


@pytest.mark.parametrize('kwargs,match', [(dict(b1=1.0), '`b1`'), (dict(rank=0), '`rank`')])
def test_lion_validates_too(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mlorc.lion(1e-4, **kwargs)


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(rank=0), '`rank`'),
        (dict(oversample=-1), '`oversample`'),
        (dict(power_iters=-2), '`power_iters`'),
        (dict(min_dim_size=-1), '`min_dim_size`'),
    ],
)
@pytest.mark.parametrize('name,factory', OPTIMIZER_FACTORIES, ids=[n for n, _ in OPTIMIZER_FACTORIES])
def test_every_optimizer_refuses_bad_mlorc_options_by_init(name, factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(**kwargs).init({'w': jnp.zeros((8, 8))})


def test_integer_likes_are_accepted_and_returned_as_ints():
  from mlorc_optax._src import validation

  for value in (4, np.int64(4), np.uint8(4), jnp.asarray(4)):
    got = validation.check_positive_int('rank', value)
    assert got == 4 and type(got) is int
  assert validation.check_non_negative_int('oversample', np.int32(0)) == 0
  with pytest.raises(ValueError, match='`rank` must be a positive int'):
    validation.check_positive_int('rank', np.int64(0))


def test_bad_compress_entries_fail_at_init():
  params = {'w': jnp.zeros((8, 8, 4))}
  with pytest.raises(TypeError, match='`compress`'):
    mlorc.adam(1e-3, compress={'w': 'yes'}).init(params)
  with pytest.raises(ValueError, match='MatrixView'):
    mlorc.adam(1e-3, compress={'w': mlorc.MatrixView((0,), (0,))}).init(params)
  with pytest.raises(ValueError, match='`compress`'):
    mlorc.adam(1e-3, compress={'other': True}).init(params)


def test_updates_with_another_structure_are_rejected():
  tx = mlorc.adam(1e-3, rank=2, compress=True)
  state = tx.init({'w': jnp.zeros((8, 8))})
  with pytest.raises(ValueError, match='`updates`'):
    tx.update({'v': jnp.zeros((8, 8))}, state)
  with pytest.raises(ValueError, match='`updates`'):
    tx.update({'w': jnp.zeros((8, 8)), 'b': jnp.zeros(8)}, state)


def test_updates_with_another_shape_are_rejected():
  tx = mlorc.adam(1e-3, rank=2, compress=True)
  state = tx.init({'w': jnp.zeros((8, 8)), 'b': jnp.zeros(8)})
  with pytest.raises(ValueError, match=r'`updates`.*\(8, 6\)'):
    tx.update({'w': jnp.zeros((8, 6)), 'b': jnp.zeros(8)}, state)
  with pytest.raises(ValueError, match='`updates`'):
    tx.update({'w': jnp.zeros((8, 8)), 'b': jnp.zeros(7)}, state)


def test_zero_and_tiny_gradients_keep_the_state_finite():
  params = {'w': jnp.zeros((64, 48))}
  tx = mlorc.adam(1e-3, rank=4, compress=True)
  state = tx.init(params)
  for g in (jnp.zeros((64, 48)), 1e-20 * jax.random.normal(jax.random.key(0), (64, 48))):
    updates, state = tx.update({'w': g}, state, params)
    for leaf in jax.tree.leaves((updates, state)):
      assert bool(jnp.all(jnp.isfinite(leaf)))


def test_residual_correction_errors_name_the_argument():
  for make in (mlorc.adamw, mlorc.lion, mlorc.adopt, mlorc.prodigy):
    with pytest.raises(ValueError, match='residual_correction'):
      make(1e-3, residual_correction=-1.0)
  tx = mlorc.compress_moments(optax.scale_by_adam(), residual_correction={'m': 1.0})
  with pytest.raises(ValueError, match=r"residual_correction names \['m'\].*\['mu', 'nu'\]"):
    tx.init({'w': jnp.zeros((64, 64))})
