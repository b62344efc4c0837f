"""randomized_svd against an exact truncated SVD, and its numerical safety."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlorc_optax as mlorc


def _decaying(m, n, decay, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(m, n)))
  v, _ = np.linalg.qr(rng.normal(size=(n, n)))
  s = decay ** np.arange(n)
  return (u * s) @ v.T, s


@pytest.mark.parametrize(
    'oversample,power_iters,factor,s_rtol',
    [(0, 1, 1.5, 0.05), (5, 1, 1.01, 1e-3), (5, 2, 1.001, 1e-5)],
)
def test_error_within_small_factor_of_optimal_float64(oversample, power_iters, factor, s_rtol):
  a, s = _decaying(300, 160, 0.8)
  rank = 6
  with jax.enable_x64(True):
    f = mlorc.randomized_svd(
        jnp.asarray(a), rank, jax.random.key(1), oversample=oversample, power_iters=power_iters
    )
    assert f.u.dtype == jnp.float64
    approx = np.asarray(mlorc.reconstruct(f))
  optimal = s[rank]  # spectral error of the exact truncated SVD (Eckart-Young)
  assert np.linalg.norm(a - approx, 2) <= factor * optimal
  exact = np.linalg.svd(a, compute_uv=False)[:rank]
  # Without oversampling only the leading singular values are sharp.
  top = rank // 2 if oversample == 0 else rank
  np.testing.assert_allclose(np.asarray(f.s)[:top], exact[:top], rtol=s_rtol)
  np.testing.assert_allclose(np.asarray(f.u).T @ np.asarray(f.u), np.eye(rank), atol=1e-10)
  np.testing.assert_allclose(np.asarray(f.v).T @ np.asarray(f.v), np.eye(rank), atol=1e-10)


def test_full_rank_is_exact():
  a, _ = _decaying(20, 12, 0.5)
  f = mlorc.randomized_svd(jnp.asarray(a, jnp.float32), 50, jax.random.key(0))
  assert f.u.shape == (20, 12) and f.s.shape == (12,) and f.v.shape == (12, 12)
  np.testing.assert_allclose(np.asarray(mlorc.reconstruct(f)), a, atol=1e-5)


def test_low_rank_matrix_is_recovered_exactly():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(64, 2)) @ rng.normal(size=(2, 48))
  f = mlorc.randomized_svd(jnp.asarray(a, jnp.float32), 4, jax.random.key(3))
  np.testing.assert_allclose(np.asarray(mlorc.reconstruct(f)), a, atol=1e-4)
  assert float(f.s[2]) == 0.0 and float(f.s[3]) == 0.0  # no invented directions
  assert np.all(np.isfinite(np.asarray(f.u))) and np.all(np.isfinite(np.asarray(f.v)))


def test_zero_matrix_gives_zero_factors():
  f = mlorc.randomized_svd(jnp.zeros((40, 30)), 4, jax.random.key(0))
  for x in f:
    assert np.all(np.asarray(x) == 0.0)


@pytest.mark.parametrize('scale', [1e36, 1e30, 1e-30])
def test_extreme_magnitudes_stay_finite_and_accurate(scale):
  rng = np.random.default_rng(1)
  a = (rng.normal(size=(50, 3)) @ rng.normal(size=(3, 40))).astype(np.float32)
  f = mlorc.randomized_svd(jnp.asarray(a) * scale, 4, jax.random.key(0))
  for x in f:
    assert np.all(np.isfinite(np.asarray(x)))
  rebuilt = np.asarray(f.u * (f.s / scale)) @ np.asarray(f.v).T
  np.testing.assert_allclose(rebuilt, a, atol=1e-4 * np.abs(a).max())


def test_batched_half_precision_is_factored_in_float32_near_optimal():
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=(3, 30, 3)) @ rng.normal(size=(3, 3, 20)), jnp.bfloat16)
  f = mlorc.randomized_svd(a, 3, jax.random.key(0), oversample=2)
  assert f.u.shape == (3, 30, 3) and f.s.shape == (3, 3) and f.v.shape == (3, 20, 3)
  assert f.u.dtype == jnp.float32
  exact = np.asarray(a, np.float64)
  for i in range(3):  # each matrix of the batch against its own truncated SVD
    s = np.linalg.svd(exact[i], compute_uv=False)
    error = np.linalg.norm(exact[i] - np.asarray(mlorc.reconstruct(f))[i])
    assert error <= 1.5 * np.sqrt(np.sum(s[3:] ** 2)) + 1e-6


def test_different_keys_give_different_sketches_and_same_key_reproduces():
  a, _ = _decaying(60, 40, 0.95)
  a = jnp.asarray(a, jnp.float32)
  f1 = mlorc.randomized_svd(a, 4, jax.random.key(0), power_iters=0)
  f2 = mlorc.randomized_svd(a, 4, jax.random.key(0), power_iters=0)
  f3 = mlorc.randomized_svd(a, 4, jax.random.key(1), power_iters=0)
  np.testing.assert_array_equal(np.asarray(mlorc.reconstruct(f1)), np.asarray(mlorc.reconstruct(f2)))
  assert not np.allclose(np.asarray(mlorc.reconstruct(f1)), np.asarray(mlorc.reconstruct(f3)))


def test_jit_compiles():
  a = jnp.ones((16, 8))
  f = jax.jit(mlorc.randomized_svd, static_argnums=1)(a, 2, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(mlorc.reconstruct(f)), np.ones((16, 8)), atol=1e-5)


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(rank=0), 'rank'),
        (dict(rank=2.5), 'rank'),
        (dict(rank=True), 'rank'),
        (dict(rank=2, oversample=-1), 'oversample'),
        (dict(rank=2, power_iters=-1), 'power_iters'),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    mlorc.randomized_svd(jnp.ones((8, 8)), key=jax.random.key(0), **kwargs)


def test_vector_input_is_rejected():
  with pytest.raises(ValueError, match='`a`'):
    mlorc.randomized_svd(jnp.ones(8), 2, jax.random.key(0))


def test_warm_start_from_a_nearby_subspace_replaces_the_power_iteration():
  a, s = _decaying(300, 160, 0.9)
  rank = 6
  rng = np.random.default_rng(5)
  nearby = a + 0.01 * rng.normal(size=a.shape) / np.sqrt(a.shape[1])
  previous_v = np.linalg.svd(nearby)[2][:rank].T  # last step's right factor
  with jax.enable_x64(True):
    err = lambda **kw: np.linalg.norm(
        a - np.asarray(mlorc.reconstruct(mlorc.randomized_svd(jnp.asarray(a), rank, jax.random.key(0), power_iters=0, **kw))), 2
    )
    warm, cold = err(warm_start=jnp.asarray(previous_v)), err()
    zero = err(warm_start=jnp.zeros((160, rank)))  # step 1: no previous factor yet
  assert warm <= 1.05 * s[rank]
  assert warm < 0.8 * cold
  assert zero <= 3 * s[rank]


def _graded(m, n, s, seed=0):
  """An (m, n) float64 matrix with exactly the singular values s."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(m, len(s))))
  v, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
  return (u * s) @ v.T


