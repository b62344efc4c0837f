"""MLorc optimizers behave like optax citizens inside chains and wrappers.

The first tests run over every optimizer the library exports (as optax's
shared contrib tests do); the rest look at adamw and the scale_by_ blocks.
"""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from helpers import COMPRESS_ALL, OPTIMIZER_FACTORIES, OPTIMIZER_NAMES, gradient, make_params

FACTORIES = dict(OPTIMIZER_FACTORIES)
# Arguments that fix shapes or are callables, where an optimizer has them:
# the only ones a user lists in inject_hyperparams' static_args.
UNINJECTABLE = ('rank', 'clip_value_fn')


def _tx(**kw):
  return mlorc.adamw(1e-2, rank=2, compress=COMPRESS_ALL, **kw)


def _small_params(dtype=jnp.float32):
  """A compressed matrix and a full bias: the per-optimizer tests compile once
  per optimizer, so they keep to two shapes."""
  params = make_params(jax.random.key(0), dtype)
  return {'w': params['w'], 'b': params['b']}


SMALL_COMPRESS = {'w': True, 'b': False}


@functools.cache
def _plain(name):
  """The optimizer at rank 2 with the matrix compressed, and its jitted update."""
  tx = FACTORIES[name](rank=2, compress=SMALL_COMPRESS)
  return tx, jax.jit(tx.update)


def _all_zero(tree):
  return all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(tree))


def _dense(state):
  """The state with factors multiplied out (their signs are arbitrary)."""
  is_factors = lambda x: isinstance(x, mlorc.LowRankFactors)
  return jax.tree.map(lambda x: mlorc.reconstruct(x) if is_factors(x) else x, state, is_leaf=is_factors)


def _avals(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, 'weak_type', False)), jax.eval_shape(lambda: tree))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('name', OPTIMIZER_NAMES)
def test_extra_args_one_compilation_and_a_stable_state(name, dtype):
  params = _small_params(dtype)
  tx = FACTORIES[name](rank=2, compress=SMALL_COMPRESS)
  traces = []

  @jax.jit
  def step(params, state, pred):
    traces.append(None)
    grads = gradient(params, 0)
    # lax.cond needs both branches to agree on every shape and dtype, so a
    # state whose types drift from step to step fails here (as in optax's tests).
    updates, state = jax.lax.cond(
        pred,
        lambda: tx.update(grads, state, params, loss=jnp.float16(1.0), unexpected_extra_arg=3),
        lambda: (jax.tree.map(jnp.zeros_like, params), state),
    )
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  init_avals = _avals(state)
  for _ in range(3):
    params, state, updates = step(params, state, jnp.asarray(True))
  assert len(traces) == 1  # compiled once: the state keeps its types
  assert _avals(state) == init_avals
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype == jnp.dtype(dtype)
  assert not _all_zero(updates)


@pytest.mark.parametrize('name', OPTIMIZER_NAMES)
def test_inject_hyperparams_needs_only_rank_static(name):
  factory = FACTORIES[name]
  static = tuple(a for a in UNINJECTABLE if a in inspect.signature(factory).parameters)
  injected = optax.inject_hyperparams(factory, static_args=static)(rank=2, compress=SMALL_COMPRESS)
  tx, update = _plain(name)
  params = _small_params()
  s_inj, s_plain = jax.jit(injected.init)(params), tx.init(params)
  assert 'learning_rate' in s_inj.hyperparams
  update_inj = jax.jit(injected.update)
  for t in range(2):
    u_inj, s_inj = update_inj(gradient(params, t), s_inj, params)
    u_plain, s_plain = update(gradient(params, t), s_plain, params)
    chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(_dense(s_inj.inner_state), _dense(s_plain), rtol=1e-4, atol=1e-6)
  # A changed learning rate takes effect without recompiling.
  s_inj.hyperparams['learning_rate'] = jnp.zeros_like(s_inj.hyperparams['learning_rate'])
  u_zero, _ = update_inj(gradient(params, 2), s_inj, params)
  assert _all_zero(u_zero)


