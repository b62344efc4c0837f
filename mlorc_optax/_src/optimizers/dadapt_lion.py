"""D-Adapt Lion (Lion with a D-Adaptation step size) and MLorc-D-Adapt Lion.

optax has no D-Adapt Lion; this follows `dadaptation/dadapt_lion.py` of
Defazio and Mishchenko's D-Adaptation repository. Its step size d is global:
each parameter contributes to two sums (<c, s> and |s|_1) during its update,
and d is updated once after all parameters (the `finalize` of a
`LeafwiseTransformation`), so no pre-pass is needed.

MLorc compresses the momentum. The sum s is parameter-shaped too but is not
compressed: d is a ratio of sums over s and the signs c, and a rank-r
approximation of these sign averages shrinks both sums unevenly (on a
two-layer MLP at rank 4, d came out 4.5x smaller and grew 50 steps later).
To save its memory, s is kept on every k-th entry of each matrix instead
(`s_stride`, default 11 as the MLorc reference package's ``slice_p``): both
sums shrink by the same factor, and d stays close (within 1% there).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src import validation
from mlorc_optax._src.compress_moments import compress_moments
from mlorc_optax._src.leafwise import LeafwiseTransformation
from mlorc_optax._src.optimizers.alias import STATIC_ARGS
from mlorc_optax._src.optimizers.d_adaptation import check_positive, resolve_s_stride, strided

# Under optax.inject_hyperparams, `s_stride` (an int that fixes a shape) must
# stay static too: `inject_hyperparams(mlorc.dadapt_lion, static_args=mlorc.DADAPT_LION_STATIC_ARGS)`.
DADAPT_LION_STATIC_ARGS = STATIC_ARGS + ('s_stride',)
# The reference code sketches Lion's momentum without a power iteration.
_LION_POWER_ITERS = 0


class DAdaptLionGlobalState(NamedTuple):
  """D-Adapt Lion's global state (scalars shared by all parameters).

  Attributes:
    count: number of updates so far (int32).
    estim_lr: the step size estimate d.
    numerator_weighted: exponential average of the d-weighted sums <c, s>.
  """

  count: jax.Array
  estim_lr: jax.Array
  numerator_weighted: jax.Array


def dadapt_lion_leafwise(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.99),
    estim_lr0: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    s_stride: int = 1,
) -> LeafwiseTransformation:
  """D-Adapt Lion as a `LeafwiseTransformation` (see `scale_by_dadapt_lion`).

  Entries of each parameter: the momentum ``exp_avg`` (the one moment) and
  the exponential sum of past steps ``s``, kept in full, or on every
  `s_stride`-th entry of each matrix (then of shape ``shape[:-2] +
  (ceil(m n / s_stride),)``).

  Args:
    learning_rate: as in `scale_by_dadapt_lion`.
    betas: as in `scale_by_dadapt_lion`.
    estim_lr0: as in `scale_by_dadapt_lion`.
    weight_decay: as in `scale_by_dadapt_lion`.
    s_stride: as in `scale_by_dadapt_lion`.

  Returns:
    A `LeafwiseTransformation`.
  """
  beta1, beta2 = betas
  sqrt_beta2 = beta2**0.5

  def init_leaf(p):
    return {'exp_avg': jnp.zeros_like(p), 's': jnp.zeros_like(strided(p, s_stride))}

  def init_global(params):
    dtype = optax.tree.dtype(params, 'lowest') if jax.tree.leaves(params) else jnp.float32
    return DAdaptLionGlobalState(
        jnp.zeros([], jnp.int32), jnp.asarray(estim_lr0, dtype), jnp.zeros([], dtype)
    )

  def schedule(glob):
    return learning_rate(glob.count) if callable(learning_rate) else learning_rate

  def update_leaf(g, p, entries, glob, glob_mid):
    del glob_mid
    m, s = entries['exp_avg'], entries['s']
    dlr = jnp.asarray(glob.estim_lr * schedule(glob), glob.estim_lr.dtype)
    c = jnp.sign(beta1 * m + (1 - beta1) * g)
    update = -dlr * c
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
      if p is None:
        raise ValueError(
            'dadapt_lion with weight_decay needs the current parameters: call '
            '`update(updates, state, params)`.'
        )
      # The reference scales w by (1 - dlr wd), then subtracts dlr c.
      update = update - dlr * weight_decay * p
    new_m = (beta2 * m + (1 - beta2) * dlr * g).astype(m.dtype)
    c_s = strided(c, s_stride)
    numerator = dlr * optax.tree.vdot(c_s, s)  # with s before its update
    new_s = (sqrt_beta2 * s + (1 - sqrt_beta2) * dlr * c_s).astype(s.dtype)
    stats = (numerator, jnp.sum(jnp.abs(new_s)))
    return update.astype(g.dtype), {'exp_avg': new_m, 's': new_s}, stats

  def finalize(glob, stats):
    numerator_acum, sk_l1 = stats or (0.0, 0.0)  # () without parameters
    numerator = sqrt_beta2 * glob.numerator_weighted + (1 - sqrt_beta2) * numerator_acum
    d_hat = numerator / ((1 - sqrt_beta2) * sk_l1)
    # The reference changes nothing while s is zero (no progress yet), and
    # keeps d while the learning rate is zero.
    moved = sk_l1 > 0
    grow = moved & (schedule(glob) > 0)
    estim_lr = jnp.where(grow, jnp.maximum(glob.estim_lr, d_hat), glob.estim_lr)
    numerator = jnp.where(moved, numerator, glob.numerator_weighted)
    return DAdaptLionGlobalState(
        optax.safe_increment(glob.count),
        estim_lr.astype(glob.estim_lr.dtype),
        numerator.astype(glob.numerator_weighted.dtype),
    )

  return LeafwiseTransformation(
      init_leaf=init_leaf, init_global=init_global, update_leaf=update_leaf,
      finalize=finalize, moments=('exp_avg',),
  )


def _check(betas, estim_lr0, weight_decay, s_stride):
  if len(betas) != 2:
    raise ValueError(f'`betas` must be a pair (beta1, beta2), got {betas!r}.')
  validation.check_in_unit_interval('betas[0]', betas[0])
  validation.check_in_unit_interval('betas[1]', betas[1])
  check_positive('estim_lr0', estim_lr0)
  validation.check_non_negative('weight_decay', weight_decay)
  return resolve_s_stride(s_stride)


def scale_by_dadapt_lion(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.99),
    estim_lr0: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    s_stride: int | None = None,
    rank: int = 4,
    compress: mv.CompressArg = None,
    min_dim_size: int | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""D-Adapt Lion (Lion with an estimated step size d) with rank-`rank` state.

  With :math:`\eta_t` the learning rate, d the current estimate and m, s the
  reconstructed state of a parameter w, every parameter computes

  .. math::
    \lambda = d\,\eta_t,\quad
    c = \mathrm{sign}(b_1 m + (1 - b_1) g_t),\quad
    u_t = -\lambda c - \lambda\,\lambda_{wd} w,\quad
    m \leftarrow b_2 m + (1 - b_2) \lambda g_t,

  and, with :math:`\beta = \sqrt{b_2}`, the statistics of d

  .. math::
    N_t = \textstyle\sum \lambda \langle c, s\rangle,\quad
    s \leftarrow \beta s + (1 - \beta) \lambda c,\quad
    S_t = \textstyle\sum |s|_1

  (sums over all parameters, s before its update in :math:`N_t`); m is then
  compressed by `randomized_svd`, and s kept on every `s_stride`-th entry of
  each matrix (flattened), a uniform subsample of both sums. After all
  parameters, :math:`r \leftarrow \beta r + (1 - \beta) N_t` and
  :math:`d \leftarrow \max(d, r / ((1 - \beta) S_t))`; nothing changes while
  :math:`S_t = 0`, and d stays while :math:`\eta_t = 0`. The update already
  includes the learning rate and the sign: apply it with
  `optax.apply_updates`.

  optax has no D-Adapt Lion: with ``compress=False, s_stride=1`` this is
  the full-state algorithm of the D-Adaptation repository's
  ``dadapt_lion.py``; at rank >= min(m, n) (and ``s_stride=1``) the
  trajectory equals it too. Parameters that are not compressed (vectors,
  small matrices) keep a full momentum.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.scale_by_dadapt_lion(rank=4)
    >>> params = {'w': jnp.ones((256, 128)), 'b': jnp.zeros(128)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: learning rate scheduling parameter, a multiplier of d
      (leave it at 1.0 unless training is unstable).
    betas: (b1, b2): b1 interpolates the momentum and the gradient in the
      sign, b2 is the decay rate of the momentum (:math:`\sqrt{b_2}` that of s).
    estim_lr0: initial (under-)estimate of d.
    weight_decay: decoupled weight decay, times the step size :math:`d \eta_t`.
    s_stride: keep s, the exponential sum of past steps behind d, only on
      every `s_stride`-th entry of each matrix (flattened): the state of a
      compressed m x n matrix is r (m + n + 1) + ceil(m n / s_stride)
      entries. None means 11 (the MLorc reference package's ``slice_p``),
      which keeps d close to the exact one; 1 keeps all of s, as the
      D-Adaptation algorithm does, at the cost of a full-size array per
      parameter.
    rank: rank of the stored state.
    compress: which parameters to compress and how to view them as matrices;
      see `compress_moments`. False compresses none: full-state D-Adapt Lion.
    min_dim_size: smallest matrix side the default policy compresses; None
      for the library default (64).
    oversample: extra test vectors of the randomized SVD (None: 0).
    power_iters: power iterations of the randomized SVD (None: 0, as the
      MLorc reference code does for Lion).
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices.
    warm_start: start each sketch from the previous step's right factor.

  Returns:
    An `optax.GradientTransformationExtraArgs`; apply its updates with
    `optax.apply_updates` (they include the learning rate and the sign).

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025.
    Defazio and Mishchenko, `Learning-Rate-Free Learning by D-Adaptation
    <https://arxiv.org/abs/2301.07733>`_, ICML 2023 (and
    https://github.com/facebookresearch/dadaptation, ``dadapt_lion.py``).
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, NeurIPS 2023.
    Halko, Martinsson and Tropp, `Finding structure with randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011.
  """
  s_stride = _check(betas, estim_lr0, weight_decay, s_stride)
  lw = dadapt_lion_leafwise(learning_rate, betas, estim_lr0, weight_decay, s_stride=s_stride)
  return compress_moments(
      lw, rank, compress=compress, min_dim_size=min_dim_size, oversample=oversample,
      power_iters=_LION_POWER_ITERS if power_iters is None else power_iters,
      factor_dtype=factor_dtype, seed=seed, warm_start=warm_start,
  )