KEYS = 2000  # one batched call: the batch draws a test matrix per copy
_factor_copies = jax.jit(lambda a: mlorc.randomized_svd(a, 4, jax.random.key(0)))


@pytest.mark.parametrize('ratio', [1e-1, 1e-2, 1e-3, 1e-4, 1e-5])
@pytest.mark.parametrize('matrix_rank', [3, 4])
def test_float32_keeps_every_direction_of_a_rank_k_matrix(matrix_rank, ratio):
  # sigma_k / sigma_1 = ratio, geometric in between. Before the shifted Gram
  # passes, 1% to 100% of the keys lost the last direction below 1e-2.
  s = np.geomspace(1, ratio, matrix_rank)
  a = _graded(64, 48, s).astype(np.float32)
  f = _factor_copies(jnp.broadcast_to(jnp.asarray(a), (KEYS, 64, 48)))
  got = np.asarray(f.s)
  # Every key finds every direction, to float32 rounding of the largest one.
  eps = np.finfo(np.float32).eps
  np.testing.assert_allclose(got[:, :matrix_rank], np.broadcast_to(s, (KEYS, matrix_rank)), rtol=1e-4, atol=4 * eps)
  assert np.all(got[:, matrix_rank:] == 0.0)  # and invents none
  u, v = np.asarray(f.u[..., :matrix_rank]), np.asarray(f.v[..., :matrix_rank])
  eye = np.eye(matrix_rank)
  assert np.abs(np.einsum('bij,bik->bjk', u, u) - eye).max() < 1e-5
  assert np.abs(np.einsum('bij,bik->bjk', v, v) - eye).max() < 1e-5
  assert np.abs(np.asarray(mlorc.reconstruct(f)) - a).max() < 1e-5


def test_directions_below_rounding_level_are_dropped_not_invented():
  # Below ~2 k eps of the largest a direction cannot be told from rounding.
  s = np.array([1.0, 0.5, 1e-8])
  a = _graded(64, 48, s).astype(np.float32)
  f = mlorc.randomized_svd(jnp.asarray(a), 4, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(f.s), [1.0, 0.5, 0.0, 0.0], atol=1e-6)
  assert np.all(np.asarray(f.s)[2:] == 0.0)
  assert np.all(np.asarray(f.u)[:, 2:] == 0.0) and np.all(np.asarray(f.v)[:, 2:] == 0.0)