@pytest.mark.parametrize('name', OPTIMIZER_NAMES)
def test_multisteps_first_update_is_zero_then_the_mean_gradients(name):
  tx, update = _plain(name)
  params = _small_params()
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  multi_update = jax.jit(multi.update)
  state = multi.init(params)
  g0, g1 = gradient(params, 0), gradient(params, 1)
  u0, state = multi_update(g0, state, params)
  assert _all_zero(u0)
  u1, state = multi_update(g1, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
  want, _ = update(mean, tx.init(params), params)
  chex.assert_trees_all_close(u1, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name', OPTIMIZER_NAMES)
def test_tree_map_params_reaches_every_factor(name):
  tx, _ = _plain(name)
  params = _small_params()
  state = tx.init(params)
  chex.assert_trees_all_equal(optax.tree.map_params(tx, lambda x: x, state), state)
  is_factors = lambda x: isinstance(x, mlorc.LowRankFactors)
  assert any(is_factors(x) for x in jax.tree.leaves(state, is_leaf=is_factors))
  # Every factor triple sits in a parameter-shaped subtree, where map_params
  # (and with it nnx.Optimizer's sharding metadata) finds it.
  if name == 'mofasgd':
    return  # its Adam second moment holds optax.MaskedNode for matrices (as
    # optax.masked does), which map_params cannot pair with a spec tree.
  tagged = optax.tree.map_params(
      tx, lambda x, path: path, state, {k: k for k in params},
      is_leaf=is_factors, transform_non_params=lambda _: None,
  )
  assert not any(is_factors(x) for x in jax.tree.leaves(tagged, is_leaf=is_factors))


def test_reproducible_from_seed_and_fresh_sketch_per_leaf_and_step():
  w = jax.random.normal(jax.random.key(0), (40, 30))
  params = {'a': w, 'b': w}  # identical leaves, identical gradients
  run = lambda seed, state=None: mlorc.scale_by_adam(rank=2, compress=True, seed=seed).update(
      {'a': w, 'b': w}, state if state is not None else mlorc.scale_by_adam(rank=2, compress=True).init(params)
  )[1]
  s0, s0_again, s1 = run(0), run(0), run(1)
  chex.assert_trees_all_equal(s0, s0_again)
  mu = lambda s: np.asarray(mlorc.reconstruct(s.inner_state.mu['a']))
  assert not np.allclose(mu(s0), mu(s1))  # the seed matters
  # Each leaf gets its own test matrix: equal inputs, different sketches.
  assert not np.allclose(mu(s0), np.asarray(mlorc.reconstruct(s0.inner_state.mu['b'])))
  # Each step gets its own test matrix: the same state at another count differs.
  tx = mlorc.scale_by_adam(rank=2, compress=True)
  later = tx.update({'a': w, 'b': w}, s0._replace(count=s0.count + 5))[1]
  again = tx.update({'a': w, 'b': w}, s0)[1]
  assert not np.allclose(mu(later), mu(again))


def test_inject_hyperparams_with_static_shape_args():
  params = make_params(jax.random.key(0))
  injected = optax.inject_hyperparams(mlorc.adamw, static_args=mlorc.STATIC_ARGS)(
      learning_rate=1e-2, rank=2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1,
      compress=COMPRESS_ALL, min_dim_size=4,
  )
  plain = mlorc.adamw(
      1e-2, rank=2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1, compress=COMPRESS_ALL
  )
  s_inj, s_plain = injected.init(params), plain.init(params)
  for name in ('learning_rate', 'b1', 'b2', 'eps', 'weight_decay'):
    assert name in s_inj.hyperparams
  update, plain_update = jax.jit(injected.update), jax.jit(plain.update)
  for t in range(2):
    u_inj, s_inj = update(gradient(params, t), s_inj, params)
    u_plain, s_plain = plain_update(gradient(params, t), s_plain, params)
    chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-5, atol=1e-7)
  # A changed learning rate takes effect without recompiling.
  s_inj.hyperparams['learning_rate'] = jnp.asarray(0.0)
  u_zero, _ = update(gradient(params, 3), s_inj, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(u_zero))


def test_inject_hyperparams_with_only_rank_static_and_the_default_policy():
  """optax's way of wrapping its contributed optimizers: only `rank` static.
  The None defaults stay static, the int seed is traced."""
  params = {'w': jax.random.normal(jax.random.key(0), (128, 128)), 'b': jnp.zeros(128)}
  injected = optax.inject_hyperparams(mlorc.adamw, static_args=('rank',))(learning_rate=1e-3, rank=4)
  state = injected.init(params)
  assert 'seed' in state.hyperparams  # traced, and accepted
  assert state.inner_state[0].inner_state.mu['w'].u.shape == (128, 4)
  updates, state = jax.jit(injected.update)(gradient(params, 0), state, params)
  plain = mlorc.adamw(1e-3, rank=4)
  want, _ = plain.update(gradient(params, 0), plain.init(params), params)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-9)


def test_inject_hyperparams_rejects_a_traced_rank_with_advice():
  factory = optax.inject_hyperparams(mlorc.adam)(learning_rate=1e-2, rank=2)
  with pytest.raises(TypeError, match='static_args'):
    jax.jit(factory.init)({'w': jnp.zeros((8, 8))})