def dadapt_lion(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.99),
    estim_lr0: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    s_stride: int | None = None,
    rank: int = 4,
    compress: mv.CompressArg = None,
    min_dim_size: int | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""MLorc-D-Adapt Lion: D-Adaptation's Lion with rank-`rank` state.

  The same transformation as `scale_by_dadapt_lion` (the learning rate enters
  the estimate of d, so the step size cannot be chained after it), under the
  name of the D-Adaptation repository's optimizer, with the arguments and
  defaults of `optax.contrib.dadapt_adamw`'s family.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.dadapt_lion(rank=4)
    >>> params = {'w': jnp.ones((256, 128)), 'b': jnp.zeros(128)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: learning rate scheduling parameter, a multiplier of d.
    betas: (b1, b2) as in `scale_by_dadapt_lion`.
    estim_lr0: initial (under-)estimate of d.
    weight_decay: decoupled weight decay, times the step size.
    s_stride: keep s on every `s_stride`-th entry of each matrix only (None:
      11; 1: all of it, the D-Adaptation algorithm); see
      `scale_by_dadapt_lion`.
    rank: rank of the stored state.
    compress: which parameters to compress and how to view them as matrices;
      see `compress_moments`. False compresses none: full-state D-Adapt Lion.
    min_dim_size: smallest matrix side the default policy compresses; None
      for the library default (64).
    oversample: extra test vectors of the randomized SVD (None: 0).
    power_iters: power iterations of the randomized SVD (None: 0).
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices.
    warm_start: start each sketch from the previous step's right factor.

  Returns:
    An `optax.GradientTransformationExtraArgs`; apply its updates with
    `optax.apply_updates` (they include the learning rate and the sign).

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025.
    Defazio and Mishchenko, `Learning-Rate-Free Learning by D-Adaptation
    <https://arxiv.org/abs/2301.07733>`_, ICML 2023.
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, NeurIPS 2023.
    Halko, Martinsson and Tropp, `Finding structure with randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011.
  """
  return scale_by_dadapt_lion(
      learning_rate, betas, estim_lr0, weight_decay, s_stride=s_stride,
      rank=rank, compress=compress, min_dim_size=min_dim_size, oversample=oversample,
      power_iters=power_iters, factor_dtype=factor_dtype, seed=seed, warm_start=warm_start,
  )
