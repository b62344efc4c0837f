"""CAME (Confidence-guided Adaptive Memory Efficient optimization) and MLorc-CAME.

CAME keeps Adafactor's factored second moment (row and column averages of a
matrix's squared gradients) and a factored "instability" statistic, both
already small, plus a full first moment, the one entry MLorc compresses.
This follows the authors' PyTorch code (`came_pytorch/CAME.py`).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src import validation
from mlorc_optax._src.compress_moments import compress_moments
from mlorc_optax._src.optimizers.d_adaptation import check_positive
from mlorc_optax._src.leafwise import LeafwiseTransformation

_NAMES = ('exp_avg', 'exp_avg_sq', 'exp_avg_sq_row', 'exp_avg_sq_col', 'exp_avg_res_row', 'exp_avg_res_col')


def _placeholder(dtype) -> jax.Array:
  """Stands for an entry a parameter does not use (as optax's Adafactor does;
  one element rather than none, so that it reshapes along batch axes)."""
  return jnp.zeros((1,), dtype)


def _stat_dtype(dtype) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _rms(x: jax.Array, axes) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def _approx_inverse_sqrt(row: jax.Array, col: jax.Array) -> jax.Array:
  """1 / sqrt of the rank-1 estimate R C^T / mean(R) of a factored statistic."""
  r = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))
  return r[..., :, None] * jax.lax.rsqrt(col)[..., None, :]


def came_leafwise(
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
) -> LeafwiseTransformation:
  """CAME as a `LeafwiseTransformation` (see `scale_by_came`).

  Entries of each parameter: the first moment ``exp_avg`` (the one moment);
  for a parameter of 2 or more axes, the factored statistics
  ``exp_avg_sq_row``, ``exp_avg_sq_col``, ``exp_avg_res_row`` and
  ``exp_avg_res_col`` (shapes ``shape[:-1]`` and ``shape[:-2] + shape[-1:]``);
  for a vector or a scalar, the full second moment ``exp_avg_sq``. Unused
  entries hold a one-element placeholder, so every parameter has the same
  names. The statistics are kept in float32 at least (an EMA with b3 =
  0.9999 does not move in bfloat16), as the reference computes in float32.

  Args:
    betas: as in `scale_by_came`.
    eps: as in `scale_by_came`.
    clip_threshold: as in `scale_by_came`.

  Returns:
    A `LeafwiseTransformation`.
  """
  beta1, beta2, beta3 = betas
  eps1, eps2 = eps

  def init_leaf(p):
    dtype = _stat_dtype(p.dtype)
    none = _placeholder(dtype)
    if p.ndim < 2:
      return dict.fromkeys(_NAMES, none) | {
          'exp_avg': jnp.zeros_like(p), 'exp_avg_sq': jnp.zeros_like(p, dtype)
      }
    rows = jnp.zeros(p.shape[:-1], dtype)
    cols = jnp.zeros(p.shape[:-2] + p.shape[-1:], dtype)
    return {
        'exp_avg': jnp.zeros_like(p), 'exp_avg_sq': none,
        'exp_avg_sq_row': rows, 'exp_avg_sq_col': cols,
        'exp_avg_res_row': rows, 'exp_avg_res_col': cols,
    }

  def update_leaf(g_in, p, entries, glob, glob_mid):
    del p, glob, glob_mid
    g = g_in.astype(_stat_dtype(g_in.dtype))
    new = dict(entries)
    ema = lambda old, x, b: (b * old + (1 - b) * x).astype(old.dtype)
    factored = g.ndim >= 2
    # Leading axes are batch axes (scanned layers): clip each matrix on its own.
    axes = (-2, -1) if factored else None
    sq = jnp.square(g) + eps1
    if factored:
      new['exp_avg_sq_row'] = ema(entries['exp_avg_sq_row'], jnp.mean(sq, axis=-1), beta2)
      new['exp_avg_sq_col'] = ema(entries['exp_avg_sq_col'], jnp.mean(sq, axis=-2), beta2)
      u = _approx_inverse_sqrt(new['exp_avg_sq_row'], new['exp_avg_sq_col']) * g
    else:
      new['exp_avg_sq'] = ema(entries['exp_avg_sq'], sq, beta2)
      u = jax.lax.rsqrt(new['exp_avg_sq']) * g
    u = u / jnp.maximum(_rms(u, axes) / clip_threshold, 1.0)
    new['exp_avg'] = m = ema(entries['exp_avg'], u, beta1)
    if factored:
      # Confidence: the factored average of the instability (u - m)^2.
      res = jnp.square(u - m) + eps2
      new['exp_avg_res_row'] = ema(entries['exp_avg_res_row'], jnp.mean(res, axis=-1), beta3)
      new['exp_avg_res_col'] = ema(entries['exp_avg_res_col'], jnp.mean(res, axis=-2), beta3)
      u = _approx_inverse_sqrt(new['exp_avg_res_row'], new['exp_avg_res_col']) * m
    else:
      u = m
    return u.astype(g_in.dtype), new, ()

  return LeafwiseTransformation(
      init_leaf=init_leaf, init_global=lambda params: (), update_leaf=update_leaf,
      finalize=lambda glob, stats: (), moments=('exp_avg',),
  )


def _check(betas, eps, clip_threshold):
  if len(betas) != 3:
    raise ValueError(f'`betas` must be a triple (beta1, beta2, beta3), got {betas!r}.')
  if len(eps) != 2:
    raise ValueError(f'`eps` must be a pair (eps1, eps2), got {eps!r}.')
  for i, b in enumerate(betas):
    validation.check_in_unit_interval(f'betas[{i}]', b)
  validation.check_non_negative('eps[0]', eps[0])
  validation.check_non_negative('eps[1]', eps[1])
  check_positive('clip_threshold', clip_threshold)


def scale_by_came(
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    *,
    rank: int = 4,
    compress: mv.CompressArg = None,
    min_dim_size: int | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""CAME's rescaling with its first moment stored as rank-`rank` factors.

  For a matrix gradient g (m x n), with :math:`\bar x` the mean over a
  matrix's entries and :math:`\mathrm{row}(x)`, :math:`\mathrm{col}(x)` the
  means over its columns and rows, and M~ the reconstructed first moment:

  .. math::
    R \leftarrow b_2 R + (1 - b_2) \mathrm{row}(g^2 + \epsilon_1),\quad
    C \leftarrow b_2 C + (1 - b_2) \mathrm{col}(g^2 + \epsilon_1),\quad
    \hat g = g \big/ \sqrt{R C^T / \bar R},\quad
    \hat g \leftarrow \hat g / \max(\mathrm{RMS}(\hat g) / \tau, 1),

  .. math::
    m = b_1 \tilde M + (1 - b_1) \hat g,\quad
    \rho = (\hat g - m)^2 + \epsilon_2,\quad
    R_\rho, C_\rho \leftarrow \text{the same averages of } \rho \text{ with } b_3,\quad
    u = m \big/ \sqrt{R_\rho C_\rho^T / \bar R_\rho},

  then m is compressed by `randomized_svd`; the row and column statistics
  (m + n entries each) are kept as they are. A vector (or scalar) keeps a
  full second moment instead, :math:`v \leftarrow b_2 v + (1 - b_2)(g^2 +
  \epsilon_1)`, :math:`\hat g = g / \sqrt{v}` (clipped as above) and
  :math:`u = m`, as in the reference. A parameter with more than two axes is
  a batch of matrices over its last two axes (scanned layers), a compressed
  one over its `MatrixView`: the statistics and the clipping are per matrix,
  as if each were a parameter of its own (the reference clips with the RMS
  of the whole tensor). There is no bias correction.

  With ``compress=False`` nothing is compressed: that is full-state CAME
  (optax has none); at rank >= min(m, n) the trajectory equals it too.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = optax.chain(mlorc.scale_by_came(rank=4), optax.scale(-1e-4))
    >>> params = {'w': jnp.ones((256, 128)), 'b': jnp.ones(128)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)

  Args:
    betas: decay rates (b1, b2, b3) of the first moment, of the squared
      gradient's averages and of the instability's averages.
    eps: (eps1, eps2), added to the squared gradient and to the instability.
    clip_threshold: threshold :math:`\tau` of the RMS of the normalised
      gradient.
    rank: rank of the stored first moment.
    compress: which parameters to compress and how to view them as matrices;
      see `compress_moments`. False compresses none: full-state CAME.
    min_dim_size: smallest matrix side the default policy compresses; None
      for the library default (64).
    oversample: extra test vectors of the randomized SVD (None: 0).
    power_iters: power iterations of the randomized SVD (None: 1).
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices.
    warm_start: start each sketch from the previous step's right factor.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025.
    Luo et al., `CAME: Confidence-guided Adaptive Memory Efficient
    Optimization <https://arxiv.org/abs/2307.02047>`_, ACL 2023.
    Halko, Martinsson and Tropp, `Finding structure with randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011.
  """
  _check(betas, eps, clip_threshold)
  return compress_moments(
      came_leafwise(betas, eps, clip_threshold), rank, compress=compress,
      min_dim_size=min_dim_size, oversample=oversample, power_iters=power_iters,
      factor_dtype=factor_dtype, seed=seed, warm_start=warm_start,
  )


