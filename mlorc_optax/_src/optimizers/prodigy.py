"""Prodigy (`optax.contrib.prodigy`) one parameter at a time, and MLorc-Prodigy.

Prodigy's step size d (``estim_lr``) is global: it is estimated from sums over
all parameters of <g, w0 - w> and of |s|_1, with w0 the initial parameters and
s an exponential sum of past gradients. The update of each parameter uses the
d of this very step (in ``d * eps``), while its moments use the previous one.
Written as a `LeafwiseTransformation`, the step runs in two passes over the
parameters: a read-only pre-pass sums both statistics and `prepare` computes
the new d; the main pass then updates each parameter's moments and returns
its update, so that only one parameter's full moments exist at a time.

MLorc compresses m and v. s and w0 are parameter-shaped too but are not
compressed: w0 cannot be approximated at low rank (w0 - w would be noise),
and a rank-r s shrinks the denominator |s|_1 alone (on a two-layer MLP at
rank 4, d came out 3x larger than full-state Prodigy's). Both are kept on
every k-th entry of each matrix instead (`s_stride`, default 11 as the MLorc
reference package's ``slice_p``): numerator and denominator are then sums
over the same uniform subsample, and d stays close.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src import validation
from mlorc_optax._src.optimizers.alias import STATIC_ARGS
from mlorc_optax._src.compress_moments import compress_moments
from mlorc_optax._src.optimizers.d_adaptation import check_positive, resolve_s_stride, strided
from mlorc_optax._src.optimizers.transform import residual_weights
from mlorc_optax._src.leafwise import LeafwiseTransformation

# Under optax.inject_hyperparams, `s_stride` (an int that fixes a shape) must
# stay static too: `inject_hyperparams(mlorc.prodigy, static_args=mlorc.PRODIGY_STATIC_ARGS)`.
PRODIGY_STATIC_ARGS = STATIC_ARGS + ('s_stride',)


class ProdigyGlobalState(NamedTuple):
  """Prodigy's global state (scalars shared by all parameters).

  Attributes:
    count: number of updates so far (int32).
    estim_lr: the step size estimate d.
    numerator_weighted: the exponential sum of d-weighted <g, w0 - w>.
  """

  count: jax.Array
  estim_lr: jax.Array
  numerator_weighted: jax.Array


def _no_params(name: str) -> ValueError:
  return ValueError(
      f'{name} needs the current parameters: call `update(updates, state, params)`.'
  )


def prodigy_leafwise(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    estim_lr_coef: float = 1.0,
    weight_decay: float = 0.0,
    safeguard_warmup: bool = False,
    *,
    s_stride: int = 1,
    params0_dtype: Any | None = None,
) -> LeafwiseTransformation:
  r"""Prodigy as a `LeafwiseTransformation` (see `scale_by_prodigy`).

  Entries of each parameter: the moments ``exp_avg`` and ``exp_avg_sq``
  (non-negative), and ``grad_sum`` and ``params0`` (the initial parameters),
  kept as they are, in full or on every `s_stride`-th entry of each matrix
  (then of shape ``shape[:-2] + (ceil(m n / s_stride),)``).

  Args:
    learning_rate: as in `scale_by_prodigy`.
    betas: as in `scale_by_prodigy`.
    beta3: as in `scale_by_prodigy`.
    eps: as in `scale_by_prodigy`.
    estim_lr0: as in `scale_by_prodigy`.
    estim_lr_coef: as in `scale_by_prodigy`.
    weight_decay: as in `scale_by_prodigy`.
    safeguard_warmup: as in `scale_by_prodigy`.
    s_stride: as in `scale_by_prodigy`.
    params0_dtype: as in `scale_by_prodigy`.

  Returns:
    A `LeafwiseTransformation`.
  """
  beta1, beta2 = betas
  if beta3 is None:
    beta3 = beta2**0.5
  if params0_dtype is not None:
    params0_dtype = validation.canonical_float_dtype('params0_dtype', params0_dtype)

  def init_leaf(p):
    zeros = jnp.zeros_like(p)
    p0 = strided(p, s_stride)
    p0 = p0 if params0_dtype is None else p0.astype(params0_dtype)
    return {'exp_avg': zeros, 'exp_avg_sq': zeros, 'grad_sum': jnp.zeros_like(p0, p.dtype), 'params0': p0}

  def init_global(params):
    # As optax: the scalars in the lowest dtype of the parameters.
    dtype = optax.tree.dtype(params, 'lowest') if jax.tree.leaves(params) else jnp.float32
    return ProdigyGlobalState(
        jnp.zeros([], jnp.int32), jnp.asarray(estim_lr0, dtype), jnp.zeros([], dtype)
    )

  def step_size(glob):
    """d * lr_t * bias correction, with the d of the previous step."""
    count_inc = optax.safe_increment(glob.count)
    sched = learning_rate(glob.count) if callable(learning_rate) else learning_rate
    bc = ((1 - beta2**count_inc) ** 0.5) / (1 - beta1**count_inc)
    return jnp.asarray(glob.estim_lr * sched * bc, dtype=glob.estim_lr.dtype)

  def new_grad_sum(g, entries, glob, dlr):
    dg = glob.estim_lr * strided(g, s_stride)
    scale = glob.estim_lr if safeguard_warmup else dlr
    return beta3 * entries['grad_sum'] + scale * dg / estim_lr0

  def prepare_leaf(g, p, entries, glob):
    if p is None:
      raise _no_params('prodigy')
    diff = entries['params0'].astype(p.dtype) - strided(p, s_stride)
    grad_sum = new_grad_sum(g, entries, glob, step_size(glob))
    return optax.tree.vdot(strided(g, s_stride), diff), jnp.sum(jnp.abs(grad_sum))

  def prepare(glob, pre):
    numerator_acum, denominator = pre or (0.0, 0.0)  # () without parameters
    dlr = step_size(glob)
    numerator_weighted = beta3 * glob.numerator_weighted
    numerator_weighted += (glob.estim_lr / estim_lr0) * dlr * numerator_acum
    lr_estimate = estim_lr_coef * numerator_weighted / denominator
    estim_lr = jnp.maximum(glob.estim_lr, lr_estimate)
    # All-zero gradients so far give 0 / 0, which optax's prodigy turns into
    # a NaN step size; the authors' code skips the estimate, and so does this.
    skip = denominator == 0
    return ProdigyGlobalState(
        glob.count,
        jnp.where(skip, glob.estim_lr, estim_lr).astype(glob.estim_lr.dtype),
        jnp.where(skip, glob.numerator_weighted, numerator_weighted).astype(
            glob.numerator_weighted.dtype
        ),
    )

  def update_leaf(g, p, entries, glob, glob_mid):
    if p is None:
      raise _no_params('prodigy')
    dlr = step_size(glob)
    dg = glob.estim_lr * g
    exp_avg = beta1 * entries['exp_avg'] + (1 - beta1) * dg
    exp_avg_sq = beta2 * entries['exp_avg_sq'] + (1 - beta2) * dg * dg
    grad_sum = new_grad_sum(g, entries, glob, dlr)
    update = -weight_decay * dlr * p - dlr * exp_avg / (
        jnp.sqrt(exp_avg_sq) + glob_mid.estim_lr * eps
    )
    new_entries = {
        'exp_avg': exp_avg, 'exp_avg_sq': exp_avg_sq, 'grad_sum': grad_sum,
        'params0': entries['params0'],
    }
    return update, new_entries, ()

  def finalize(glob_mid, stats):
    del stats
    return glob_mid._replace(count=optax.safe_increment(glob_mid.count))

  return LeafwiseTransformation(
      init_leaf=init_leaf, init_global=init_global, update_leaf=update_leaf,
      finalize=finalize, moments=('exp_avg', 'exp_avg_sq'),
      nonnegative=('exp_avg_sq',), prepare_leaf=prepare_leaf, prepare=prepare,
  )


def _check(betas, beta3, eps, estim_lr0, estim_lr_coef, weight_decay):
  """Raises on a bad hyperparameter."""
  if len(betas) != 2:
    raise ValueError(f'`betas` must be a pair (beta1, beta2), got {betas!r}.')
  validation.check_in_unit_interval('betas[0]', betas[0])
  validation.check_in_unit_interval('betas[1]', betas[1])
  if beta3 is not None:
    validation.check_in_unit_interval('beta3', beta3)
  validation.check_non_negative('eps', eps)
  validation.check_non_negative('estim_lr_coef', estim_lr_coef)
  validation.check_non_negative('weight_decay', weight_decay)
  check_positive('estim_lr0', estim_lr0)


def scale_by_prodigy(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    estim_lr_coef: float = 1.0,
    weight_decay: float = 0.0,
    safeguard_warmup: bool = False,
    *,
    s_stride: int | None = None,
    params0_dtype: Any | None = None,
    rank: int = 4,
    compress: mv.CompressArg = None,
    min_dim_size: int | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
    residual_correction: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Prodigy with its moments stored as rank-`rank` factors (MLorc-Prodigy).

  With t counting from 1, d the step size estimate, :math:`\eta_t` the
  learning rate and :math:`w_0` the initial parameters, every parameter
  computes, with the previous step's d and its reconstructed moments m, v
  (negative entries of v replaced by their mean magnitude),

  .. math::
    \lambda_t = d\,\eta_t \frac{\sqrt{1 - b_2^t}}{1 - b_1^t},\quad
    m_t = b_1 m + (1 - b_1) d\,g_t,\quad
    v_t = b_2 v + (1 - b_2) d^2 g_t^2,\quad
    s_t = b_3 s + \lambda_t d\,g_t / d_0

  (with `safeguard_warmup`, :math:`s_t = b_3 s + d^2 g_t / d_0`); then, with
  sums over all parameters,

  .. math::
    r_t = b_3 r + (d / d_0) \lambda_t \textstyle\sum \langle g_t, w_0 - w\rangle,\quad
    d' = \max\big(d, c\, r_t / \textstyle\sum |s_t|_1\big),

  and each parameter's update uses the new d':

  .. math::
    u_t = -\lambda_t \Big(\frac{m_t}{\sqrt{v_t} + d' \epsilon} + \lambda_{wd} w\Big).

  m_t and v_t are then compressed by `randomized_svd`. s and :math:`w_0`,
  and the two sums, live on every `s_stride`-th entry of each matrix
  (flattened): a uniform subsample, so the ratio behind d' stays close (a
  low-rank s would shrink the denominator alone; a low-rank :math:`w_0`
  would make :math:`w_0 - w` noise). The sums are taken in a read-only
  pre-pass over the parameters, one matrix at a time; the main pass then
  updates each parameter. The update already includes the learning rate and
  the sign: apply it with `optax.apply_updates`, as `optax.contrib.prodigy`'s.

  Memory: the state of a compressed m x n matrix is 2 r (m + n + 1) factor
  entries plus 2 ceil(m n / s_stride) entries of s and :math:`w_0` (the
  latter in `params0_dtype`), against 4 m n for full-state Prodigy.
  Parameters that are not compressed (vectors, small matrices, see
  `compress`) keep full moments. With ``s_stride=1``, at rank >= min(m, n)
  or with ``compress=False``, the trajectory equals
  `optax.contrib.prodigy`'s.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.scale_by_prodigy(rank=4)
    >>> params = {'w': jnp.ones((256, 128)), 'b': jnp.zeros(128)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: learning rate scheduling parameter, a multiplier of d
      (1.0, or a schedule with maximum 1.0, is recommended).
    betas: decay rates (b1, b2) of the first and second moments.
    beta3: decay rate of the sums behind d; None for :math:`\sqrt{b_2}`.
    eps: added to the denominator, times d.
    estim_lr0: initial (under-)estimate :math:`d_0` of d.
    estim_lr_coef: the estimates of d are multiplied by this coefficient c.
    weight_decay: AdamW-style decoupled weight decay, times the step size.
    safeguard_warmup: leave the learning rate out of the sums behind d, to
      avoid overestimating d during a warm-up.
    s_stride: keep s and :math:`w_0` (and take the sums behind d) only on
      every `s_stride`-th entry of each matrix. None means 11 (the MLorc
      reference package's ``slice_p``), which keeps d close to the exact
      one; 1 keeps all, as `optax.contrib.prodigy` does, at the cost of two
      full-size arrays per parameter.
    params0_dtype: dtype (or its name) of the stored initial parameters; None
      for the parameters' own dtype (``'bfloat16'`` halves that memory for
      float32 parameters, and rounds :math:`w_0`).
    rank: rank of the stored moments.
    compress: which parameters to compress and how to view them as matrices;
      see `compress_moments`. False compresses none: full-state Prodigy.
    min_dim_size: smallest matrix side the default policy compresses; None
      for the library default (64).
    oversample: extra test vectors of the randomized SVD (None: 0).
    power_iters: power iterations of the randomized SVD (None: 1).
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices.
    warm_start: start each sketch from the previous step's right factor.
    residual_correction: the fraction c >= 0 of the first moment's
      compression residual R's future contribution applied to this step's
      update: the update uses m_t + c b1 / (1 - b1) R (the stored factors and
      the sums behind d are the uncorrected step's); see `mlorc.scale_by_adam`.

  Returns:
    An `optax.GradientTransformationExtraArgs`; apply its updates with
    `optax.apply_updates` (they include the learning rate and the sign).

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025.
    Mishchenko and Defazio, `Prodigy: An Expeditiously Adaptive Parameter-Free
    Learner <https://arxiv.org/abs/2306.06101>`_, ICML 2024.
    Halko, Martinsson and Tropp, `Finding structure with randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011.
  """
  _check(betas, beta3, eps, estim_lr0, estim_lr_coef, weight_decay)
  lw = prodigy_leafwise(
      learning_rate, betas, beta3, eps, estim_lr0, estim_lr_coef, weight_decay,
      safeguard_warmup, s_stride=resolve_s_stride(s_stride),
      params0_dtype=params0_dtype,
  )
  return compress_moments(
      lw, rank, compress=compress, min_dim_size=min_dim_size, oversample=oversample,
      power_iters=power_iters, factor_dtype=factor_dtype, seed=seed, warm_start=warm_start,
      residual_correction=residual_weights(residual_correction, betas[0], 'exp_avg'),
  )


