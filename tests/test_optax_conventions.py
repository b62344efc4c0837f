"""MLorc transformations behave like optax citizens inside chains and wrappers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from helpers import COMPRESS_ALL, gradient, make_params


def _tx(**kw):
  return mlorc.adamw(1e-2, rank=2, compress=COMPRESS_ALL, **kw)


def test_accepts_extra_args_and_compiles_once():
  params = make_params(jax.random.key(0))
  tx = _tx()
  traces = []

  @jax.jit
  def update(g, state, p):
    traces.append(None)
    return tx.update(g, state, p, loss=jnp.float32(1.0), unused_extra=3)

  state = tx.init(params)
  for t in range(3):
    _, state = update(gradient(params, t), state, params)
  assert len(traces) == 1


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
  update = jax.jit(injected.update)
  for t in range(3):
    u_inj, s_inj = update(gradient(params, t), s_inj, params)
    u_plain, s_plain = plain.update(gradient(params, t), s_plain, params)
    chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-5, atol=1e-7)
  # A changed learning rate takes effect without recompiling.
  s_inj.hyperparams['learning_rate'] = jnp.asarray(0.0)
  u_zero, _ = update(gradient(params, 3), s_inj, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(u_zero))


def test_inject_hyperparams_rejects_a_traced_rank_with_advice():
  factory = optax.inject_hyperparams(mlorc.adam)(learning_rate=1e-2, rank=2)
  with pytest.raises(TypeError, match='static_args'):
    factory.init({'w': jnp.zeros((8, 8))})


def test_multisteps_first_update_is_zero_and_accumulates():
  params = make_params(jax.random.key(0))
  multi = optax.MultiSteps(_tx(), every_k_schedule=2)
  state = multi.init(params)
  g0, g1 = gradient(params, 0), gradient(params, 1)
  u0, state = multi.update(g0, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(u0))
  u1, state = multi.update(g1, state, params)
  single = _tx()
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
  want, _ = single.update(mean, single.init(params), params)
  chex.assert_trees_all_close(u1, want, rtol=1e-5, atol=1e-7)


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
