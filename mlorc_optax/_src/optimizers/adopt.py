"""MLorc-ADOPT: `optax.contrib.adopt` with low-rank moments (and an atan2 option)."""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mlorc_optax._src import matrix_view as mv
from mlorc_optax._src import validation
from mlorc_optax._src.optimizers.alias import STATIC_ARGS
from mlorc_optax._src.optimizers.transform import residual_weights
from mlorc_optax._src.compress_moments import compress_moments

# Under `optax.inject_hyperparams` a callable argument is taken for a schedule,
# and `clip_value_fn` has a callable default: list it as static, as in
# `inject_hyperparams(mlorc.adopt, static_args=mlorc.ADOPT_STATIC_ARGS)`.
ADOPT_STATIC_ARGS = STATIC_ARGS + ('clip_value_fn',)

# atan2(x, |x|) = pi / 4: with this scale a normalised gradient of one
# standard deviation gives 1, as g / sqrt(v) does.
_ATAN2_SCALE = 4 / math.pi


def _default_clip_value(count: jax.Array) -> jax.Array:
  return count**0.25


def _scale_by_adopt_atan2(
    b1, b2, mu_dtype, nesterov, use_clipping, clip_value_fn
) -> optax.GradientTransformation:
  """`optax.contrib.scale_by_adopt` with atan2(g, sqrt(v)) for g / max(sqrt(v), eps)."""

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    # Step 1 only sets nu = g^2 and leaves mu at zero, as optax's ADOPT does.
    b2_ = jnp.where(state.count > 0, b2, 0)
    b1_ = jnp.where(state.count > 0, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2_, 2)

    def normalise(g, v):
      n = jnp.arctan2(g, jnp.sqrt(v))
      if use_clipping:
        bound = clip_value_fn(state.count)
        n = jnp.clip(n, -bound, bound)
      return n

    n = jax.tree.map(normalise, updates, state.nu)
    mu = optax.tree.update_moment(n, state.mu, b1_, 1)
    direction = optax.tree.update_moment(n, mu, b1_, 1) if nesterov else mu
    updates = jax.tree.map(lambda m: _ATAN2_SCALE * m, direction)
    return updates, optax.ScaleByAdamState(
        count=optax.safe_increment(state.count), mu=optax.tree.cast(mu, mu_dtype), nu=nu
    )

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adopt(
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], jax.Array] = _default_clip_value,
    atan2: bool = False,
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
  r"""ADOPT's rescaling with both moments stored as rank-`rank` factors (MLorc-ADOPT).

  With t counting from 1 and M~, V~ the reconstructed moments (negative
  entries of V~ replaced by the mean magnitude of the negative entries),
  step 1 only sets :math:`v_1 = g_1^2` (its update is zero); every later
  step computes

  .. math::
    n_t = \mathrm{clip}\big(g_t / \max(\sqrt{\tilde V}, \epsilon), c_t\big),\quad
    m_t = b_1 \tilde M + (1 - b_1) n_t,\quad
    u_t = m_t,\quad
    v_t = b_2 \tilde V + (1 - b_2) g_t^2,

  where the clip to :math:`[-c_t, c_t]`, :math:`c_t` = ``clip_value_fn(t - 1)``,
  applies only with `use_clipping`, and v is updated after its use. Then m_t
  and v_t are compressed by `randomized_svd`. With `atan2`,
  :math:`n_t = \mathrm{atan2}(g_t, \sqrt{\tilde V})` (bounded, no eps; still
  clipped with `use_clipping`, which the reference code does not do) and
  :math:`u_t = \tfrac{4}{\pi} m_t`. Parameters that are not compressed (see
  `compress`) keep full moments, and at rank >= min(m, n) the trajectory
  equals `optax.contrib.scale_by_adopt`'s.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> tx = optax.chain(mlorc.scale_by_adopt(rank=4), optax.scale(-1e-3))
    >>> params = {'w': jnp.ones((256, 128))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)
    >>> state[0].inner_state.nu['w'].u.shape
    (256, 4)

  Args:
    b1: decay rate of the first moment (of the normalised gradients).
    b2: decay rate of the second moment (of the squared gradients).
    eps: lower bound of the denominator :math:`\sqrt{\tilde V}` (not used
      with `atan2`).
    mu_dtype: optional dtype of the first moment where it is kept in full,
      and of its reconstruction; None keeps the parameters' dtype.
    nesterov: use Nesterov momentum, as `optax.contrib.scale_by_adopt` does.
    use_clipping: clip the normalised gradient to ``clip_value_fn(t - 1)``.
    clip_value_fn: the clipping bound as a function of the step index
      (default :math:`x^{1/4}`).
    atan2: normalise the gradient with atan2 instead of a division (the
      Adam-atan2 variant), which needs no eps.
    rank: rank of the stored moments; a matrix with min(m, n) <= rank is
      stored exactly.
    compress: which parameters to compress and how to view them as
      matrices: None for `default_view`, or a tree (or a callable returning
      one) of `MatrixView` / True / False entries, see `resolve_views`.
    min_dim_size: the default policy compresses a parameter whose last two
      axes both have at least this many entries; None for the library default
      (`matrix_view.DEFAULT_MIN_DIM_SIZE`, 64).
    oversample: extra test vectors of the randomized SVD; None for 0.
    power_iters: power iterations of the randomized SVD; None for 1.
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices, one per parameter and step.
    warm_start: start each step's sketch from the previous step's right
      factor (see `randomized_svd`).
    residual_correction: the fraction c >= 0 of the first moment's
      compression residual R's future contribution applied to this step's
      update: the update uses m_t + c b1 / (1 - b1) R (the stored factors are
      unchanged); see `mlorc.scale_by_adam`. None or 0: the paper's MLorc.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `CompressedMomentsState` around optax's `ScaleByAdamState`.

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025

    Halko, Martinsson and Tropp, `Finding Structure with Randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review, 2011

    Taniguchi et al., `ADOPT: Modified Adam Can Converge with Any beta2 with
    the Optimal Rate <https://arxiv.org/abs/2411.02853>`_, NeurIPS 2024

    Everett et al., `Scaling Exponents Across Parameterizations and
    Optimizers <https://arxiv.org/abs/2407.05872>`_, 2024
  """
  validation.check_in_unit_interval('b1', b1)
  validation.check_in_unit_interval('b2', b2)
  validation.check_non_negative('eps', eps)
  if not callable(clip_value_fn):
    raise TypeError(
        f'`clip_value_fn` must be a function of the step count, got '
        f'{clip_value_fn!r}. Under `optax.inject_hyperparams`, pass '
        'static_args=mlorc.ADOPT_STATIC_ARGS so it is not taken for a schedule.'
    )
  if mu_dtype is not None:
    mu_dtype = validation.canonical_float_dtype('mu_dtype', mu_dtype)
  if atan2:
    inner = _scale_by_adopt_atan2(b1, b2, mu_dtype, nesterov, use_clipping, clip_value_fn)
  else:
    inner = optax.contrib.scale_by_adopt(
        b1, b2, eps, mu_dtype, nesterov=nesterov, use_clipping=use_clipping,
        clip_value_fn=clip_value_fn,
    )
  return compress_moments(
      inner,
      rank,
      nonnegative=('nu',),
      compress=compress,
      min_dim_size=min_dim_size,
      oversample=oversample,
      power_iters=power_iters,
      factor_dtype=factor_dtype,
      seed=seed,
      warm_start=warm_start,
      residual_correction=residual_weights(residual_correction, b1),
  )


