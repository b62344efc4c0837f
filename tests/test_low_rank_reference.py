"""The low-rank path against float64 NumPy references.

MLorc-Adam at rank 2-4 against a NumPy transcription (reconstruct, repair,
Adam step, exact truncated SVD); the repair's chunked fill against the fill
of the whole reconstruction; warm start against a cold sketch; the atan2
option (Adam-atan2) against its NumPy transcription.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax as mlorc
from mlorc_optax._src.optimizers import adam_atan2
from mlorc_optax._src import repair


def _truncated(a, rank):
  u, s, vt = np.linalg.svd(a, full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


def _fill(x):
  """The repair's fill: the mean magnitude of the negative entries (0 if none)."""
  negative = x < 0
  return float(-x[negative].mean()) if negative.any() else 0.0


def mlorc_adam_reference(grads, rank, b1=0.9, b2=0.999, eps=1e-8, fill=_fill, c=0.0):
  """MLorc-Adam (arXiv 2506.01897) of one matrix in float64 NumPy, with
  optax's bias corrections and an exact truncated SVD as the compressor;
  with residual correction c, the update uses m + c b1 / (1 - b1) (m - m~).

  Returns the update of every step and the last stored moments.
  """
  m_stored = v_stored = np.zeros_like(grads[0])
  updates = []
  for t, g in enumerate(grads, start=1):
    v_repaired = np.where(v_stored < 0, fill(v_stored), v_stored)
    m = b1 * m_stored + (1 - b1) * g
    v = b2 * v_repaired + (1 - b2) * g * g
    m_stored, v_stored = _truncated(m, rank), _truncated(v, rank)
    m_used = m + c * b1 / (1 - b1) * (m - m_stored)
    updates.append((m_used / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
  return updates, m_stored, v_stored


def mlorc_adopt_reference(grads, rank, b1=0.9, b2=0.9999, eps=1e-6, c=0.0):
  """MLorc-ADOPT without clipping (optax.contrib.scale_by_adopt's steps) of
  one matrix in float64 NumPy, exact truncated SVD: step 1 only sets
  v = g**2; later steps n = g / max(sqrt(v~), eps), m = b1 m~ + (1 - b1) n,
  u = m + c b1 / (1 - b1) (m - m~_new), v = b2 v~ + (1 - b2) g**2."""
  m_stored = v_stored = np.zeros_like(grads[0])
  updates = []
  for t, g in enumerate(grads, start=1):
    v_repaired = np.where(v_stored < 0, _fill(v_stored), v_stored)
    if t == 1:
      m, v = m_stored, g * g
    else:
      m = b1 * m_stored + (1 - b1) * g / np.maximum(np.sqrt(v_repaired), eps)
      v = b2 * v_repaired + (1 - b2) * g * g
    m_stored, v_stored = _truncated(m, rank), _truncated(v, rank)
    updates.append(m + c * b1 / (1 - b1) * (m - m_stored))
  return updates, m_stored, v_stored


def mlorc_lion_reference(grads, rank, b1=0.9, b2=0.99, c=0.0):
  """MLorc-Lion of one matrix in float64 NumPy (exact truncated SVD), with
  residual correction c: sign(b1 m~ + (1 - b1) g + c b1 / (1 - b2) R)."""
  m_stored = np.zeros_like(grads[0])
  updates = []
  for g in grads:
    m = b2 * m_stored + (1 - b2) * g
    direction = b1 * m_stored + (1 - b1) * g
    m_stored = _truncated(m, rank)
    updates.append(np.sign(direction + c * b1 / (1 - b2) * (m - m_stored)))
  return updates


def _mlorc_run(grads, rank, scale_by=mlorc.scale_by_adam, **options):
  tx = scale_by(rank=rank, compress=True, factor_dtype='float64', **options)
  state = tx.init({'w': jnp.zeros(grads[0].shape)})
  update = jax.jit(tx.update)
  updates = []
  for g in grads:
    u, state = update({'w': jnp.asarray(g)}, state)
    updates.append(np.asarray(u['w']))
  moments = state.inner_state
  return updates, np.asarray(mlorc.reconstruct(moments.mu['w'])), (
      np.asarray(mlorc.reconstruct(moments.nu['w'])) if hasattr(moments, 'nu') else None
  )


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize('rank,shape', [(2, (20, 12)), (3, (12, 20)), (4, (20, 12))])
def test_mlorc_adam_matches_a_numpy_transcription(rank, shape):
  """With rank + oversample < min(m, n) the randomized SVD is really sketched;
  8 power iterations make it agree with the exact truncated SVD to ~1e-7."""
  rng = np.random.default_rng(rank)
  grads = [rng.standard_normal(shape) for _ in range(5)]
  want, want_m, want_v = mlorc_adam_reference(grads, rank)
  with jax.enable_x64(True):
    got, got_m, got_v = _mlorc_run(grads, rank, oversample=6, power_iters=8)
  for t, (a, b) in enumerate(zip(got, want)):
    assert _rel(a, b) < 1e-5, f'step {t + 1}'
  assert _rel(got_m, want_m) < 1e-5 and _rel(got_v, want_v) < 1e-5
  # The comparison is sharp enough to see the repair: with a fill of 0 instead
  # of the mean magnitude the reference moves by far more than the tolerance.
  unrepaired, _, _ = mlorc_adam_reference(grads, rank, fill=lambda x: 0.0)
  assert max(_rel(a, b) for a, b in zip(unrepaired, want)) > 1e-2


@pytest.mark.parametrize('c', [0.5, 1.0])
def test_residual_correction_matches_the_transcription(c):
  """The corrected update, against the reference: m + c b1/(1-b1) R in
  Adam's numerator; the stored moments are the uncorrected step's."""
  rng = np.random.default_rng(7)
  grads = [rng.standard_normal((20, 12)) for _ in range(5)]
  want, want_m, want_v = mlorc_adam_reference(grads, 3, c=c)
  with jax.enable_x64(True):
    got, got_m, got_v = _mlorc_run(grads, 3, oversample=6, power_iters=8, residual_correction=c)
  for t, (a, b) in enumerate(zip(got, want)):
    assert _rel(a, b) < 1e-5, f'step {t + 1}'
  assert _rel(got_m, want_m) < 1e-5 and _rel(got_v, want_v) < 1e-5
  # Sharp enough to see the correction: without it the updates differ.
  plain, _, _ = mlorc_adam_reference(grads, 3)
  assert max(_rel(a, b) for a, b in zip(plain, want)) > 1e-2


def test_adopt_residual_correction_matches_the_transcription():
  rng = np.random.default_rng(11)
  grads = [rng.standard_normal((20, 12)) for _ in range(5)]
  # eps of 1e-3 keeps n = g / max(sqrt(v~), eps) well conditioned, so that
  # the sketch's 1e-7 error stays visible as such.
  want, want_m, want_v = mlorc_adopt_reference(grads, 3, eps=1e-3, c=1.0)
  with jax.enable_x64(True):
    got, got_m, got_v = _mlorc_run(
        grads, 3, mlorc.scale_by_adopt, oversample=6, power_iters=8, eps=1e-3,
        use_clipping=False, residual_correction=1.0,
    )
  for t, (a, b) in enumerate(zip(got[1:], want[1:]), start=2):
    assert _rel(a, b) < 1e-5, f'step {t}'
  assert _rel(got_m, want_m) < 1e-5 and _rel(got_v, want_v) < 1e-5
  plain, _, _ = mlorc_adopt_reference(grads, 3, eps=1e-3)
  assert max(_rel(a, b) for a, b in zip(plain[1:], want[1:])) > 1e-2


def test_prodigy_residual_correction_changes_the_update_not_the_state():
  """The sums behind Prodigy's d and the stored factors are the uncorrected
  step's; only the update moves."""
  rng = np.random.default_rng(12)
  params = {'w': rng.standard_normal((20, 12))}
  grads = [{'w': rng.standard_normal((20, 12))} for _ in range(3)]

  def run(c):
    tx = mlorc.scale_by_prodigy(
        rank=3, compress=True, factor_dtype='float64', s_stride=1, residual_correction=c)
    state, updates, update = tx.init(params), [], jax.jit(tx.update)
    for g in grads:
      u, state = update(g, state, params)
      updates.append(np.asarray(u['w']))
    return updates, state

  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, params)
    plain, plain_state = run(None)
    corrected, corrected_state = run(1.0)
  chex.assert_trees_all_close(corrected_state, plain_state, rtol=1e-12, atol=1e-15)
  assert max(_rel(a, b) for a, b in zip(corrected[1:], plain[1:])) > 1e-2


def test_lion_residual_correction_matches_the_transcription():
  rng = np.random.default_rng(8)
  grads = [rng.standard_normal((20, 12)) for _ in range(5)]
  c = 0.05
  want = mlorc_lion_reference(grads, 3, c=c)
  with jax.enable_x64(True):
    got, _, _ = _mlorc_run(
        grads, 3, mlorc.scale_by_lion, oversample=6, power_iters=8, residual_correction=c
    )
  plain = mlorc_lion_reference(grads, 3)
  assert sum(np.sum(a != b) for a, b in zip(plain, want)) > 10  # the correction flips signs
  for t, (a, b) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(a, b, err_msg=f'step {t + 1}')


@pytest.mark.parametrize('scale_by', [mlorc.scale_by_adam, mlorc.scale_by_lion, mlorc.scale_by_adopt])
def test_residual_correction_is_exact_at_full_rank(scale_by):
  """Nothing is discarded at full rank, so the corrected step is the plain one."""
  rng = np.random.default_rng(9)
  grads = [rng.standard_normal((9, 7)) for _ in range(4)]
  with jax.enable_x64(True):
    plain, _, _ = _mlorc_run(grads, 7, scale_by)
    corrected, _, _ = _mlorc_run(grads, 7, scale_by, residual_correction=1.0)
  for a, b in zip(corrected, plain):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def _factors_with_negatives(m, n, rank, key):
  """Factors whose reconstruction has negative entries of a size that
  grows with the row index, so that no subset of rows has the full mean."""
  ku, kv = jax.random.split(jax.random.key(key))
  u = jax.random.normal(ku, (m, rank)) * (1.0 + 3.0 * jnp.arange(m)[:, None] / m)
  v = jax.random.normal(kv, (n, rank))
  return mlorc.LowRankFactors(u=u, s=jnp.linspace(2.0, 1.0, rank), v=v)


@pytest.mark.parametrize('m', [7, 11, 12, 64, 50257])  # 50257: GPT-2's vocabulary
def test_negative_fill_equals_the_fill_of_the_whole_reconstruction(m):
  f = _factors_with_negatives(m, 16, 3, key=m)
  u, s, v = (np.asarray(x, np.float64) for x in f)
  full = (u * s) @ v.T
  want = _fill(full)
  np.testing.assert_allclose(float(repair.negative_fill(f)), want, rtol=1e-4)
  for chunk_rows in (1, 3):
    got = jax.jit(lambda f, c=chunk_rows: repair.negative_fill(f, chunk_rows=c))(f)
    np.testing.assert_allclose(float(got), want, rtol=1e-4, err_msg=f'chunk_rows={chunk_rows}')
  # repair_nonnegative computes its own fill from the whole matrix: the same.
  x = mlorc.reconstruct(f)
  chunked = repair.repair_nonnegative(x, repair.negative_fill(f))
  np.testing.assert_allclose(chunked, mlorc.repair_nonnegative(x), rtol=1e-4)
  # A fill from the first chunk alone would not pass the checks above.
  first = repair._chunk_rows(m, 16)
  stride = m // first
  assert abs(_fill(full[::stride][:first]) - want) > 1e-2 * want


def test_warm_start_feeds_the_previous_right_factor():
  """Fed the same gradient every step, a warm-started sketch (no power
  iteration) iterates on the previous right factor and finds the top
  singular subspace; a cold one, from the same keys, does not."""
  rng = np.random.default_rng(0)
  m, n, rank, leaves = 48, 32, 2, 8
  qa, _ = np.linalg.qr(rng.standard_normal((m, n)))
  qb, _ = np.linalg.qr(rng.standard_normal((n, n)))
  g = (qa * np.r_[1.0, 0.8, np.full(n - 2, 0.25)]) @ qb.T  # a gap after rank 2
  top = qb[:, :rank]
  grads = {f'w{i}': jnp.asarray(g, jnp.float32) for i in range(leaves)}  # one sketch each

  def sin_angles(warm_start):
    tx = mlorc.scale_by_adam(rank=rank, compress=True, power_iters=0, warm_start=warm_start)
    state, update = tx.init(grads), jax.jit(tx.update)
    for _ in range(20):
      _, state = update(grads, state)
    angles = []
    for k in grads:
      v, _ = np.linalg.qr(np.asarray(state.inner_state.mu[k].v, np.float64))
      angles.append(np.linalg.norm(v - top @ (top.T @ v), 2))
    return np.array(angles)

  warm, cold = sin_angles(True), sin_angles(False)
  assert np.median(warm) < 0.15, warm
  assert np.median(cold) > 0.3, cold


def adam_atan2_reference(grads, b1=0.9, b2=0.999):
  """Adam-atan2 in float64 NumPy: (4/pi) atan2(m / (1 - b1^t), sqrt(v / (1 - b2^t)))."""
  m = v = np.zeros_like(grads[0])
  updates = []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    updates.append(4 / np.pi * np.arctan2(m / (1 - b1**t), np.sqrt(v / (1 - b2**t))))
  return updates


def test_adam_atan2_transformation_matches_a_numpy_transcription():
  rng = np.random.default_rng(0)
  shape = (9, 7)
  grads = [rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, shape) for _ in range(6)]
  for g in grads[:3]:
    g[0, 0] = 0.0  # atan2(0, 0) = 0 while a gradient has always been 0
  want = adam_atan2_reference(grads, b1=0.8, b2=0.95)
  with jax.enable_x64(True):
    tx = adam_atan2.scale_by_adam_atan2(b1=0.8, b2=0.95)
    state, update = tx.init(jnp.zeros(shape)), jax.jit(tx.update)
    for g, u_want in zip(grads, want):
      u, state = update(jnp.asarray(g), state)
      np.testing.assert_allclose(u, u_want, rtol=1e-12, atol=1e-15)
  assert isinstance(state, optax.ScaleByAdamState)
  assert want[0][0, 0] == 0.0 and np.max(np.abs(want)) <= 2.0


