"""MLorc-ADOPT: optax.contrib.adopt with low-rank moments."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from helpers import COMPRESS_ALL, gradient, make_params, run_steps

FULL_RANK = 16  # >= min(m, n) of every matrix in make_params


@pytest.mark.filterwarnings('ignore:`compress` asks for rank')
@pytest.mark.parametrize(
    'options',
    [{}, {'use_clipping': False}, {'nesterov': True}],
    ids=['clipped', 'unclipped', 'nesterov'],
)
def test_full_rank_trajectory_equals_optax_adopt(options):
  with jax.enable_x64(True):
    params = make_params(jax.random.key(0), jnp.float64)
    got, state = run_steps(
        mlorc.adopt(1e-2, rank=FULL_RANK, compress=COMPRESS_ALL, factor_dtype='float64', **options),
        params, 40,
    )
    want, _ = run_steps(optax.contrib.adopt(1e-2, **options), params, 40)
    chex.assert_trees_all_close(got, want, atol=1e-9, rtol=0)
    # The trajectory moved well beyond the tolerance.
    assert np.max(np.abs(got['w'] - params['w'])) > 1e-2
  inner = state[0].inner_state
  for moment in (inner.mu, inner.nu):
    assert isinstance(moment['w'], mlorc.LowRankFactors)
    assert isinstance(moment['stack'], mlorc.LowRankFactors)


def test_non_matrix_parameters_keep_full_state_and_follow_optax_at_low_rank():
  params = make_params(jax.random.key(1))
  got, state = run_steps(mlorc.adopt(1e-2, rank=2, compress=COMPRESS_ALL), params, 20)
  want, _ = run_steps(optax.contrib.adopt(1e-2), params, 20)
  inner = state[0].inner_state
  assert inner.mu['w'].u.shape == (12, 2) and inner.nu['stack'].v.shape == (3, 9, 2)
  for name in ('b', 'scale'):  # full moments, and exactly optax's trajectory
    assert inner.mu[name].shape == params[name].shape == inner.nu[name].shape
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)
  # The compressed matrices moved, and not exactly as optax's.
  assert not np.allclose(got['w'], want['w'], atol=1e-6)
  assert float(jnp.max(jnp.abs(got['w'] - params['w']))) > 1e-2


@pytest.mark.parametrize('use_clipping', [True, False])
def test_step2_is_exact_when_the_first_gradient_has_rank_2(use_clipping):
  """Step 1 stores only v_1 = g_1**2 (rank <= 3 for a rank-2 g_1) and m_1 = 0:
  a rank-4 compression loses nothing, so step 2 equals ADOPT's for any g_2."""
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(3), 3)
    a = jax.random.normal(keys[0], (40, 2), jnp.float64)
    b = jax.random.normal(keys[1], (2, 30), jnp.float64)
    params = {'w': jnp.zeros((40, 30), jnp.float64)}
    grads = [{'w': a @ b}, {'w': jax.random.normal(keys[2], (40, 30), jnp.float64)}]
    ours = mlorc.scale_by_adopt(
        rank=4, compress=True, factor_dtype='float64', use_clipping=use_clipping
    )
    reference = optax.contrib.scale_by_adopt(use_clipping=use_clipping)
    s_ours, s_ref = ours.init(params), reference.init(params)
    update_ours = jax.jit(ours.update)
    for g in grads:
      u_ours, s_ours = update_ours(g, s_ours, params)
      u_ref, s_ref = reference.update(g, s_ref, params)
    assert np.max(np.abs(u_ref['w'])) > 0.05
    # Entries where g_1 is near 0 divide by a tiny sqrt(v_1) (updates of
    # several hundred), which turns float64 rounding of v_1 into ~1e-9.
    np.testing.assert_allclose(u_ours['w'], u_ref['w'], rtol=1e-7, atol=1e-12)


def _adopt_atan2_numpy(grads, b1, b2, clip):
  """ADOPT with atan2 normalisation, float64, one array: the updates u_t."""
  m, v, out = 0.0, None, []
  for t, g in enumerate(grads):  # t = steps done before this one
    if t == 0:
      v = g**2
      out.append(np.zeros_like(g))
      continue
    n = np.arctan2(g, np.sqrt(v))
    if clip:
      n = np.clip(n, -(t**0.25), t**0.25)
    m = b1 * m + (1 - b1) * n
    out.append(4 / np.pi * m)
    v = b2 * v + (1 - b2) * g**2
  return out