@pytest.mark.parametrize('rows', [False, True])
def test_orthonormalize_resolves_a_condition_number_near_one_over_eps(rows):
  # Columns of condition number 1e6: one unshifted Gram pass would lose the
  # smallest directions entirely; the basis must still span all of them.
  rng = np.random.default_rng(3)
  y = _graded(200, 5, np.geomspace(1, 1e-6, 5), seed=3) @ rng.normal(size=(5, 5))
  y = jnp.asarray(y, jnp.float32)
  from mlorc_optax._src import randomized_svd as rsvd
  q = rsvd._rows(y.T).T if rows else rsvd.orthonormalize(y)
  q = np.asarray(q, np.float64)
  np.testing.assert_allclose(q.T @ q, np.eye(5), atol=1e-5)
  exact, _ = np.linalg.qr(np.asarray(y, np.float64))
  # Same subspace: the projection of the exact basis onto q keeps its norm.
  # In float32 the smallest direction's angle is only resolved to about
  # eps * cond = 0.06 (cosine 0.998; how close depends on the CPU's kernels),
  # a lost direction would give a cosine near 0.
  np.testing.assert_allclose(np.linalg.svd(q.T @ exact, compute_uv=False), np.ones(5), atol=1e-2)


def test_orthonormalize_of_exactly_dependent_columns_has_zero_columns_not_nan():
  from mlorc_optax._src import randomized_svd as rsvd
  y = jnp.outer(jnp.arange(1.0, 41.0), jnp.ones(4))  # four equal columns
  q = np.asarray(rsvd.orthonormalize(y))
  assert np.all(np.isfinite(q))
  norms = np.linalg.norm(q, axis=0)
  assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))
  nonzero = q[:, norms > 0]
  np.testing.assert_allclose(nonzero.T @ nonzero, np.eye(nonzero.shape[1]), atol=1e-5)
  assert np.all(rsvd.orthonormalize(jnp.zeros((40, 4))) == 0)


def _with(a, entries):
  a = np.array(a, np.float32)
  for (i, j), x in entries.items():
    a[i, j] = x
  return a


@pytest.mark.parametrize('rank', [3, 8])  # a sketch, and the exact SVD (8 >= n)
def test_nan_entries_are_read_as_zero(rank):
  rng = np.random.default_rng(4)
  a = rng.normal(size=(40, 8)).astype(np.float32)
  holes = {(3, 1): 0.0, (17, 5): 0.0}
  clean = mlorc.randomized_svd(jnp.asarray(_with(a, holes)), rank, jax.random.key(0))
  dirty = mlorc.randomized_svd(
      jnp.asarray(_with(a, {k: np.nan for k in holes})), rank, jax.random.key(0)
  )
  for x, y in zip(clean, dirty):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('rank', [3, 8])
def test_infinite_and_near_overflow_entries_give_finite_factors(rank):
  rng = np.random.default_rng(5)
  big = float(np.finfo(np.float32).max)
  a = _with(rng.normal(size=(40, 8)), {(2, 3): np.inf, (9, 0): -np.inf, (30, 7): 0.9 * big})
  f = mlorc.randomized_svd(jnp.asarray(a), rank, jax.random.key(0))
  for x in f:
    assert np.all(np.isfinite(np.asarray(x)))
  assert np.all(np.asarray(f.s) <= big / 2)  # capped: reconstruct cannot overflow
  rebuilt = np.asarray(mlorc.reconstruct(f))
  assert np.all(np.isfinite(rebuilt))
  # Inf reads as the largest finite value: those entries stay huge, with their sign.
  assert rebuilt[2, 3] > 1e37 and rebuilt[9, 0] < -1e37 and rebuilt[30, 7] > 1e37


def test_matrix_of_entries_near_overflow_keeps_its_direction():
  big = float(np.finfo(np.float32).max)
  a = jnp.full((60, 50), 0.9 * big, jnp.float32)  # rank 1, ||a|| ~ 50 F
  f = mlorc.randomized_svd(a, 2, jax.random.key(0))
  assert float(f.s[0]) == pytest.approx(big / 2) and float(f.s[1]) == 0.0
  np.testing.assert_allclose(np.abs(np.asarray(f.u[:, 0])), np.full(60, 60**-0.5), rtol=1e-5)
  np.testing.assert_allclose(np.abs(np.asarray(f.v[:, 0])), np.full(50, 50**-0.5), rtol=1e-5)


def test_non_finite_warm_start_is_ignored():
  a, _ = _decaying(60, 40, 0.8)
  a = jnp.asarray(a, jnp.float32)
  bad = jnp.full((40, 4), jnp.nan)
  f = mlorc.randomized_svd(a, 4, jax.random.key(0), warm_start=bad)
  g = mlorc.randomized_svd(a, 4, jax.random.key(0), warm_start=jnp.zeros((40, 4)))
  for x, y in zip(f, g):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