def test_mlorc_adamw_with_atan2_at_full_rank_matches_the_transcription():
  rng = np.random.default_rng(1)
  shape = (9, 7)
  grads = [rng.standard_normal(shape) * 10.0 ** rng.uniform(-1, 1, shape) for _ in range(6)]
  want = adam_atan2_reference(grads, b1=0.8, b2=0.95)
  with jax.enable_x64(True):
    # rank 7 = min(m, n): the factors hold the moments exactly.
    tx = mlorc.adamw(
        0.1, b1=0.8, b2=0.95, weight_decay=0.0, atan2=True, rank=7, compress=True,
        factor_dtype='float64',
    )
    params = {'w': jnp.zeros(shape)}
    state, update = tx.init(params), jax.jit(tx.update)
    assert isinstance(state[0].inner_state.nu['w'], mlorc.LowRankFactors)
    for g, u_want in zip(grads, want):
      u, state = update({'w': jnp.asarray(g)}, state, params)
      np.testing.assert_allclose(u['w'], -0.1 * u_want, rtol=1e-9, atol=1e-12)


def test_adam_atan2_keeps_the_second_moment_repair():
  """The atan2 state is optax's ScaleByAdamState: its `nu` is repaired."""
  tx = mlorc.scale_by_adam(atan2=True, rank=2, compress=True)
  state = tx.init({'w': jnp.zeros((24, 16))})
  seen_negative = False
  update = jax.jit(tx.update)
  for t in range(4):
    g = {'w': jax.random.normal(jax.random.key(t), (24, 16))}
    seen_negative |= bool(jnp.any(mlorc.reconstruct(state.inner_state.nu['w']) < 0))
    u, state = update(g, state)
    # A negative v would make sqrt NaN; repaired, |u| stays within its bound.
    assert bool(jnp.all(jnp.abs(u['w']) <= 2.0))
  assert seen_negative


def test_residual_correction_may_be_injected():
  """Under inject_hyperparams a traced c gives the same updates as a fixed one."""
  params = {'w': jnp.zeros((32, 24))}
  grads = [{'w': jax.random.normal(jax.random.key(t), (32, 24))} for t in range(3)]
  fixed = mlorc.adamw(1e-2, rank=2, compress=True, residual_correction=0.5)
  injected = optax.inject_hyperparams(mlorc.adamw, static_args=('rank',))(
      1e-2, rank=2, compress=True, residual_correction=0.5
  )
  sf, si = fixed.init(params), injected.init(params)
  for g in grads:
    uf, sf = jax.jit(fixed.update)(g, sf, params)
    ui, si = jax.jit(injected.update)(g, si, params)
    np.testing.assert_allclose(ui['w'], uf['w'], rtol=1e-4, atol=1e-6)  # float32 rounding
  assert si.hyperparams['residual_correction'] == 0.5
