"""Prodigy: full state and MLorc-Prodigy at full rank equal optax.contrib.prodigy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from mlorc_optax._src.leafwise import LeafwiseState, full_state_transformation
from mlorc_optax._src.optimizers.prodigy import prodigy_leafwise
from helpers import COMPRESS_ALL, gradient, make_params, run_steps

FULL_RANK = 16  # >= min(m, n) of every matrix in make_params
STEPS = 12

CONFIGS = {
    'default': {},
    'decay_safeguard': dict(weight_decay=0.1, safeguard_warmup=True),
    'schedule_beta3_coef': dict(
        learning_rate=optax.linear_schedule(1.0, 0.2, 12), beta3=0.9, estim_lr_coef=2.0, eps=1e-3
    ),
}

VARIANTS = {  # s_stride=1: optax's exact estimate of d
    'leafwise': lambda **kw: full_state_transformation(prodigy_leafwise(**kw)),
    'uncompressed': lambda **kw: mlorc.prodigy(**kw, s_stride=1, compress=False),
    'full_rank': lambda **kw: mlorc.prodigy(
        **kw, s_stride=1, rank=FULL_RANK, compress=COMPRESS_ALL, factor_dtype='float64'
    ),
}


def _leafwise_state(state):
  return state if isinstance(state, LeafwiseState) else state.inner_state


_REFERENCE = {}


def _reference(config_name):
  """optax.contrib.prodigy's trajectory (float64), computed once per config."""
  if config_name not in _REFERENCE:
    params = make_params(jax.random.key(0), jnp.float64)
    _REFERENCE[config_name] = run_steps(optax.contrib.prodigy(**CONFIGS[config_name]), params, STEPS)
  return _REFERENCE[config_name]


@pytest.mark.filterwarnings('ignore:`compress` asks for rank')
@pytest.mark.parametrize(
    'config_name,variant',
    [(c, v) for c in CONFIGS for v in ('leafwise', 'full_rank')] + [('default', 'uncompressed')],
)
def test_trajectory_equals_optax_contrib_prodigy(config_name, variant):
  with jax.enable_x64(True):
    params = make_params(jax.random.key(0), jnp.float64)
    got, state = run_steps(VARIANTS[variant](**CONFIGS[config_name]), params, STEPS)
    want, ref_state = _reference(config_name)
  chex.assert_trees_all_close(got, want, atol=1e-9, rtol=0)
  g = _leafwise_state(state).global_state
  chex.assert_trees_all_close(
      (g.estim_lr, g.numerator_weighted), (ref_state.estim_lr, ref_state.numerator_weighted),
      rtol=1e-9,
  )
  assert int(g.count) == STEPS
  if variant == 'full_rank':
    entries = _leafwise_state(state).entries
    for name in ('exp_avg', 'exp_avg_sq'):
      assert isinstance(entries[name]['w'], mlorc.LowRankFactors)
      assert isinstance(entries[name]['stack'], mlorc.LowRankFactors)
      assert not isinstance(entries[name]['b'], mlorc.LowRankFactors)
    # s and the initial parameters are kept as they are
    chex.assert_trees_all_close(entries['grad_sum'], ref_state.grad_sum, atol=1e-9)
    chex.assert_trees_all_equal(entries['params0'], params)


def _numpy_prodigy(params, steps, stride):
  """optax.contrib.prodigy (default hyperparameters) in float64 NumPy, with
  s and w0 on every stride-th entry of each flattened parameter."""
  beta1, beta2, beta3, eps, d0 = 0.9, 0.999, 0.999**0.5, 1e-8, 1e-6
  params = [np.array(p, np.float64) for p in params]
  sub = lambda x: x.ravel()[::stride]
  m = [np.zeros_like(p) for p in params]
  v = [np.zeros_like(p) for p in params]
  s = [np.zeros_like(sub(p)) for p in params]
  p0 = [sub(p).copy() for p in params]
  d, r = d0, 0.0
  for t in range(steps):
    grads = [np.sin(p * (t + 1.0)) + 0.1 * p + 0.01 * t for p in params]
    dlr = d * (1 - beta2 ** (t + 1)) ** 0.5 / (1 - beta1 ** (t + 1))
    r = beta3 * r + (d / d0) * dlr * sum(np.dot(sub(g), a - sub(p)) for g, a, p in zip(grads, p0, params))
    s = [beta3 * si + dlr * d * sub(g) / d0 for si, g in zip(s, grads)]
    d_new = max(d, r / sum(np.abs(si).sum() for si in s))
    for i, g in enumerate(grads):
      m[i] = beta1 * m[i] + (1 - beta1) * d * g
      v[i] = beta2 * v[i] + (1 - beta2) * d * d * g * g
      params[i] = params[i] - dlr * m[i] / (np.sqrt(v[i]) + d_new * eps)
    d = d_new
  return params, d


