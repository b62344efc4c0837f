"""Options any optax optimizer can use: Grams, cautious masking, cautious weight
decay, OrthoGrad, bfloat16 stochastic rounding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mlorc_optax as mlorc


def _fixed(updates_out):
  """A stateless transformation that returns `updates_out`, whatever it gets."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(), lambda g, state, params=None: (updates_out, state)
  )


def _random_tree(seed, zeros=False):
  rng = np.random.default_rng(seed)
  tree = {'a': rng.normal(size=(6, 5)), 'b': rng.normal(size=(4,)), 'c': rng.normal(size=(2, 3, 4))}
  if zeros:
    tree['a'][0, :2] = 0.0
    tree['b'][1] = 0.0
  return tree


def _as_jax(tree):
  return jax.tree.map(jnp.asarray, tree)


# ---------------------------------------------------------------- formulas ---


@pytest.mark.parametrize('direction,s', [('descent', -1.0), ('gradient', 1.0)])
def test_grams_formula(direction, s):
  with jax.enable_x64(True):
    g, u = _random_tree(0, zeros=True), _random_tree(1, zeros=True)
    tx = mlorc.grams(_fixed(_as_jax(u)), direction=direction)
    got, _ = tx.update(_as_jax(g), tx.init(_as_jax(g)))
    for k in g:
      np.testing.assert_allclose(got[k], s * np.sign(g[k]) * np.abs(u[k]), rtol=1e-15)
      assert got[k].dtype == jnp.float64


@pytest.mark.parametrize('direction,s', [('descent', -1.0), ('gradient', 1.0)])
def test_cautious_formula(direction, s):
  with jax.enable_x64(True):
    g, u = _random_tree(2, zeros=True), _random_tree(3, zeros=True)
    # One entry kept out of 4000: the 1e-3 floor of the kept fraction applies.
    g['few'] = np.ones(4000)
    u['few'] = -s * np.ones(4000)
    u['few'][7] = s * 2.0
    g['none'], u['none'] = np.ones(5), -s * np.ones(5)
    tx = mlorc.cautious(_fixed(_as_jax(u)), direction=direction)
    got, _ = tx.update(_as_jax(g), tx.init(_as_jax(g)))
    for k in g:
      mask = (s * u[k] * g[k] > 0).astype(np.float64)
      want = u[k] * mask / max(mask.mean(), 1e-3)
      np.testing.assert_allclose(got[k], want, rtol=1e-15)
    assert float(got['few'][7]) == s * 2000.0
    assert not np.any(got['none'])


@pytest.mark.parametrize('wrapper', [mlorc.grams, mlorc.cautious])
def test_wrappers_keep_the_inner_state_and_check_direction(wrapper):
  params = {'w': jnp.ones((3, 2)), 'b': jnp.ones(2)}
  inner = optax.adam(1e-2)
  tx = wrapper(inner)
  state = tx.init(params)
  chex.assert_trees_all_equal(state, inner.init(params))
  # map_params (and nnx.Optimizer's metadata) find the moments where optax's are.
  halves = optax.tree.map_params(tx, lambda x: x + 0.5, state)
  assert float(halves[0].mu['w'][0, 0]) == 0.5 and int(halves[0].count) == 0
  with pytest.raises(ValueError, match="direction.*'descent'.*'gradient'"):
    wrapper(inner, direction='ascent')


def test_cautious_weight_decay_formula_with_schedule_and_mask():
  with jax.enable_x64(True):
    u, w = _random_tree(4, zeros=True), _random_tree(5, zeros=True)
    u['a'][1, 1] = 0.0  # u * w == 0 counts as agreeing (decayed)
    schedule = lambda count: 0.1 * (count + 1)
    mask = {'a': True, 'b': True, 'c': False}
    tx = mlorc.add_cautious_weight_decay(schedule, mask)
    state = tx.init(_as_jax(w))
    for step in range(2):
      got, state = tx.update(_as_jax(u), state, _as_jax(w))
      rate = 0.1 * (step + 1)
      for k in ('a', 'b'):
        want = u[k] + rate * (u[k] * w[k] >= 0) * w[k]
        np.testing.assert_allclose(got[k], want, rtol=1e-15)
      np.testing.assert_array_equal(got['c'], u['c'])
    assert float(got['a'][1, 1]) == 0.2 * w['a'][1, 1] != 0.0
    with pytest.raises(ValueError, match='params'):
      tx.update(_as_jax(u), state)


