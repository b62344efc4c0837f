"""D-Adapt Lion against a float64 NumPy transcription of the reference code."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from mlorc_optax._src.optimizers.dadapt_lion import dadapt_lion_leafwise
from mlorc_optax._src.leafwise import LeafwiseState, full_state_transformation
from helpers import COMPRESS_ALL, make_params

FULL_RANK = 16  # >= min(m, n) of every matrix in make_params

STEPS = 15


def _gradient(x, t):
  """conftest.gradient, but zero on step 0 (the reference then changes nothing)."""
  return (t > 0) * (np.sin(x * (t + 1.0)) + 0.1 * x + 0.01 * t)


def _reference(params, steps, lr, betas, weight_decay, d0, stride=1):
  """`dadaptation/dadapt_lion.py` (D-Adaptation repository, main branch), in
  float64 NumPy, one parameter group; `lr` is a function of the step index.
  With `stride`, s lives on every stride-th entry of each flattened parameter
  (the MLorc_optim package's `slice_p`)."""
  params = [np.array(p, np.float64) for p in params]
  exp_avg = [np.zeros_like(p) for p in params]
  s = [np.zeros_like(p.ravel()[::stride]) for p in params]
  beta1, beta2 = betas
  sqrt_beta2 = beta2**0.5
  d, numerator_weighted = d0, 0.0
  for k in range(steps):
    grads = [_gradient(p, k) for p in params]
    dlr = d * float(lr(k))
    numerator_acum, sk_l1 = 0.0, 0.0
    for i, (p, grad) in enumerate(zip(params, grads)):
      p *= 1 - dlr * weight_decay
      update = np.sign(exp_avg[i] * beta1 + grad * (1 - beta1))
      p -= dlr * update
      exp_avg[i] = exp_avg[i] * beta2 + grad * (1 - beta2) * dlr
      sliced = update.ravel()[::stride]
      numerator_acum += dlr * np.dot(sliced, s[i])
      s[i] = s[i] * sqrt_beta2 + sliced * (1 - sqrt_beta2) * dlr
      sk_l1 += np.abs(s[i]).sum()
    if sk_l1 == 0:
      continue
    global_numerator_weighted = sqrt_beta2 * numerator_weighted + (1 - sqrt_beta2) * numerator_acum
    if float(lr(k)) > 0.0:
      d_hat = global_numerator_weighted / ((1 - sqrt_beta2) * sk_l1)
      d = max(d, d_hat)
    numerator_weighted = global_numerator_weighted
  return params, d, numerator_weighted


def _run(tx, params, steps):
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    grads = jax.tree.map(lambda x: _gradient(x, t), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _leafwise_state(state):
  return state if isinstance(state, LeafwiseState) else state.inner_state


def _zero_at_5(count):
  return jnp.where(count == 5, 0.0, 1.0 / (1.0 + 0.1 * count))


CONFIGS = {
    'default': (1.0, {}),
    'decay_betas_d0': (1.0, dict(betas=(0.8, 0.95), weight_decay=0.5, estim_lr0=1e-4)),
    'schedule_with_a_zero': (_zero_at_5, dict(weight_decay=0.1)),
}

VARIANTS = {
    'leafwise': lambda lr, **kw: full_state_transformation(dadapt_lion_leafwise(lr, **kw)),
    'uncompressed': lambda lr, **kw: mlorc.dadapt_lion(lr, **kw, s_stride=1, compress=False),
    'full_rank': lambda lr, **kw: mlorc.dadapt_lion(
        lr, **kw, s_stride=1, rank=FULL_RANK, compress=COMPRESS_ALL, factor_dtype='float64'
    ),
}


@pytest.mark.filterwarnings('ignore:`compress` asks for rank')
@pytest.mark.parametrize(
    'config_name,variant',
    [(c, v) for c in CONFIGS for v in ('leafwise', 'full_rank')]
    + [('default', 'uncompressed')],
)
def test_trajectory_equals_reference(config_name, variant):
  lr, config = CONFIGS[config_name]
  with jax.enable_x64(True):
    params = make_params(jax.random.key(0), jnp.float64)
    got, state = _run(VARIANTS[variant](lr, **config), params, STEPS)
    leaves, treedef = jax.tree.flatten(params)
    config = dict(dict(betas=(0.9, 0.99), weight_decay=0.0, estim_lr0=1e-6), **config)
    want, d, numerator = _reference(  # (the schedule evaluated in float64 too)
        leaves, STEPS, lr if callable(lr) else (lambda k: lr), config['betas'],
        config['weight_decay'], config['estim_lr0'],
    )
  chex.assert_trees_all_close(got, treedef.unflatten(want), atol=1e-9, rtol=0)
  glob = _leafwise_state(state).global_state
  np.testing.assert_allclose(float(glob.estim_lr), d, rtol=1e-9)
  np.testing.assert_allclose(float(glob.numerator_weighted), numerator, rtol=1e-9)
  assert d > 2 * config['estim_lr0']  # d moved: the comparison means something
  entries = _leafwise_state(state).entries
  if variant == 'full_rank':
    assert isinstance(entries['exp_avg']['w'], mlorc.LowRankFactors)
    assert entries['s']['w'].shape == (12, 8)  # s is kept in full


@pytest.mark.filterwarnings('ignore:`compress` asks for rank')
def test_s_stride():
  """s on every 3rd entry: the leafwise runner equals the reference with the
  same slicing, and MLorc at full rank equals the runner (scanned layers too)."""
  lr, config = CONFIGS['decay_betas_d0']
  with jax.enable_x64(True):
    params = make_params(jax.random.key(0), jnp.float64)
    flat = {k: v for k, v in params.items() if k != 'stack'}  # one matrix each
    got, state = _run(full_state_transformation(dadapt_lion_leafwise(lr, **config, s_stride=3)), flat, STEPS)
    leaves, treedef = jax.tree.flatten(flat)
    want, d, _ = _reference(leaves, STEPS, lambda k: lr, (0.8, 0.95), 0.5, 1e-4, stride=3)
    chex.assert_trees_all_close(got, treedef.unflatten(want), atol=1e-9, rtol=0)
    np.testing.assert_allclose(float(state.global_state.estim_lr), d, rtol=1e-9)
    assert state.entries['s']['w'].shape == (32,)  # ceil(96 / 3)

    full, _ = _run(full_state_transformation(dadapt_lion_leafwise(lr, **config, s_stride=3)), params, STEPS)
    ours, state = _run(
        mlorc.dadapt_lion(
            lr, **config, s_stride=3, rank=FULL_RANK, compress=COMPRESS_ALL, factor_dtype='float64'
        ),
        params, STEPS,
    )
  chex.assert_trees_all_close(ours, full, atol=1e-9, rtol=0)
  assert state.inner_state.entries['s']['stack'].shape == (3, 30)  # ceil(90 / 3) per layer
  # the subsample changes d a little, not much
  _, d_full, _ = _reference(leaves, STEPS, lambda k: lr, (0.8, 0.95), 0.5, 1e-4)
  assert d != d_full and abs(d / d_full - 1) < 0.5
  # the default keeps s on every 11th entry, as the MLorc reference package
  state = mlorc.dadapt_lion(rank=2, compress=True).init({'w': jnp.zeros((12, 8))})
  assert state.inner_state.entries['s']['w'].shape == (9,)  # ceil(96 / 11)


def test_inject_hyperparams_with_s_stride():
  params = make_params(jax.random.key(0))
  injected = optax.inject_hyperparams(mlorc.dadapt_lion, static_args=mlorc.DADAPT_LION_STATIC_ARGS)(
      learning_rate=0.5, weight_decay=0.1, s_stride=4, compress=False,
  )
  plain = mlorc.dadapt_lion(0.5, weight_decay=0.1, s_stride=4, compress=False)
  got, state = _run(injected, params, 4)
  want, _ = _run(plain, params, 4)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert 'weight_decay' in state.hyperparams
  not_static = optax.inject_hyperparams(mlorc.dadapt_lion, static_args=mlorc.STATIC_ARGS)(
      s_stride=4, compress=False
  )
  with pytest.raises(TypeError, match='static_args'):  # a traced s_stride
    jax.jit(not_static.update)(params, not_static.init(params), params)


def test_empty_parameters():
  for tx in (mlorc.dadapt_lion(), mlorc.dadapt_lion(compress=False)):
    updates, state = tx.update({}, tx.init({}), {})
    assert updates == {}
    assert float(_leafwise_state(state).global_state.estim_lr) == np.float32(1e-6)


def test_weight_decay_needs_params():
  tx = mlorc.dadapt_lion(weight_decay=0.1)
  params = {'w': jnp.ones((3, 2))}
  with pytest.raises(ValueError, match='params'):
    tx.update(params, tx.init(params))
  # without weight decay the parameters are not needed
  tx = mlorc.dadapt_lion()
  tx.update(params, tx.init(params))


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(betas=(0.9, 1.0)), r'`betas\[1\]`'),
        (dict(betas=(0.9, 0.99, 0.999)), '`betas`'),
        (dict(estim_lr0=-1.0), '`estim_lr0`'),
        (dict(weight_decay=-1.0), '`weight_decay`'),
        (dict(rank=0), '`rank`'),
        (dict(s_stride=0), '`s_stride`'),
    ],
)
def test_bad_hyperparameters_fail_when_built(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mlorc.scale_by_dadapt_lion(**kwargs)
