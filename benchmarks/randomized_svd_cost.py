"""Cost and rank-revealing power of the randomized SVD, before and after issue 8.

The baseline is the randomized SVD as it was before issue 8 (commit 7cf4abd:
CholeskyQR2 with an eigenvalue threshold, final SVD from the eigenvalues of
B B^T), copied here without its sharding annotations (one device). It is
timed against the current `mlorc.randomized_svd` and against `optax.adamw`'s
update of a parameter of the same shape. Every round runs every variant once,
in turn, and the ratios are taken within the round, so that the noise of a
shared machine falls on all of them alike; the tables give medians.

  * `new / old`: the current function against the baseline, called on an
    array that is a jit argument. It then includes the pass that reads NaN
    as 0 and +-Inf as +-F (`_finite`), which XLA:CPU materialises here.
  * `fused`: both called on a matrix that an elementwise op makes in the
    same program, as a moment is made in training: `_finite` fuses there.
  * `in optimizer`: `mlorc.adamw` / `mlorc.lion` updates with the current
    function against the same updates with the baseline swapped in. There
    `_finite` fuses into the producer of the moment, as in training.

It also records how often each version loses a direction of an exactly
rank-r matrix (64 x 48, sigma_r / sigma_1 from 1e-1 to 1e-6, 2000 keys), and
the compression error of the second-moment recursion over 3000 steps.

  python benchmarks/randomized_svd_cost.py            # full run (~4 min on 2 cores)
  python benchmarks/randomized_svd_cost.py --quick    # fewer rounds and keys
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import mlorc_optax as mlorc
from mlorc_optax._src.randomized_svd import LowRankFactors

# --- Baseline: randomized_svd before issue 8 (commit 7cf4abd) ---------------

_HIGHEST = jax.lax.Precision.HIGHEST


def _old_gram(a, b):
  return jnp.matmul(jnp.swapaxes(a, -1, -2), b, precision=_HIGHEST)


def _old_scale(a):
  top = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
  return jnp.where(top > 0, top, jnp.ones_like(top))


def _old_kept(w):
  k = w.shape[-1]
  return w > jnp.max(w, axis=-1, keepdims=True) * k * jnp.finfo(w.dtype).eps


def _old_inverse_sqrt(w):
  keep = _old_kept(w)
  return jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, w, 1)), 0)


def _old_whitening(gram):
  w, e = jnp.linalg.eigh(gram)
  return e * _old_inverse_sqrt(w)[..., None, :]


def _old_orthonormalize(y):
  y = y / _old_scale(y)
  for _ in range(2):
    y = jnp.matmul(y, _old_whitening(_old_gram(y, y)))
  return y


def _old_orthonormal_rows(w):
  w = w / _old_scale(w)
  for _ in range(2):
    wt = jnp.swapaxes(w, -1, -2)
    w = jnp.matmul(jnp.swapaxes(_old_whitening(_old_gram(wt, wt)), -1, -2), w)
  return w


def _old_small_svd(q, b, rank):
  c = _old_scale(b)
  b = b / c
  bt = jnp.swapaxes(b, -1, -2)
  w, e = jnp.linalg.eigh(_old_gram(bt, bt))
  w, e = jnp.flip(w, -1)[..., :rank], jnp.flip(e, -1)[..., :rank]
  root = jnp.sqrt(jnp.where(_old_kept(w), w, 0))
  v = jnp.matmul(bt, e * _old_inverse_sqrt(w)[..., None, :])
  return LowRankFactors(u=jnp.matmul(q, e), s=root * c[..., 0], v=v)


def old_randomized_svd(a, rank, key, *, oversample=0, power_iters=1, warm_start=None):
  """The baseline (no exact-SVD path: every shape here is sketched)."""
  a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
  *batch, m, n = a.shape
  rank = min(rank, m, n)
  k = min(rank + oversample, m, n)
  omega = jax.random.normal(key, (*batch, n, k), a.dtype)
  if warm_start is not None:
    j = min(warm_start.shape[-1], k)
    lead = warm_start[..., :j].astype(a.dtype) + 0.1 * omega[..., :j] / n**0.5
    omega = jnp.concatenate([lead, omega[..., j:]], axis=-1)
  left = lambda q: jnp.matmul(jnp.swapaxes(q, -1, -2), a)
  q = _old_orthonormalize(jnp.matmul(a, omega))
  for _ in range(power_iters):
    z = _old_orthonormal_rows(left(q))
    q = _old_orthonormalize(jnp.matmul(a, jnp.swapaxes(z, -1, -2)))
  return _old_small_svd(q, left(q), rank)


# --- Timing -----------------------------------------------------------------

SHAPES = [(768, 768), (768, 3072), (4096, 1024), (12, 768, 768)]
RANK = 4


def _interleaved(runs: dict, rounds: int) -> dict:
  """Per variant, per round: (wall seconds, process CPU seconds)."""
  for run in runs.values():
    run()  # compile
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      wall, cpu = time.perf_counter(), time.process_time()
      run()
      times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
  return {name: np.asarray(t) for name, t in times.items()}


def _ratio(times, a, b, column=1):
  """Median over rounds of the within-round ratio a / b (CPU time by default)."""
  return float(np.median(times[a][:, column] / times[b][:, column]))


def _standalone_rows(rounds):
  rows = []
  for shape in SHAPES:
    a = jax.random.normal(jax.random.key(1), shape)
    key = jax.random.key(0)
    adamw = optax.adamw(1e-3)
    state = adamw.init(a)
    fns = {
        'old': jax.jit(lambda a, k: old_randomized_svd(a, RANK, k)),
        'new': jax.jit(lambda a, k: mlorc.randomized_svd(a, RANK, k)),
        'old q=0': jax.jit(lambda a, k: old_randomized_svd(a, RANK, k, power_iters=0)),
        'new q=0': jax.jit(lambda a, k: mlorc.randomized_svd(a, RANK, k, power_iters=0)),
        # The matrix made by an elementwise op in the same program, as a
        # moment is in training: `_finite` fuses into it.
        'old fused': jax.jit(lambda a, k: old_randomized_svd(jnp.abs(a) - 0.5, RANK, k)),
        'new fused': jax.jit(lambda a, k: mlorc.randomized_svd(jnp.abs(a) - 0.5, RANK, k)),
    }
    runs = {name: (lambda f=f: jax.block_until_ready(f(a, key))) for name, f in fns.items()}
    update = jax.jit(lambda g, s: adamw.update(g, s, g))
    runs['optax.adamw update'] = lambda: jax.block_until_ready(update(a, state))
    t = _interleaved(runs, rounds)
    ms = lambda name: 1e3 * float(np.median(t[name][:, 1]))
    rows.append(dict(
        shape='x'.join(map(str, shape)),
        old_ms=ms('old'), new_ms=ms('new'), adamw_ms=ms('optax.adamw update'),
        new_over_old=_ratio(t, 'new', 'old'),
        new_over_adamw=_ratio(t, 'new', 'optax.adamw update'),
        old_over_adamw=_ratio(t, 'old', 'optax.adamw update'),
        new_over_old_fused=_ratio(t, 'new fused', 'old fused'),
        new_over_old_q0=_ratio(t, 'new q=0', 'old q=0'),
        new_over_adamw_q0=_ratio(t, 'new q=0', 'optax.adamw update'),
        new_over_old_wall=_ratio(t, 'new', 'old', column=0),
    ))
  return rows


def _in_optimizer_rows(rounds):
  """mlorc.adamw / mlorc.lion updates with the new and the old function."""
  try:
    from mlorc_optax._src import matrix_step
    current = matrix_step.randomized_svd
  except (ImportError, AttributeError):
    return []  # the library no longer calls randomized_svd from there
  rows = []
  for shape in SHAPES[:3]:
    params = {'w': jax.random.normal(jax.random.key(1), shape)}
    grads = {'w': jax.random.normal(jax.random.key(2), shape)}
    runs = {}
    for name, make in [('adamw', lambda: mlorc.adamw(1e-3)), ('lion', lambda: mlorc.lion(1e-4))]:
      for version, fn in [('new', current), ('old', old_randomized_svd)]:
        matrix_step.randomized_svd = fn
        try:
          tx = make()
          state = tx.init(params)
          update = jax.jit(tx.update).lower(grads, state, params).compile()
        finally:
          matrix_step.randomized_svd = current
        runs[f'{name} {version}'] = (
            lambda u=update, s=state: jax.block_until_ready(u(grads, s, params))
        )
    adamw = optax.adamw(1e-3)
    state = adamw.init(params)
    update = jax.jit(adamw.update)
    runs['optax.adamw'] = lambda: jax.block_until_ready(update(grads, state, params))
    t = _interleaved(runs, rounds)
    rows.append(dict(
        shape='x'.join(map(str, shape)),
        mlorc_adamw_new_over_old=_ratio(t, 'adamw new', 'adamw old'),
        mlorc_lion_new_over_old=_ratio(t, 'lion new', 'lion old'),
        mlorc_adamw_new_over_optax_adamw=_ratio(t, 'adamw new', 'optax.adamw'),
        mlorc_adamw_old_over_optax_adamw=_ratio(t, 'adamw old', 'optax.adamw'),
    ))
  return rows


# --- Directions lost --------------------------------------------------------

RATIOS = [1e-1, 1e-2, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6]


def _graded(m, n, s, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(m, len(s))))
  v, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
  return (u * s) @ v.T


def _loss_rate(svd, s, keys, **kwargs):
  """Share of keys whose last singular value comes back below half its value."""
  a = jnp.asarray(_graded(64, 48, s), jnp.float32)
  f = jax.jit(lambda a: svd(a, RANK, jax.random.key(0), **kwargs))(
      jnp.broadcast_to(a, (keys,) + a.shape)  # a test matrix per copy
  )
  return float(np.mean(np.asarray(f.s)[:, len(s) - 1] < 0.5 * s[-1]))


def _loss_rows(keys):
  rows = []
  cases = [('rank 4, s = 1, .5, .3, .2', [1, 0.5, 0.3, 0.2], None)]
  cases += [(f'rank {r}, geometric', None, r) for r in (3, 4)]
  for label, fixed, r in cases:
    for ratio in [None] if fixed else RATIOS:
      s = np.asarray(fixed if fixed else np.geomspace(1, ratio, r))
      for power_iters in (1, 0):
        rows.append(dict(
            matrix=label, sigma_ratio=float(s[-1] / s[0]), power_iters=power_iters,
            old_lost=_loss_rate(old_randomized_svd, s, keys, power_iters=power_iters),
            new_lost=_loss_rate(mlorc.randomized_svd, s, keys, power_iters=power_iters),
        ))
  return rows


def _recursion(svd, m=64, n=48, steps=3000, b2=0.999, seed=0):
  """Compression error / optimal error of v_t = b2 repair(V~) + (1 - b2) g^2."""
  rng = np.random.default_rng(seed)
  row = jnp.asarray(np.exp(rng.normal(size=(m, 1))), jnp.float32)
  col = jnp.asarray(np.exp(rng.normal(size=(1, n))), jnp.float32)

  def step(f, t):
    g = row * col * jax.random.normal(jax.random.fold_in(jax.random.key(seed), t), (m, n))
    v = b2 * mlorc.repair_nonnegative(mlorc.reconstruct(f)) + (1 - b2) * g * g
    f = svd(v, RANK, jax.random.fold_in(jax.random.key(seed + 1), t))
    s = jnp.linalg.svd(v, compute_uv=False)
    return f, (jnp.linalg.norm(v - mlorc.reconstruct(f)) / jnp.linalg.norm(s[RANK:]), jnp.sum(f.s == 0))

  zero = LowRankFactors(jnp.zeros((m, RANK)), jnp.zeros(RANK), jnp.zeros((n, RANK)))
  ratio, zeros = jax.jit(lambda f: jax.lax.scan(step, f, jnp.arange(1, steps + 1))[1])(zero)
  ratio, zeros = np.asarray(ratio), np.asarray(zeros)
  lost = np.nonzero(zeros)[0]
  return dict(
      median_error_over_optimal_last_1000=float(np.median(ratio[-1000:])),
      p90_error_over_optimal_last_1000=float(np.quantile(ratio[-1000:], 0.9)),
      first_step_with_a_zero_singular_value=int(lost[0] + 1) if len(lost) else None,
  )


def _recursion_rows(seeds):
  rows = []
  for seed in range(seeds):
    for version, svd in [('old', old_randomized_svd), ('new', mlorc.randomized_svd)]:
      rows.append(dict(version=version, seed=seed, **_recursion(svd, seed=seed)))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args(argv)
  rounds, keys, seeds = (5, 200, 1) if args.quick else (40, 2000, 2)
  print(f'randomized_svd, rank {RANK}, on', common.device_name())
  standalone = _standalone_rows(rounds)
  print('\nCPU time, median within-round ratios (power_iters=1 unless q=0)')
  print(common.table(standalone))
  in_optimizer = _in_optimizer_rows(rounds)
  if in_optimizer:
    print('\nWhole update step with the new / the old randomized_svd inside')
    print(common.table(in_optimizer))
  losses = _loss_rows(keys)
  print(f'\nShare of {keys} keys that lose the last direction (64 x 48, exact rank)')
  print(common.table(losses))
  recursion = _recursion_rows(seeds)
  print('\nSecond-moment recursion, 64 x 48, rank 4, b2 = 0.999, 3000 steps')
  print(common.table(recursion))
  if not args.quick:
    print('wrote', common.save(
        'randomized_svd_cost', standalone, in_optimizer=in_optimizer,
        directions_lost=losses, recursion=recursion, rounds=rounds, keys=keys,
    ))


if __name__ == '__main__':
  sys.exit(main())