def test_orthograd_formula():
  with jax.enable_x64(True):
    g, w = _random_tree(6), _random_tree(7)
    w['b'] = np.zeros(4)  # a zero parameter leaves its gradient unchanged
    tx = mlorc.orthograd()
    got, _ = tx.update(_as_jax(g), tx.init(_as_jax(w)), _as_jax(w))
    for k in g:
      gf, wf = g[k].ravel(), w[k].ravel()
      perp = gf - (wf @ gf) / (wf @ wf + 1e-30) * wf
      want = perp * np.linalg.norm(gf) / (np.linalg.norm(perp) + 1e-30)
      np.testing.assert_allclose(np.ravel(got[k]), want, rtol=1e-12)
      assert abs(float(jnp.vdot(got[k], w[k]))) < 1e-12
      np.testing.assert_allclose(jnp.linalg.norm(got[k]), np.linalg.norm(gf), rtol=1e-12)
    np.testing.assert_array_equal(got['b'], g['b'])
  # A mask leaves parameters out; float32 stays float32.
  g32, w32 = _as_jax(_random_tree(6)), _as_jax(_random_tree(7))
  g32, w32 = jax.tree.map(lambda x: x.astype(jnp.float32), (g32, w32))
  masked = mlorc.orthograd(mask={'a': True, 'b': False, 'c': True})
  got, _ = masked.update(g32, masked.init(w32), w32)
  assert got['b'] is g32['b'] and got['a'].dtype == jnp.float32


# ------------------------------------------------------ stochastic rounding ---


def test_stochastic_rounding_equals_apply_updates_for_other_dtypes():
  params = {'f32': jnp.linspace(-1, 1, 7), 'f16': jnp.ones(3, jnp.float16), 'none': None}
  updates = {'f32': jnp.full(7, 1e-3), 'f16': jnp.full(3, 1e-4), 'none': None}
  got = mlorc.apply_updates_stochastic(params, updates, jax.random.key(0))
  want = optax.apply_updates(params, updates)
  assert got['none'] is None
  for k in ('f32', 'f16'):
    assert got[k].dtype == want[k].dtype
    np.testing.assert_array_equal(got[k], want[k])


def _bf16_neighbours(x):
  """The bfloat16 values just below and just above float32 `x` (truncation and
  truncation plus one unit in the last place of the magnitude)."""
  bits = np.asarray(x, np.float32).view(np.uint32)
  low = (bits & 0xFFFF0000).view(np.float32)
  high = ((bits & 0xFFFF0000) + 0x10000).view(np.float32)
  return np.minimum(low, high), np.maximum(low, high)


def test_stochastic_rounding_is_unbiased_and_reproducible():
  key_p, key_u = jax.random.split(jax.random.key(0))
  # Magnitudes over several binades, both signs, updates around the spacing.
  params = (jax.random.normal(key_p, (512,)) * 4.0).astype(jnp.bfloat16)
  updates = jax.random.normal(key_u, (512,)) * 0.02
  exact = np.asarray(params, np.float32) + np.asarray(updates, np.float32)
  draw = jax.jit(jax.vmap(lambda k: mlorc.apply_updates_stochastic(params, updates, k)))
  draws = np.asarray(draw(jax.random.split(jax.random.key(1), 2000)), np.float32)
  low, high = _bf16_neighbours(exact)
  assert np.all((draws == low) | (draws == high))
  gap = np.where(high > low, high - low, 1.0)
  # Per entry, the mean of 2000 draws is within 5 standard errors (each draw
  # deviates by at most one gap) of the exact float32 sum ...
  assert np.all(np.abs(draws.mean(0) - exact) <= 5 * gap * 0.5 / np.sqrt(2000))
  # ... and over all draws the bias, in gaps, is ~0 (its standard error: ~1.4e-4).
  assert abs(np.mean((draws - exact) / gap)) < 1e-3
  # The same key gives the same result, another key another one.
  one = lambda seed: mlorc.apply_updates_stochastic(params, updates, jax.random.key(seed))
  np.testing.assert_array_equal(one(5), one(5))
  assert not np.array_equal(one(5), one(6))
  np.testing.assert_array_equal(jax.jit(one, static_argnums=0)(5), one(5))


