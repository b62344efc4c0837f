"""mlorc_optax: MLorc (momentum low-rank compression) optimizers for optax."""

from mlorc_optax._src.alias import STATIC_ARGS, adam, adamw, lion
from mlorc_optax._src.came import came, scale_by_came
from mlorc_optax._src.compress_moments import CompressedMomentsState, compress_moments
from mlorc_optax._src.dadapt_lion import (
    DADAPT_LION_STATIC_ARGS, DAdaptLionGlobalState, dadapt_lion, scale_by_dadapt_lion,
)
from mlorc_optax._src.flax_adapter import nnx_views
from mlorc_optax._src.matrix_view import MatrixView, default_view, resolve_views
from mlorc_optax._src.mofasgd import ScaleByMoFaSGDState, mofasgd, scale_by_mofasgd
from mlorc_optax._src.prodigy import ProdigyGlobalState, prodigy, scale_by_prodigy
from mlorc_optax._src.randomized_svd import LowRankFactors, randomized_svd, reconstruct
from mlorc_optax._src.repair import repair_nonnegative
from mlorc_optax._src.summary import ParameterSummary, Summary, summarize
from mlorc_optax._src.transform import scale_by_adam, scale_by_lion

__version__ = '0.1.0'

__all__ = (
    'DADAPT_LION_STATIC_ARGS',
    'STATIC_ARGS',
    'CompressedMomentsState',
    'DAdaptLionGlobalState',
    'LowRankFactors',
    'MatrixView',
    'ParameterSummary',
    'ProdigyGlobalState',
    'ScaleByMoFaSGDState',
    'Summary',
    'adam',
    'adamw',
    'came',
    'compress_moments',
    'dadapt_lion',
    'default_view',
    'lion',
    'mofasgd',
    'nnx_views',
    'prodigy',
    'randomized_svd',
    'reconstruct',
    'repair_nonnegative',
    'resolve_views',
    'scale_by_adam',
    'scale_by_came',
    'scale_by_dadapt_lion',
    'scale_by_lion',
    'scale_by_mofasgd',
    'scale_by_prodigy',
    'summarize',
)