@pytest.mark.filterwarnings('ignore:`compress` asks for rank')
@pytest.mark.parametrize('use_clipping', [True, False])
def test_atan2_option_equals_float64_transcription(use_clipping):
  with jax.enable_x64(True):
    params = make_params(jax.random.key(2), jnp.float64)
    params = {'w': params['w'], 'b': params['b']}
    grads = [gradient(params, t) for t in range(12)]
    tx = mlorc.scale_by_adopt(
        0.8, 0.95, atan2=True, use_clipping=use_clipping, rank=FULL_RANK,
        compress={'w': True, 'b': False}, factor_dtype='float64',
    )
    state, update = tx.init(params), jax.jit(tx.update)
    got = []
    for g in grads:
      u, state = update(g, state, params)
      got.append(u)
    assert isinstance(state.inner_state.mu['w'], mlorc.LowRankFactors)
    for name in params:
      want = _adopt_atan2_numpy([np.asarray(g[name]) for g in grads], 0.8, 0.95, use_clipping)
      for t, (u, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(u[name], w, rtol=1e-9, atol=1e-12, err_msg=f'step {t + 1}')
    assert np.max(np.abs(want[-1])) > 0.5  # bounded by 4/pi * pi/2 = 2
    assert np.max(np.abs(want[-1])) <= 2


def test_signature_follows_optax_then_keyword_only_mlorc_options():
  for ours, theirs in (
      (mlorc.adopt, optax.contrib.adopt),
      (mlorc.scale_by_adopt, optax.contrib.scale_by_adopt),
  ):
    ours_params = list(inspect.signature(ours).parameters.values())
    for p, q in zip(ours_params, inspect.signature(theirs).parameters.values()):
      assert (p.name, p.kind) == (q.name, q.kind)
      if p.name != 'clip_value_fn':
        assert p.default == q.default, p.name
      else:
        assert p.default(jnp.float32(16.0)) == q.default(jnp.float32(16.0))
    extra = ours_params[len(inspect.signature(theirs).parameters):]
    assert [p.name for p in extra] == [
        'atan2', 'rank', 'compress', 'min_dim_size', 'oversample', 'power_iters',
        'factor_dtype', 'seed', 'warm_start', 'residual_correction',
    ]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)


def test_inject_hyperparams_needs_clip_value_fn_static():
  params = {'w': make_params(jax.random.key(0))['w'], 'b': jnp.ones(8)}
  compress = {'w': True, 'b': False}
  injected = optax.inject_hyperparams(mlorc.adopt, static_args=mlorc.ADOPT_STATIC_ARGS)(
      learning_rate=1e-2, b1=0.8, rank=2, compress=compress
  )
  plain = mlorc.adopt(1e-2, b1=0.8, rank=2, compress=compress)
  s_inj, s_plain = injected.init(params), plain.init(params)
  assert set(s_inj.hyperparams) >= {'learning_rate', 'b1', 'b2', 'eps'}
  update_inj, update_plain = jax.jit(injected.update), jax.jit(plain.update)
  for t in range(3):
    u_inj, s_inj = update_inj(gradient(params, t), s_inj, params)
    u_plain, s_plain = update_plain(gradient(params, t), s_plain, params)
  chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-5, atol=1e-7)
  assert float(jnp.max(jnp.abs(u_plain['w']))) > 1e-3
  # Without it, inject_hyperparams takes the default clip_value_fn for a schedule.
  bad = optax.inject_hyperparams(mlorc.adopt, static_args=mlorc.STATIC_ARGS)(
      learning_rate=1e-2, rank=2
  )
  with pytest.raises(TypeError, match='ADOPT_STATIC_ARGS'):
    bad.init(params)


@pytest.mark.parametrize(
    'kwargs,match',
    [({'b1': 1.0}, 'b1'), ({'b2': -0.1}, 'b2'), ({'eps': -1.0}, 'eps'),
     ({'mu_dtype': 'int32'}, 'mu_dtype'), ({'rank': 0}, 'rank')],
)
def test_bad_arguments_fail_when_built(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    mlorc.adopt(1e-3, **kwargs)