def test_stochastic_rounding_accumulates_tiny_updates_and_keeps_non_finite():
  params = {'w': jnp.ones(4096, jnp.bfloat16)}
  updates = {'w': jnp.full(4096, 1e-3)}  # 0.128 of bfloat16's spacing at 1
  got = mlorc.apply_updates_stochastic(params, updates, jax.random.key(2))
  assert abs(float(jnp.mean(got['w'].astype(jnp.float32))) - 1.001) < 3e-4
  assert bool(jnp.all(optax.apply_updates(params, updates)['w'] == 1))  # all lost
  special = {'w': jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0], jnp.bfloat16)}
  got = mlorc.apply_updates_stochastic(special, {'w': jnp.zeros(4)}, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(got['w'], np.float32), [np.inf, -np.inf, np.nan, 0.0])


# ------------------------------------------------------------- composition ---

_W = {'w': True, 'b': False}  # compress the matrix, not the bias


def _options():
  """name -> factory(learning_rate, compress) of an option around an MLorc optimizer."""
  return {
      'grams': lambda learning_rate, compress: mlorc.grams(mlorc.adamw(learning_rate, rank=2, compress=compress)),
      'cautious': lambda learning_rate, compress: mlorc.cautious(
          mlorc.lion(learning_rate / 10, rank=2, compress=compress)
      ),
      'cautious_before_lr': lambda learning_rate, compress: optax.chain(
          mlorc.cautious(mlorc.scale_by_adopt(rank=2, compress=compress), direction='gradient'),
          optax.scale_by_learning_rate(learning_rate),
      ),
      'orthograd_and_cautious_weight_decay': lambda learning_rate, compress: optax.chain(
          mlorc.orthograd(),
          mlorc.scale_by_adam(rank=2, compress=compress),
          mlorc.add_cautious_weight_decay(1e-2),
          optax.scale_by_learning_rate(learning_rate),
      ),
  }


def _small_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {'w': jax.random.normal(k1, (12, 8)), 'b': 0.1 * jax.random.normal(k2, (8,))}


def _grad(params, t):
  return jax.tree.map(lambda x: jnp.sin(x * (t + 1.0)) + 0.1 * x - 0.05 * t, params)