def came(
    learning_rate: optax.ScalarOrSchedule,
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    rank: int = 4,
    compress: mv.CompressArg = None,
    min_dim_size: int | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""MLorc-CAME: CAME with its first moment stored as rank-`rank` factors.

  The update is :math:`-\eta_t (u_t + \lambda w)`, with :math:`u_t` from
  `scale_by_came` (decoupled weight decay scaled by the learning rate, as in
  the reference). Arguments keep the names and defaults of the authors'
  PyTorch ``CAME`` (``lr`` is `learning_rate`).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.came(1e-4, rank=4)
    >>> params = {'w': jnp.ones((256, 128)), 'b': jnp.zeros(128)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: a float or an optax schedule.
    betas: decay rates (b1, b2, b3), as in `scale_by_came`.
    eps: (eps1, eps2), as in `scale_by_came`.
    clip_threshold: threshold of the RMS of the normalised gradient.
    weight_decay: decoupled weight decay, times the learning rate.
    mask: as in `optax.add_decayed_weights`: which parameters to decay.
    rank: rank of the stored first moment.
    compress: which parameters to compress and how to view them as matrices;
      see `compress_moments`. False compresses none: full-state CAME.
    min_dim_size: smallest matrix side the default policy compresses; None
      for the library default (64).
    oversample: extra test vectors of the randomized SVD (None: 0).
    power_iters: power iterations of the randomized SVD (None: 1).
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices.
    warm_start: start each sketch from the previous step's right factor.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025.
    Luo et al., `CAME: Confidence-guided Adaptive Memory Efficient
    Optimization <https://arxiv.org/abs/2307.02047>`_, ACL 2023.
    Halko, Martinsson and Tropp, `Finding structure with randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011.
  """
  validation.check_non_negative('weight_decay', weight_decay)
  return optax.chain(
      scale_by_came(
          betas, eps, clip_threshold, rank=rank, compress=compress,
          min_dim_size=min_dim_size, oversample=oversample, power_iters=power_iters,
          factor_dtype=factor_dtype, seed=seed, warm_start=warm_start,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