@pytest.mark.filterwarnings('ignore:`compress` asks for rank')
def test_s_stride():
  """s and w0 on every 3rd entry: the leafwise runner equals a NumPy Prodigy
  with the same subsample, MLorc at full rank equals the runner (scanned
  layers too), and d stays near the exact one."""
  with jax.enable_x64(True):
    params = make_params(jax.random.key(0), jnp.float64)
    flat = {k: v for k, v in params.items() if k != 'stack'}  # one matrix each
    got, state = run_steps(full_state_transformation(prodigy_leafwise(s_stride=3)), flat, STEPS)
    leaves, treedef = jax.tree.flatten(flat)
    want, d = _numpy_prodigy(leaves, STEPS, 3)
    chex.assert_trees_all_close(got, treedef.unflatten(want), atol=1e-9, rtol=0)
    np.testing.assert_allclose(float(state.global_state.estim_lr), d, rtol=1e-9)
    assert state.entries['params0']['w'].shape == state.entries['grad_sum']['w'].shape == (32,)

    full, _ = run_steps(full_state_transformation(prodigy_leafwise(s_stride=3)), params, STEPS)
    ours, state = run_steps(
        mlorc.prodigy(s_stride=3, rank=FULL_RANK, compress=COMPRESS_ALL, factor_dtype='float64'),
        params, STEPS,
    )
  chex.assert_trees_all_close(ours, full, atol=1e-9, rtol=0)
  assert state.inner_state.entries['grad_sum']['stack'].shape == (3, 30)  # ceil(90 / 3) per layer
  _, d_exact = _numpy_prodigy(leaves, STEPS, 1)
  assert d != d_exact and 0.5 < d / d_exact < 2  # (a 32-entry subsample here)
  # the default keeps them on every 11th entry, as the MLorc reference package
  state = mlorc.prodigy(rank=2, compress=True).init({'w': jnp.zeros((12, 8))})
  assert state.inner_state.entries['params0']['w'].shape == (9,)  # ceil(96 / 11)


def test_step_size_estimate_grows():
  """The trajectory tests above are only meaningful if d moves."""
  with jax.enable_x64(True):
    params = make_params(jax.random.key(0), jnp.float64)
    _, state = run_steps(mlorc.prodigy(s_stride=1, compress=False), params, STEPS)
  assert float(_leafwise_state(state).global_state.estim_lr) > 2e-6


def test_low_rank_runs_and_estimates_d():
  """At rank 2 the moments are approximations: the run stays finite, the loss
  falls and d grows, near the full-state estimate."""
  params = {'w': jax.random.normal(jax.random.key(0), (48, 32)), 'b': jnp.zeros(32)}
  loss = lambda p: sum(float(jnp.sum((x - 1.0) ** 2)) for x in jax.tree.leaves(p))
  d = {}
  for name, tx in [('low', mlorc.prodigy(rank=2, compress=True)), ('full', mlorc.prodigy(s_stride=1, compress=False))]:
    p, state = params, tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(15):
      u, state = update(jax.tree.map(lambda x: 2 * (x - 1.0), p), state, p)
      p = optax.apply_updates(p, u)
    d[name] = float(_leafwise_state(state).global_state.estim_lr)
    assert np.isfinite(loss(p)) and loss(p) < loss(params)
  assert d['low'] > 10 * 1e-6
  assert 0.2 < d['low'] / d['full'] < 5.0


def test_params0_dtype():
  params = make_params(jax.random.key(0))
  tx = mlorc.prodigy(params0_dtype='bfloat16', s_stride=1, compress=False)
  state = tx.init(params)
  p0 = _leafwise_state(state).entries['params0']
  assert p0['w'].dtype == jnp.bfloat16
  chex.assert_trees_all_close(p0['w'], params['w'].astype(jnp.bfloat16))
  _, state = run_steps(tx, params, 3)
  assert bool(jnp.isfinite(_leafwise_state(state).global_state.estim_lr))


def test_zero_gradients_leave_d_alone():
  """optax's prodigy turns d into NaN (0 / 0) after an all-zero gradient; the
  authors' code skips the estimate, and so does this one."""
  params = {'w': jnp.ones((4, 3)), 'b': jnp.ones(3)}
  tx = mlorc.prodigy(compress=False)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, state = tx.update(zeros, state, params)
  glob = _leafwise_state(state).global_state
  assert glob.estim_lr == np.float32(1e-6) and float(glob.numerator_weighted) == 0.0
  chex.assert_trees_all_equal(updates, zeros)
  _, ref_state = optax.contrib.prodigy().update(zeros, optax.contrib.prodigy().init(params), params)
  assert np.isnan(float(ref_state.estim_lr))
  updates, state = tx.update(params, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_empty_parameters():
  for tx in (mlorc.prodigy(), mlorc.prodigy(compress=False)):
    updates, state = tx.update({}, tx.init({}), {})
    assert updates == {}
    assert int(_leafwise_state(state).global_state.count) == 1


def test_inject_hyperparams():
  params = make_params(jax.random.key(0))
  schedule = optax.linear_schedule(1.0, 0.5, 4)
  injected = optax.inject_hyperparams(mlorc.prodigy, static_args=mlorc.PRODIGY_STATIC_ARGS)(
      learning_rate=schedule, weight_decay=0.1, compress=False,
  )
  plain = mlorc.prodigy(schedule, weight_decay=0.1, compress=False)
  got, _ = run_steps(injected, params, 3)
  want, _ = run_steps(plain, params, 3)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_needs_params():
  tx = mlorc.prodigy()
  params = {'w': jnp.ones((3, 2))}
  with pytest.raises(ValueError, match='params'):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(betas=(1.0, 0.999)), r'`betas\[0\]`'),
        (dict(betas=(0.9,)), '`betas`'),
        (dict(beta3=1.5), '`beta3`'),
        (dict(estim_lr0=0.0), '`estim_lr0`'),
        (dict(eps=-1.0), '`eps`'),
        (dict(weight_decay=-0.1), '`weight_decay`'),
        (dict(params0_dtype='int8'), '`params0_dtype`'),
        (dict(rank=0), '`rank`'),
    ],
)
def test_bad_hyperparameters_fail_when_built(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    mlorc.prodigy(**kwargs)