def adopt(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], jax.Array] = _default_clip_value,
    atan2: bool = False,
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
  r"""MLorc-ADOPT: `optax.contrib.adopt` with both moments stored as rank-`rank` factors.

  The update is `scale_by_adopt`'s, scaled by -learning_rate. Under
  `optax.inject_hyperparams`, use ``static_args=mlorc.ADOPT_STATIC_ARGS``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import mlorc_optax as mlorc
    >>> params = {'w': jnp.ones((256, 128)), 'b': jnp.ones(128)}
    >>> tx = mlorc.adopt(1e-3, rank=4)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)  # step 1 sets v only
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> state[0].inner_state.mu['w'].s.shape, state[0].inner_state.mu['b'].shape
    ((4,), (128,))

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: lower bound of the denominator (not used with `atan2`).
    mu_dtype: optional dtype of the first moment; see `scale_by_adopt`.
    nesterov: use Nesterov momentum.
    use_clipping: clip the normalised gradient (recommended from scratch).
    clip_value_fn: the clipping bound as a function of the step index.
    atan2: use the bounded atan2 normalisation; see `scale_by_adopt`.
    rank: rank of the stored moments.
    compress: which parameters to compress, and how; see `compress_moments`.
    min_dim_size: smallest matrix side the default policy compresses; None
      for the library default (64).
    oversample: extra test vectors of the randomized SVD; None for 0.
    power_iters: power iterations of the randomized SVD; None for 1.
    factor_dtype: dtype (or its name) of the stored factors.
    seed: seed of the random test matrices.
    warm_start: start each sketch from the previous step's right factor.
    residual_correction: apply now this fraction of the future contribution
      of what compressing the first moment discards; see `scale_by_adopt`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Shen et al., `MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation <https://arxiv.org/abs/2506.01897>`_, 2025

    Halko, Martinsson and Tropp, `Finding Structure with Randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review, 2011

    Taniguchi et al., `ADOPT: Modified Adam Can Converge with Any beta2 with
    the Optimal Rate <https://arxiv.org/abs/2411.02853>`_, NeurIPS 2024
  """
  return optax.chain(
      scale_by_adopt(
          b1, b2, eps, mu_dtype, nesterov=nesterov, use_clipping=use_clipping,
          clip_value_fn=clip_value_fn, atan2=atan2, rank=rank, compress=compress,
          min_dim_size=min_dim_size, oversample=oversample,
          power_iters=power_iters, factor_dtype=factor_dtype, seed=seed,
          warm_start=warm_start, residual_correction=residual_correction,
      ),
      optax.scale_by_learning_rate(learning_rate),
  )
