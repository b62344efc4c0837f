"""CAME against a float64 NumPy transcription of the authors' code."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from mlorc_optax._src.optimizers.came import came_leafwise
from mlorc_optax._src.leafwise import LeafwiseState, full_state_transformation
from helpers import COMPRESS_ALL, make_params

FULL_RANK = 16  # >= min(m, n) of every matrix in make_params

STEPS = 10
LR = 1e-2


def _gradient(x, t):
  return np.sin(x * (t + 1.0)) + 0.1 * x + 0.01 * t


def _rms(x):
  return np.linalg.norm(x.ravel()) / x.size**0.5


def _approx_sq_grad(row, col):
  r = (1.0 / np.sqrt(row / row.mean(axis=-1, keepdims=True)))[..., None]
  return r * (1.0 / np.sqrt(col))[..., None, :]


def _reference(p, steps, lr, betas, eps, clip, weight_decay):
  """`came_pytorch/CAME.py` (yangluo7/CAME) in float64 NumPy, one parameter."""
  p = np.array(p, np.float64)
  factored = p.ndim >= 2
  exp_avg = np.zeros_like(p)
  if factored:
    row, col = np.zeros(p.shape[:-1]), np.zeros(p.shape[:-2] + p.shape[-1:])
    res_row, res_col = np.zeros_like(row), np.zeros_like(col)
  else:
    exp_avg_sq = np.zeros_like(p)
  for t in range(steps):
    grad = _gradient(p, t)
    update = grad**2 + eps[0]
    if factored:
      row = row * betas[1] + update.mean(axis=-1) * (1 - betas[1])
      col = col * betas[1] + update.mean(axis=-2) * (1 - betas[1])
      update = _approx_sq_grad(row, col) * grad
    else:
      exp_avg_sq = exp_avg_sq * betas[1] + update * (1 - betas[1])
      update = grad / np.sqrt(exp_avg_sq)
    update = update / max(_rms(update) / clip, 1.0)
    exp_avg = exp_avg * betas[0] + update * (1 - betas[0])
    res = (update - exp_avg) ** 2 + eps[1]
    if factored:
      res_row = res_row * betas[2] + res.mean(axis=-1) * (1 - betas[2])
      res_col = res_col * betas[2] + res.mean(axis=-2) * (1 - betas[2])
      update = _approx_sq_grad(res_row, res_col) * exp_avg
    else:
      update = exp_avg.copy()
    if weight_decay != 0:
      p = p - weight_decay * lr * p
    p = p - lr * update
  return p


def _run(tx, params, steps):
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    grads = jax.tree.map(lambda x: _gradient(x, t), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


CONFIGS = {
    'default': {},
    'betas_eps_decay': dict(betas=(0.8, 0.9, 0.95), eps=(1e-20, 1e-10), weight_decay=0.1),
    'no_clipping': dict(clip_threshold=100.0),
}
DEFAULTS = dict(betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip_threshold=1.0, weight_decay=0.0)


def _leafwise_came(betas, eps, clip_threshold, weight_decay):
  """Full-state CAME from the leafwise runner, chained as `came` chains it."""
  return optax.chain(
      full_state_transformation(came_leafwise(betas, eps, clip_threshold)),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(LR),
  )


VARIANTS = {
    'leafwise': _leafwise_came,
    'uncompressed': lambda **kw: mlorc.came(LR, **kw, compress=False),
    'full_rank': lambda **kw: mlorc.came(
        LR, **kw, rank=FULL_RANK, compress=COMPRESS_ALL, factor_dtype='float64'
    ),
}


@pytest.mark.filterwarnings('ignore:`compress` asks for rank')
@pytest.mark.parametrize(
    'config_name,variant',
    [(c, v) for c in CONFIGS for v in ('leafwise', 'full_rank')] + [('default', 'uncompressed')],
)
def test_trajectory_equals_reference(config_name, variant):
  config = dict(DEFAULTS, **CONFIGS[config_name])
  with jax.enable_x64(True):
    params = make_params(jax.random.key(0), jnp.float64)
    params['b'] = params['b'] + jnp.linspace(-1.0, 1.0, 8)  # not all equal
    got, state = _run(VARIANTS[variant](**config), params, STEPS)
  ref = lambda p: _reference(
      np.asarray(p), STEPS, LR, config['betas'], config['eps'], config['clip_threshold'],
      config['weight_decay'],
  )
  for name in ('w', 'b', 'scale'):
    np.testing.assert_allclose(got[name], ref(params[name]), atol=1e-9, rtol=0, err_msg=name)
  # scanned layers: each (10, 9) layer as a parameter of its own
  want_stack = np.stack([ref(layer) for layer in params['stack']])
  np.testing.assert_allclose(got['stack'], want_stack, atol=1e-9, rtol=0)
  moved = np.abs(np.asarray(got['w']) - np.asarray(params['w'])).max()
  assert moved > 10 * LR * 0.5  # the trajectory went somewhere
  if variant == 'full_rank':
    entries = state[0].inner_state.entries
    assert isinstance(entries['exp_avg']['w'], mlorc.LowRankFactors)
    assert isinstance(entries['exp_avg']['stack'], mlorc.LowRankFactors)
    assert entries['exp_avg_sq_row']['stack'].shape == (3, 10)  # kept as they are


def test_clipping_is_exercised():
  """Early normalised gradients have an RMS near 1 / sqrt(1 - b2): the default
  threshold clips them, 100 does not, so the configs above take both paths."""
  with jax.enable_x64(True):
    params = make_params(jax.random.key(0), jnp.float64)
    a, _ = _run(_leafwise_came(**dict(DEFAULTS, clip_threshold=100.0)), params, 3)
    b, _ = _run(_leafwise_came(**DEFAULTS), params, 3)
  assert np.abs(a['w'] - b['w']).max() > 1e-2


def test_factored_state_is_small():
  state = full_state_transformation(came_leafwise()).init({'w': jnp.zeros((6, 5)), 'stack': jnp.zeros((3, 6, 5)), 'b': jnp.zeros(5)})
  shapes = jax.tree.map(jnp.shape, state.entries)
  assert shapes['exp_avg_sq_row'] == {'w': (6,), 'stack': (3, 6), 'b': (1,)}
  assert shapes['exp_avg_res_col'] == {'w': (5,), 'stack': (3, 5), 'b': (1,)}
  assert shapes['exp_avg_sq'] == {'w': (1,), 'stack': (1,), 'b': (5,)}


def test_bfloat16_parameters_keep_float32_statistics():
  """An EMA with b3 = 0.9999 does not move in bfloat16: the statistics are
  float32 (as the reference computes), the moment and the update bfloat16."""
  params = {'w': jnp.ones((6, 5), jnp.bfloat16), 'b': jnp.ones(5, jnp.bfloat16)}
  tx = full_state_transformation(came_leafwise())
  state = tx.init(params)
  res_rows = []
  for t in range(3):
    updates, state = tx.update(jax.tree.map(lambda x: x * (t + 1.0), params), state)
    res_rows.append(state.entries['exp_avg_res_row']['w'])
  assert updates['w'].dtype == jnp.bfloat16 and state.entries['exp_avg']['w'].dtype == jnp.bfloat16
  assert res_rows[-1].dtype == jnp.float32 and state.entries['exp_avg_sq']['b'].dtype == jnp.float32
  # the increments (1 - b3) (u - m)^2, 1e-4 of the average, still register
  assert bool(jnp.all(res_rows[2] != res_rows[1]))
  bf16_ema = lambda old, x: (0.9999 * old.astype(jnp.bfloat16) + 1e-4 * x).astype(jnp.bfloat16)
  assert bool(jnp.all(bf16_ema(res_rows[1], res_rows[1]) == res_rows[1].astype(jnp.bfloat16)))


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(betas=(0.9, 0.999)), '`betas`'),
        (dict(betas=(0.9, 0.999, 1.0)), r'`betas\[2\]`'),
        (dict(eps=(1e-30,)), '`eps`'),
        (dict(eps=(-1.0, 1e-16)), r'`eps\[0\]`'),
        (dict(clip_threshold=-1.0), '`clip_threshold`'),
        (dict(clip_threshold=0.0), '`clip_threshold`'),
        (dict(weight_decay=-1.0), '`weight_decay`'),
        (dict(rank=0), '`rank`'),
    ],
)
def test_bad_hyperparameters_fail_when_built(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mlorc.came(1e-3, **kwargs)