def test_apply_if_finite_leaves_state_untouched_on_nan_gradients():
  params = make_params(jax.random.key(0))
  tx = optax.apply_if_finite(_tx(), max_consecutive_errors=3)
  state = tx.init(params)
  _, state = tx.update(gradient(params, 0), state, params)
  bad = jax.tree.map(lambda g: g.at[...].set(jnp.nan), gradient(params, 1))
  updates, new_state = tx.update(bad, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1


def test_masked_and_partition():
  params = make_params(jax.random.key(0))
  grads = gradient(params, 0)
  mask = {'w': True, 'b': False, 'stack': True, 'scale': False}
  masked = optax.masked(mlorc.scale_by_adam(rank=2, compress=True), mask)
  updates, _ = masked.update(grads, masked.init(params), params)
  assert updates['b'] is grads['b'] or bool(jnp.all(updates['b'] == grads['b']))
  direct = mlorc.scale_by_adam(rank=2, compress=True)
  sub = {'w': params['w'], 'stack': params['stack']}
  want, _ = direct.update({'w': grads['w'], 'stack': grads['stack']}, direct.init(sub), sub)
  chex.assert_trees_all_close(updates['w'], want['w'])

  labels = {'w': 'mlorc', 'stack': 'mlorc', 'b': 'sgd', 'scale': 'sgd'}
  part = optax.partition({'mlorc': mlorc.adam(1e-2, rank=2, compress=True), 'sgd': optax.sgd(0.1)}, labels)
  updates, _ = part.update(grads, part.init(params), params)
  chex.assert_trees_all_close(updates['b'], -0.1 * grads['b'])
  chex.assert_trees_all_close(updates['w'], -1e-2 * want['w'])


def test_tree_map_params_reaches_every_moment():
  params = make_params(jax.random.key(0))
  tx = _tx()
  state = tx.init(params)
  # Without `rest`, f sees every array under a parameter, factors included.
  as_bf16 = optax.tree.map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
  assert as_bf16[0].inner_state.mu['w'].u.dtype == jnp.bfloat16
  assert as_bf16[0].inner_state.mu['b'].dtype == jnp.bfloat16
  assert as_bf16[0].count.dtype == jnp.int32
  # With a parameter-shaped `rest`, treat factors as leaves via is_leaf.
  names = {k: k for k in params}
  tagged = optax.tree.map_params(
      tx,
      lambda x, name: (name, type(x).__name__),
      state,
      names,
      is_leaf=lambda x: isinstance(x, mlorc.LowRankFactors),
      transform_non_params=lambda _: None,
  )
  assert tagged[0].inner_state.mu['w'] == ('w', 'LowRankFactors')
  assert tagged[0].inner_state.nu['b'] == ('b', 'ArrayImpl')


def test_chains_with_clipping_and_schedules():
  params = make_params(jax.random.key(0))
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      mlorc.scale_by_adam(rank=2, compress=COMPRESS_ALL),
      optax.add_decayed_weights(1e-2),
      optax.scale_by_schedule(optax.cosine_decay_schedule(-1e-2, 10)),
  )
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(gradient(params, 0), state, params)
  # Adam's first step has |update| ~ 1 per entry before the weight decay.
  np.testing.assert_allclose(
      np.abs(updates['w'] / -1e-2 - 1e-2 * params['w']), 1.0, rtol=1e-3
  )


def _minimise(tx, loss, params, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params


@pytest.mark.parametrize(
    'make',
    [
        lambda c: mlorc.adam(5e-2, rank=1, compress=c),
        lambda c: mlorc.adamw(5e-2, rank=1, weight_decay=0.0, compress=c),
        lambda c: mlorc.lion(1e-2, rank=1, weight_decay=0.0, compress=c),
    ],
    ids=['adam', 'adamw', 'lion'],
)
def test_converges_on_parabola_rosenbrock_and_matrix_targets(make):
  # Parabola over a compressed (16, 8) matrix.
  target = jax.random.normal(jax.random.key(0), (16, 8))
  got = _minimise(make(True), lambda p: jnp.sum((p - target) ** 2), jnp.zeros((16, 8)), 600)
  np.testing.assert_allclose(got, target, atol=5e-2)
  # Rosenbrock on a vector (full moments).
  rosen = lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2
  got = _minimise(make(None), rosen, jnp.array([-1.0, 1.0]), 3000)
  np.testing.assert_allclose(got, [1.0, 1.0], atol=5e-2)
  # A 2x2 matrix target compressed at rank 1.
  target = jnp.array([[1.0, -2.0], [3.0, 0.5]])
  got = _minimise(make(True), lambda p: jnp.sum((p - target) ** 2), jnp.zeros((2, 2)), 600)
  np.testing.assert_allclose(got, target, atol=5e-2)


def test_warm_started_sketches_converge():
  target = jax.random.normal(jax.random.key(0), (32, 16))
  tx = mlorc.adam(5e-2, rank=2, compress=True, warm_start=True, power_iters=0)
  got = _minimise(tx, lambda p: jnp.sum((p - target) ** 2), jnp.zeros((32, 16)), 600)
  np.testing.assert_allclose(got, target, atol=5e-2)
