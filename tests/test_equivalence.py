"""At full rank MLorc is its inner optimizer; in the exact regime step 2 is Adam's."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from helpers import COMPRESS_ALL, gradient, make_params, run_steps

FULL_RANK = 16  # >= min(m, n) of every matrix in make_params


@pytest.mark.parametrize(
    'ours,reference',
    [
        (
            lambda **kw: mlorc.adam(1e-2, rank=FULL_RANK, compress=COMPRESS_ALL, **kw),
            lambda: optax.adam(1e-2),
        ),
        (
            lambda **kw: mlorc.adamw(
                1e-2, rank=FULL_RANK, weight_decay=0.1, compress=COMPRESS_ALL, **kw
            ),
            lambda: optax.adamw(1e-2, weight_decay=0.1),
        ),
        (
            lambda **kw: mlorc.adam(
                1e-2, rank=FULL_RANK, nesterov=True, compress=COMPRESS_ALL, **kw
            ),
            lambda: optax.adam(1e-2, nesterov=True),
        ),
        (
            lambda **kw: mlorc.lion(1e-3, rank=FULL_RANK, compress=COMPRESS_ALL, **kw),
            lambda: optax.lion(1e-3),
        ),
    ],
    ids=['adam', 'adamw', 'nadam', 'lion'],
)
@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_full_rank_trajectory_equals_optax(ours, reference, dtype):
  with jax.enable_x64(dtype == 'float64'):
    params = make_params(jax.random.key(0), dtype)
    got, state = run_steps(ours(factor_dtype=dtype), params, 50)
    want, _ = run_steps(reference(), params, 50)
  if dtype == 'float64':
    chex.assert_trees_all_close(got, want, atol=1e-9)
  else:
    # float32 factors round near-zero moment entries (a Lion sign may flip);
    # all but a handful of entries still agree closely.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert np.mean(np.abs(np.asarray(a) - np.asarray(b)) < 1e-4) >= 0.98
  moments = state[0].inner_state.mu
  assert isinstance(moments['w'], mlorc.LowRankFactors)
  assert isinstance(moments['stack'], mlorc.LowRankFactors)


def test_generic_wrapper_at_full_rank_equals_inner():
  params = make_params(jax.random.key(1))
  with jax.enable_x64(True):
    params = make_params(jax.random.key(1), jnp.float64)
    for inner in (optax.contrib.scale_by_adopt(), optax.scale_by_belief()):
      ours = optax.chain(
          mlorc.compress_moments(
              inner, rank=FULL_RANK, compress=COMPRESS_ALL, factor_dtype='float64'
          ),
          optax.scale(-1e-2),
      )
      got, _ = run_steps(ours, params, 20)
      want, _ = run_steps(optax.chain(inner, optax.scale(-1e-2)), params, 20)
      chex.assert_trees_all_close(got, want, atol=1e-9)


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('dtype,rtol', [('float32', 1e-3), ('float64', 1e-9)])
def test_rank2_first_gradient_makes_step2_exact(seed, dtype, rtol):
  """m_1 = (1-b1) g_1 has rank 2 and v_1 = (1-b2) g_1**2 rank <= 3: a rank-4
  compression loses nothing, so step 2 equals Adam's for any second gradient."""
  with jax.enable_x64(dtype == 'float64'):
    _check_step2_exact(seed, dtype, rtol)


def _check_step2_exact(seed, dtype, rtol):
  keys = jax.random.split(jax.random.key(seed), 3)
  a, b = jax.random.normal(keys[0], (64, 2), dtype), jax.random.normal(keys[1], (2, 48), dtype)
  params = {'w': jnp.zeros((64, 48), dtype)}
  g1 = {'w': a @ b}
  g2 = {'w': jax.random.normal(keys[2], (64, 48), dtype)}
  ours = mlorc.scale_by_adam(rank=4, compress=True, factor_dtype=dtype)
  reference = optax.scale_by_adam()
  s_ours, s_ref = ours.init(params), reference.init(params)
  for g in (g1, g2):
    u_ours, s_ours = ours.update(g, s_ours, params)
    u_ref, s_ref = reference.update(g, s_ref, params)
  # Absolute tolerance on the scale of the update: the float32 reconstruction
  # of v is exact only up to rounding relative to its largest entries, which
  # the division amplifies where v is small.
  np.testing.assert_allclose(
      u_ours['w'], u_ref['w'], rtol=rtol, atol=rtol * float(np.max(np.abs(u_ref['w']))))
  # With full-rank g2 the step-2 moments are not rank 4, so their compression
  # is not exact; the comparison above is only about the update.
  assert not np.allclose(mlorc.reconstruct(s_ours.inner_state.mu['w']), s_ref.mu['w'], atol=1e-6)


def test_repair_of_negative_second_moment_entries():
  x = jnp.array([[1.0, -2.0], [-4.0, 3.0]])
  np.testing.assert_array_equal(mlorc.repair_nonnegative(x), [[1.0, 3.0], [3.0, 3.0]])
  y = jnp.array([[1.0, 0.0], [2.0, 3.0]])
  np.testing.assert_array_equal(mlorc.repair_nonnegative(y), y)


def test_second_moment_reconstruction_is_repaired_before_use():
  """At low rank the reconstruction of v goes negative; the update stays finite."""
  params = {'w': jnp.zeros((64, 32))}
  tx = mlorc.scale_by_adam(rank=2, compress=True, eps=0.0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  negatives = 0
  for t in range(5):
    g = {'w': jax.random.normal(jax.random.key(t), (64, 32))}
    negatives += int(jnp.sum(mlorc.reconstruct(state.inner_state.nu['w']) < 0))
    u, state = update(g, state, params)
    assert bool(jnp.all(jnp.isfinite(u['w'])))
  assert negatives > 0  # the repair was exercised