def prodigy(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    estim_lr_coef: float = 1.0,
    weight_decay: float = 0.0,
    safeguard_warmup: bool = False,
    *,
    s_stride: int | None = None,
    params0_dtype: Any | None = None,
    rank: int = 4,
    compress: mv.CompressArg = None,
    min_dim_size: int | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    factor_dtype: Any = 'float32',
    seed: int = 0,
    warm_start: bool = False,
    residual_correction: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MLorc-Prodigy: `optax.contrib.prodigy` with rank-`rank` moments.

  The same transformation as `scale_by_prodigy` (Prodigy's learning rate
  enters its estimate of d, so the step size cannot be chained after it);
  this alias has `optax.contrib.prodigy`'s name and arguments. Pass
  ``s_stride=1`` for `optax.contrib.prodigy`'s exact estimate of d.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = mlorc.prodigy(rank=4)
    >>> params = {'w': jnp.ones((256, 128)), 'b': jnp.zeros(128)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: learning rate scheduling parameter, a multiplier of d.
    betas: decay rates (b1, b2) of the first and second moments.
    beta3: decay rate of the sums behind d; None for :math:`\sqrt{b_2}`.
    eps: added to the denominator, times d.
    estim_lr0: initial (under-)estimate of d.
    estim_lr_coef: the estimates of d are multiplied by this coefficient.
    weight_decay: AdamW-style decoupled weight decay, times the step size.
    safeguard_warmup: leave the learning rate out of the sums behind d.
    s_stride: keep s and the initial parameters only on every
      `s_stride`-th entry of each matrix (None: 11; 1: all of them, as
      `optax.contrib.prodigy`); see `scale_by_prodigy`.
    params0_dtype: dtype (or its name) of the stored initial parameters; None
      for the parameters' own dtype.
    rank: rank of the stored moments.
    compress: which parameters to compress and how to view them as matrices;
      see `compress_moments`. False compresses none: full-state Prodigy.
    min_dim_size: smallest matrix side the default policy compresses; None
      for the library default (64).
    oversample: extra test vectors of the randomized SVD (None: 0).
    power_iters: power iterations of the randomized SVD (None: 1).
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices.
    warm_start: start each sketch from the previous step's right factor.
    residual_correction: apply now this fraction of the future contribution
      of what compressing the first moment discards; see `scale_by_prodigy`.

  Returns:
    An `optax.GradientTransformationExtraArgs`; apply its updates with
    `optax.apply_updates` (they include the learning rate and the sign).

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025.
    Mishchenko and Defazio, `Prodigy: An Expeditiously Adaptive Parameter-Free
    Learner <https://arxiv.org/abs/2306.06101>`_, ICML 2024.
    Halko, Martinsson and Tropp, `Finding structure with randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011.
  """
  return scale_by_prodigy(
      learning_rate, betas, beta3, eps, estim_lr0, estim_lr_coef, weight_decay,
      safeguard_warmup, s_stride=s_stride, params0_dtype=params0_dtype, rank=rank, compress=compress,
      min_dim_size=min_dim_size, oversample=oversample, power_iters=power_iters,
      factor_dtype=factor_dtype, seed=seed, warm_start=warm_start,
      residual_correction=residual_correction,
  )
