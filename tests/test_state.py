"""What the state holds: which leaves are compressed, their size, shapes and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from helpers import COMPRESS_ALL, gradient, make_params


def _sizes(factors):
  return sum(x.size for x in factors)


def test_compressed_state_is_2r_m_plus_n_plus_1_numbers():
  params = {'w': jnp.zeros((300, 200)), 'emb': jnp.zeros((1000, 128))}
  rank = 4
  state = mlorc.scale_by_adam(rank=rank).init(params)
  for name, (m, n) in [('w', (300, 200)), ('emb', (1000, 128))]:
    mu, nu = state.inner_state.mu[name], state.inner_state.nu[name]
    assert _sizes(mu) + _sizes(nu) == 2 * rank * (m + n + 1)


def test_default_policy_keeps_vectors_small_matrices_and_stacked_biases_full():
  params = {
      'kernel': jnp.zeros((256, 512)),
      'scanned_kernel': jnp.zeros((6, 256, 512)),
      'scanned_bias': jnp.zeros((6, 512)),  # (layers, d) from nn.scan
      'bias': jnp.zeros(512),
      'small': jnp.zeros((32, 512)),
      'scalar': jnp.zeros(()),
      'step': jnp.zeros((256, 256), jnp.int32),
  }
  mu = mlorc.scale_by_adam(rank=4).init(params).inner_state.mu
  assert isinstance(mu['kernel'], mlorc.LowRankFactors)
  assert mu['scanned_kernel'].u.shape == (6, 256, 4)  # one factorisation per layer
  assert mu['scanned_kernel'].v.shape == (6, 512, 4)
  for name in ('scanned_bias', 'bias', 'small', 'scalar', 'step'):
    assert not isinstance(mu[name], mlorc.LowRankFactors), name
    assert mu[name].shape == params[name].shape


def test_matrix_views_for_attention_and_conv_kernels():
  params = {
      'qkv': jnp.zeros((64, 4, 16)),  # (embed, heads, head_dim)
      'out': jnp.zeros((4, 16, 64)),  # (heads, head_dim, embed)
      'conv': jnp.zeros((3, 3, 8, 16)),  # (kh, kw, in, out)
  }
  views = {
      'qkv': mlorc.MatrixView(rows=(0,), cols=(1, 2)),
      'out': mlorc.MatrixView(rows=(0, 1), cols=(2,)),
      'conv': mlorc.MatrixView(rows=(0, 1, 2), cols=(3,)),
  }
  tx = mlorc.adam(1e-2, rank=2, compress=views)
  state = tx.init(params)
  mu = state[0].inner_state.mu
  assert (mu['qkv'].u.shape, mu['qkv'].v.shape) == ((64, 2), (64, 2))
  assert (mu['out'].u.shape, mu['out'].v.shape) == ((64, 2), (64, 2))
  assert (mu['conv'].u.shape, mu['conv'].v.shape) == ((72, 2), (16, 2))
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  updates, _ = tx.update(grads, state, params)
  for name in params:
    assert updates[name].shape == params[name].shape
    # A constant gradient is rank 1: its first update is exactly Adam's -lr.
    np.testing.assert_allclose(updates[name], -1e-2, rtol=1e-4)


def test_views_with_batch_axes_match_explicit_per_matrix_runs():
  """A (layers, m, n) leaf is compressed per layer: the same as separate leaves."""
  with jax.enable_x64(True):
    stack = jax.random.normal(jax.random.key(0), (3, 10, 9), jnp.float64)
    full_rank = mlorc.scale_by_adam(rank=9, compress=True, factor_dtype='float64')
    separate = {f'l{i}': stack[i] for i in range(3)}
    s_stack, s_sep = full_rank.init({'s': stack}), full_rank.init(separate)
    for t in range(3):
      g = gradient({'s': stack}, t)
      u_stack, s_stack = full_rank.update(g, s_stack)
      u_sep, s_sep = full_rank.update({f'l{i}': g['s'][i] for i in range(3)}, s_sep)
      for i in range(3):
        np.testing.assert_allclose(u_stack['s'][i], u_sep[f'l{i}'], rtol=1e-9)


def test_callable_policy_receives_params():
  params = make_params(jax.random.key(0))
  policy = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
  mu = mlorc.scale_by_lion(rank=2, compress=policy).init(params).inner_state.mu
  assert isinstance(mu['w'], mlorc.LowRankFactors)
  assert not isinstance(mu['stack'], mlorc.LowRankFactors)


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float32', 'float64'])
@pytest.mark.parametrize('make', [mlorc.adamw, mlorc.lion], ids=['adamw', 'lion'])
def test_state_shapes_and_dtypes_never_change(dtype, make):
  with jax.enable_x64(dtype == 'float64'):
    params = make_params(jax.random.key(0), jnp.dtype(dtype))
    tx = make(1e-3, rank=2, compress=COMPRESS_ALL)
    state = tx.init(params)
    spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    before = spec(state)
    update = jax.jit(tx.update)
    for t in range(3):
      updates, state = update(gradient(params, t), state, params)
      assert spec(state) == before
      assert spec(updates) == spec(params)
      params = optax.apply_updates(params, updates)
    factors = state[0].inner_state.mu['w']
    assert factors.u.dtype == jnp.float32
    if dtype != 'float16':  # in float16 optax's own eps=1e-8 rounds to 0
      assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def test_factor_dtype_option():
  params = {'w': jnp.zeros((200, 160), jnp.bfloat16)}
  state = mlorc.scale_by_adam(factor_dtype='bfloat16').init(params)
  assert state.inner_state.mu['w'].u.dtype == jnp.bfloat16


def test_state_has_leading_count_and_no_prng_keys():
  params = make_params(jax.random.key(0))
  state = mlorc.scale_by_adam(rank=2, compress=COMPRESS_ALL).init(params)
  assert state._fields[0] == 'count' and state.count.dtype == jnp.int32
  for leaf in jax.tree.leaves(state):
    assert not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    assert leaf.size > 0  # orbax cannot save zero-size arrays