@pytest.mark.parametrize('name', list(_options()))
def test_option_composes_under_jit_inject_hyperparams_and_multisteps(name):
  make = _options()[name]
  params = _small_params()
  plain = make(1e-2, _W)
  # One program covers both wrappers: MultiSteps around inject_hyperparams.
  injected = optax.inject_hyperparams(make, static_args=('compress',))(
      learning_rate=1e-2, compress=_W
  )
  multi = optax.MultiSteps(injected, every_k_schedule=2)
  update_plain, update_multi = jax.jit(plain.update), jax.jit(multi.update)
  s_plain, s_multi = plain.init(params), multi.init(params)
  for t in range(0, 6, 2):
    g0, g1 = _grad(params, t), _grad(params, t + 1)
    u0, s_multi = update_multi(g0, s_multi, params)
    assert all(not bool(jnp.any(u)) for u in jax.tree.leaves(u0))
    u1, s_multi = update_multi(g1, s_multi, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
    want, s_plain = update_plain(mean, s_plain, params)
    chex.assert_trees_all_close(u1, want, rtol=1e-5, atol=1e-8)
  assert float(jnp.max(jnp.abs(want['w']))) > 1e-4
  if name in ('grams', 'cautious'):  # descent: never along the gradient
    assert all(bool(jnp.all(u * mean[k] <= 0)) for k, u in want.items())
  # The learning rate is a hyperparameter of the state, read at every step.
  assert 'learning_rate' in s_multi.inner_opt_state.hyperparams
  leaves = jax.tree.leaves(s_plain, is_leaf=lambda x: isinstance(x, mlorc.LowRankFactors))
  assert any(isinstance(x, mlorc.LowRankFactors) for x in leaves)


class _MLP(nnx.Module):

  def __init__(self, rngs, dtype=jnp.float32):
    self.hidden = nnx.Linear(32, 64, rngs=rngs, param_dtype=dtype)
    self.out = nnx.Linear(64, 8, rngs=rngs, param_dtype=dtype)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _data():
  x = jax.random.normal(jax.random.key(1), (128, 32))
  return x, jnp.sin(x[:, :8])


def _hidden_kernel_only(params):
  """Compresses the (32, 64) kernel only: one matrix keeps compilation short."""
  return jax.tree.map(lambda p: p.shape == (32, 64), params)


@pytest.mark.parametrize('name', list(_options()))
def test_option_trains_in_nnx_optimizer(name):
  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _options()[name](1e-2, _hidden_kernel_only), wrt=nnx.Param)
  x, y = _data()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < 0.5 * losses[0], losses[::8]
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      nnx.state(optimizer.opt_state))]
  assert any('hidden' in p and "'u'" in p for p in paths)


class _StochasticOptimizer(nnx.Optimizer):
  """nnx.Optimizer whose update applies the updates with stochastic rounding."""

  def update(self, model, grads, *, key):
    params = nnx.as_pure(nnx.state(model, self.wrt))
    grads = nnx.as_pure(nnx.state(grads, self.wrt))
    updates, opt_state = self.tx.update(grads, nnx.as_pure(self.opt_state), params)
    nnx.update(model, mlorc.apply_updates_stochastic(params, updates, key))
    nnx.update(self.opt_state, nnx.state(opt_state))
    self.step[...] += 1


def test_stochastic_rounding_keeps_the_small_steps_of_a_bfloat16_nnx_model():
  x, y = _data()
  loss_fn = lambda m: jnp.mean((m(x).astype(jnp.float32) - y) ** 2)
  flat = lambda m: jnp.concatenate(
      [p.astype(jnp.float32).ravel() for p in jax.tree.leaves(nnx.state(m, nnx.Param))]
  )

  def displacement(dtype, stochastic):
    """How far 10 steps move the parameters, and the final loss."""
    model = _MLP(nnx.Rngs(0), dtype)
    # The float32 model's initial weights, rounded: all runs start alike.
    nnx.update(model, jax.tree.map(lambda p: p.astype(dtype), nnx.state(_MLP(nnx.Rngs(0)), nnx.Param)))
    start = flat(model)
    cls = _StochasticOptimizer if stochastic else nnx.Optimizer
    # Steps of about 2e-4, below half the bfloat16 spacing of most weights.
    optimizer = cls(model, mlorc.adamw(2e-4, rank=2, compress=_hidden_kernel_only), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, key):
      grads = nnx.grad(loss_fn)(model)
      if stochastic:
        optimizer.update(model, grads, key=key)
      else:
        optimizer.update(model, grads)

    for t in range(10):
      step(model, optimizer, jax.random.key(t))
    return flat(model) - start, float(loss_fn(model))

  d32, loss32 = displacement(jnp.float32, False)
  d_sr, loss_sr = displacement(jnp.bfloat16, True)
  d_nearest, loss_nearest = displacement(jnp.bfloat16, False)
  progress = lambda d: float(jnp.vdot(d, d32) / jnp.vdot(d32, d32))
  # Stochastic rounding moves the weights as far along the float32 path as
  # float32 does (unbiased); round to nearest loses about half of it.
  assert abs(progress(d_sr) - 1) < 0.1, progress(d_sr)
  assert progress(d_nearest) < 0.6, progress(d_nearest)
  assert abs(loss_sr - loss32) < 0.25 * abs(loss_nearest - loss32), (loss32, loss_sr, loss_nearest)
