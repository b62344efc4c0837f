"""MoFaSGD against dense float64 transcriptions of its factor update."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from helpers import gradient

M, N, R = 12, 9, 3


def _orthonormal(rng, d, r):
  return np.linalg.qr(rng.normal(size=(d, r)))[0]


def _tangent(u, v, g):
  """P_T(G) = U U^T G + G V V^T - U U^T G V V^T."""
  pu, pv = u @ u.T, v @ v.T
  return pu @ g + g @ pv - pu @ g @ pv


def _best(x, r):
  a, s, bt = np.linalg.svd(x)
  return a[:, :r], s[:r], bt[:r].T


def _dense(f):
  return (f.u * f.s) @ f.v.T


def _one_step(tx, factors, g):
  """One update of a single (M, N) matrix starting from the given factors."""
  params = {'w': jnp.zeros(g.shape, g.dtype)}
  state = tx.init(params)
  state = state._replace(mu={'w': mlorc.LowRankFactors(*map(jnp.asarray, factors))})
  updates, state = jax.jit(tx.update)({'w': jnp.asarray(g)}, state)
  return np.asarray(updates['w']), jax.tree.map(np.asarray, state.mu['w'])


@pytest.mark.parametrize(
    'ema,max_inverse', [(False, None), (True, 0.5)], ids=['code-spectral', 'paper-inverse']
)
def test_one_step_is_best_rank_r_of_momentum_plus_tangent_gradient(ema, max_inverse):
  rng = np.random.default_rng(0)
  b, eta1, eta2 = 0.8, 0.7, 0.3
  u, v = _orthonormal(rng, M, R), _orthonormal(rng, N, R)
  s = np.array([3.0, 1.5, 0.4])
  g = rng.normal(size=(M, N))
  with jax.enable_x64(True):
    tx = mlorc.scale_by_mofasgd(
        rank=R, b=b, eta1=eta1, eta2=eta2, max_inverse=max_inverse, ema=ema,
        compress=True, factor_dtype='float64',
    )
    got_update, got = _one_step(tx, (u, s, v), g)

  scale = 1 - b if ema else 1.0
  target = b * (u * s) @ v.T + scale * _tangent(u, v, g)
  x, sigma, y = _best(target, R)
  np.testing.assert_allclose(_dense(got), (x * sigma) @ y.T, atol=1e-12)
  np.testing.assert_allclose(got.s, sigma, rtol=1e-12)
  np.testing.assert_allclose(got.u.T @ got.u, np.eye(R), atol=1e-12)
  np.testing.assert_allclose(got.v.T @ got.v, np.eye(R), atol=1e-12)
  h = np.ones(R) if max_inverse is None else np.minimum(1 / sigma, max_inverse)
  g_perp = (np.eye(M) - u @ u.T) @ g @ (np.eye(N) - v @ v.T)
  want_update = eta1 * (x * h) @ y.T + eta2 * g_perp
  np.testing.assert_allclose(got_update, want_update, atol=1e-12)


def test_current_projection_uses_the_new_factors():
  rng = np.random.default_rng(1)
  u, v = _orthonormal(rng, M, R), _orthonormal(rng, N, R)
  s = np.array([2.0, 1.0, 0.5])
  g = rng.normal(size=(M, N))
  with jax.enable_x64(True):
    tx = mlorc.scale_by_mofasgd(
        rank=R, b=0.9, eta1=0.0, eta2=1.0, current_projection=True,
        compress=True, factor_dtype='float64',
    )
    got_update, got = _one_step(tx, (u, s, v), g)
  want = (np.eye(M) - got.u @ got.u.T) @ g @ (np.eye(N) - got.v @ got.v.T)
  np.testing.assert_allclose(got_update, want, atol=1e-12)


def test_float32_step_is_close_to_the_float64_reference():
  rng = np.random.default_rng(2)
  m, n, r = 96, 64, 8
  u, v = _orthonormal(rng, m, r), _orthonormal(rng, n, r)
  s = np.geomspace(5.0, 0.05, r)
  g = rng.normal(size=(m, n)) * 1e3  # a gradient far larger than the factors
  tx = mlorc.scale_by_mofasgd(rank=r, b=0.9, compress=True)
  _, got = _one_step(tx, (u, s, v), g.astype(np.float32))
  x, sigma, y = _best(0.9 * (u * s) @ v.T + _tangent(u, v, g), r)
  np.testing.assert_allclose(got.s, sigma, rtol=1e-4)
  err = np.abs(_dense(jax.tree.map(np.float64, got)) - (x * sigma) @ y.T).max()
  assert err < 1e-4 * sigma[0]
  np.testing.assert_allclose(got.u.T @ got.u, np.eye(r), atol=1e-5)


def test_full_rank_momentum_is_heavy_ball_and_update_its_polar_factor():
  """At rank >= min(m, n) the tangent space is everything: M_t = b M_{t-1} + G_t."""
  rng = np.random.default_rng(3)
  m, n, b = 7, 5, 0.7
  grads = [rng.normal(size=(m, n)) for _ in range(6)]
  with jax.enable_x64(True):
    tx = mlorc.scale_by_mofasgd(rank=n, b=b, compress=True, factor_dtype='float64')
    state = tx.init({'w': jnp.zeros((m, n))})
    update = jax.jit(tx.update)
    momentum = np.zeros((m, n))
    for g in grads:
      out, state = update({'w': jnp.asarray(g)}, state)
      momentum = b * momentum + g
      x, _, y = _best(momentum, n)
      np.testing.assert_allclose(out['w'], x @ y.T, atol=1e-10)
    np.testing.assert_allclose(_dense(jax.tree.map(np.asarray, state.mu['w'])), momentum, atol=1e-10)


def _params(key=0):
  """A matrix (compressed with compress=True) and a bias (on Adam)."""
  k1, k2 = jax.random.split(jax.random.key(key))
  return {'w': jax.random.normal(k1, (12, 8)), 'b': 0.1 * jax.random.normal(k2, (8,))}


def _trajectory(tx, params, steps, state=None):
  state = tx.init(params) if state is None else state
  update = jax.jit(tx.update)
  for t in range(steps):
    updates, state = update(gradient(params, t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_conventions_give_the_same_directions_with_constant_beta():
  params = {'w': _params()['w']}
  run = lambda ema: _trajectory(mlorc.mofasgd(1e-2, rank=2, b=0.8, ema=ema, compress=True), params, 6)
  (p_code, s_code), (p_ema, s_ema) = run(False), run(True)
  np.testing.assert_allclose(p_ema['w'], p_code['w'], atol=1e-5)
  np.testing.assert_allclose(s_ema[0].mu['w'].s, 0.2 * s_code[0].mu['w'].s, rtol=1e-4)


def test_state_is_r_times_m_plus_n_plus_one_per_matrix():
  params = {
      'w': jnp.zeros((300, 200)),
      'stack': jnp.zeros((3, 256, 128)),
      'bias': jnp.zeros((200,)),
  }
  state = jax.eval_shape(mlorc.scale_by_mofasgd(rank=4).init, params)
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert size(state.mu['w']) == 4 * (300 + 200 + 1)
  assert size(state.mu['stack']) == 3 * 4 * (256 + 128 + 1)
  assert state.mu['stack'].u.shape == (3, 256, 4)
  assert isinstance(state.nu['w'], optax.MaskedNode) and size(state.nu['w']) == 0
  assert size(state.mu['bias']) == size(state.nu['bias']) == 200  # Adam
  assert size(state) == 1 + 4 * 501 + 3 * 4 * 385 + 400


def test_non_matrix_parameters_follow_optax_adam_with_their_learning_rate():
  params = _params()
  ours = mlorc.mofasgd(
      1e-2, rank=2, adam_b1=0.8, adam_b2=0.95, adam_learning_rate=optax.constant_schedule(3e-2),
      compress=True,
  )
  state = ours.init(params)
  first, _ = jax.jit(ours.update)(gradient(params, 0), state, params)
  # A spectrally normalised rank-2 step: two singular values, both lr.
  np.testing.assert_allclose(np.linalg.svd(first['w'], compute_uv=False)[:3], [1e-2, 1e-2, 0], atol=1e-6)
  got, _ = _trajectory(ours, params, 8)
  want, _ = _trajectory(optax.adam(3e-2, b1=0.8, b2=0.95), params, 8)
  np.testing.assert_allclose(got['b'], want['b'], rtol=1e-6, atol=1e-7)


def test_stacked_layers_match_separate_matrices():
  k1, k2 = jax.random.split(jax.random.key(3))
  layers = {'a': jax.random.normal(k1, (10, 9)), 'b': jax.random.normal(k2, (10, 9))}
  tx = mlorc.mofasgd(1e-2, rank=2, eta2=0.5, compress=True)
  separate = _trajectory(tx, layers, 3, tx.init(layers))[0]
  # The stack (one leaf, lax.map over its layers) from the same factors.
  stack = lambda a, b: jnp.stack([a, b])
  params = {'w': stack(layers['a'], layers['b'])}
  state = tx.init(params)
  mu = jax.tree.map(stack, *(tx.init(layers)[0].mu[k] for k in ('a', 'b')))
  stacked = _trajectory(tx, params, 3, (state[0]._replace(mu={'w': mu}),) + state[1:])[0]
  np.testing.assert_allclose(stacked['w'][0], separate['a'], atol=1e-6)
  np.testing.assert_allclose(stacked['w'][1], separate['b'], atol=1e-6)


@pytest.mark.parametrize('init', ['zero', 'params'])
def test_converges_on_least_squares(init):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k1, (256, 64))
  w_star = jax.random.normal(k2, (64, 4)) @ jax.random.normal(k3, (4, 48)) / 8
  loss = lambda p: jnp.mean((x @ p['w'] + p['b'] - x @ w_star) ** 2)
  params = {'w': 0.01 * jax.random.normal(k4, (64, 48)), 'b': jnp.zeros(48)}
  schedule = optax.cosine_decay_schedule(0.1, 300)
  tx = mlorc.mofasgd(schedule, rank=4, b=0.9, init=init, compress={'w': True, 'b': False})
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  first = float(loss(params))
  for _ in range(300):
    params, state = step(params, state)
  assert float(loss(params)) < 1e-2 * first
  u = state[0].mu['w'].u
  np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-4)


def test_zero_first_gradient_keeps_a_full_tangent_space():
  """A zero gradient (behind a zero-initialised layer) must not freeze the factors."""
  params = {'w': jnp.zeros((40, 30))}
  tx = mlorc.scale_by_mofasgd(rank=4, compress=True)
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update({'w': jnp.zeros((40, 30))}, state)
  f = state.mu['w']
  np.testing.assert_allclose(f.s, 0)
  np.testing.assert_allclose(f.u.T @ f.u, np.eye(4), atol=1e-5)
  np.testing.assert_allclose(f.v.T @ f.v, np.eye(4), atol=1e-5)
  g = jax.random.normal(jax.random.key(1), (40, 30))
  updates, state = update({'w': g}, state)
  assert float(state.mu['w'].s[0]) > 0 and float(jnp.abs(updates['w']).max()) > 0


def test_params_init_is_the_top_svd_of_the_parameter_completed_where_rank_deficient():
  k1, k2 = jax.random.split(jax.random.key(0))
  w = jax.random.normal(k1, (40, 2)) @ jax.random.normal(k2, (2, 30))  # rank 2
  tx = mlorc.scale_by_mofasgd(rank=4, init='params', compress=True, power_iters=2)
  f = jax.jit(tx.init)({'w': w}).mu['w']
  want = np.linalg.svd(np.asarray(w), compute_uv=False)[:2]
  np.testing.assert_allclose(f.s[:2], want, rtol=1e-4)
  np.testing.assert_allclose(f.s[2:], 0)
  np.testing.assert_allclose(_dense(jax.tree.map(np.asarray, f)), w, atol=1e-4)
  np.testing.assert_allclose(f.u.T @ f.u, np.eye(4), atol=1e-5)
  np.testing.assert_allclose(f.v.T @ f.v, np.eye(4), atol=1e-5)


def test_momentum_schedule_is_read_at_the_step_count():
  params = {'w': _params()['w']}
  run = lambda b: _trajectory(mlorc.mofasgd(1e-2, rank=2, b=b, compress=True), params, 3)[0]['w']
  constant = run(0.7)
  np.testing.assert_allclose(run(optax.constant_schedule(0.7)), constant, atol=1e-6)
  assert not np.allclose(run(optax.linear_schedule(0.0, 0.7, 2)), constant)


def test_jit_chain_and_inject_hyperparams_on_stacked_layers():
  params = {'stack': jax.random.normal(jax.random.key(0), (2, 10, 9)), 'b': jnp.ones(9)}
  kwargs = dict(rank=2, b=0.8, eta1=0.5, eta2=0.1, max_inverse=4.0, compress=True)
  clip = optax.clip_by_global_norm(1.0)
  plain, _ = _trajectory(optax.chain(clip, mlorc.mofasgd(1e-2, **kwargs)), params, 3)
  injected = optax.inject_hyperparams(mlorc.mofasgd, static_args=('rank',))(1e-2, **kwargs)
  got, state = _trajectory(optax.chain(clip, injected), params, 3)
  chex.assert_trees_all_close(got, plain, atol=1e-6)
  assert float(state[1].hyperparams['eta1']) == 0.5
  assert state[1].inner_state[0].mu['stack'].u.shape == (2, 10, 2)


def _temp_bytes(tx, params):
  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(tx.update, donate_argnums=(1,)).lower(params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('eta2', [0.0, 0.5])
def test_update_temp_memory_is_one_matrix_at_most_and_flat_in_depth(eta2):
  m, n = 256, 1024
  matrix = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  model = lambda layers: {f'layer{i}': {'up': matrix(m, n), 'down': matrix(n, m)} for i in range(layers)}
  tx = mlorc.mofasgd(1e-2, rank=8, eta2=eta2)
  shallow, deep = _temp_bytes(tx, model(2)), _temp_bytes(tx, model(4))
  # One matrix at a time: two more layers (four matrices) add less than one.
  assert deep - shallow < m * n * 4
  # No full momentum; eta2 > 0 may add one (m, n) product (XLA:CPU does not
  # fuse eta2 G + left @ right^T into one kernel).
  bound = m * n * 4 * (1 if eta2 == 0 else 2)
  assert deep <= bound
  assert _temp_bytes(tx, {'up': matrix(4, m, n)}) <= bound  # the stack's layers one at a time


def test_errors_name_the_argument_or_the_parameter():
  with pytest.raises(ValueError, match='init'):
    mlorc.scale_by_mofasgd(init='svd')
  with pytest.raises(ValueError, match='`b`'):
    mlorc.scale_by_mofasgd(b=1.0)
  with pytest.raises(ValueError, match='eta2'):
    mlorc.mofasgd(1e-2, eta2=-1.0)
  with pytest.raises(TypeError, match='rank'):
    mlorc.scale_by_mofasgd(rank=2.0)
  tx = mlorc.scale_by_mofasgd(rank=2, compress=True)
  state = tx.init({'w': jnp.zeros((8, 6))})
  with pytest.raises(ValueError, match=r"\['w'\]"):
    tx.update({'w': jnp.zeros((8, 7))}, state)


def test_nnx_optimizer_trains_with_factored_momentum():
  from flax import nnx

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.hidden = nnx.Linear(32, 64, rngs=rngs)
      self.out = nnx.Linear(64, 8, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.hidden(x)))

  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, mlorc.mofasgd(3e-2, rank=4, compress=True), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (128, 32))
  y = jnp.sin(x[:, :8])

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(40)]
  assert losses[-1] < 0.3 * losses[0]
  mu = nnx.state(optimizer.opt_state)[0]['mu']
  assert mu['hidden']['kernel']['u'][...].shape == (32, 4)
  assert mu['hidden']['bias'][...].shape == (64,)  # Adam


def test_sharded_update_matches_one_device_and_keeps_factors_sharded():
  script = os.path.join(os.path.dirname(__file__), 'mofasgd_multidevice_run.py')
  out = subprocess.run(
      [sys.executable, script, 'explicit'], capture_output=True, text=True, timeout=600, check=True
  ).stdout
  report = json.loads(out.strip().splitlines()[-1])
  assert report['devices'] == 8
  for name, err in report['rel_error'].items():
    assert err < 1e-5, name
  # U follows the parameter's row sharding (FSDP), V its column sharding (TP).
  assert report['fsdp_u'] == ['x', None] and report['fsdp_v'] == [None, None]
  assert report['tp_v'] == ['x', None] and report['tp_u'] == [None, None]
  assert report['update_specs'] == {'fsdp': ['x', None], 'tp': [None, 'x']}
  assert report['full_gathers'] == []  # no (m, n) operand is all-gathered
