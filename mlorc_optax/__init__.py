"""mlorc_optax: MLorc (momentum low-rank compression) optimizers for optax."""

from mlorc_optax._src.alias import STATIC_ARGS, adam, adamw, lion
from mlorc_optax._src.compress_moments import CompressedMomentsState, compress_moments
from mlorc_optax._src.flax_adapter import nnx_views
from mlorc_optax._src.matrix_view import MatrixView, default_view, resolve_views
from mlorc_optax._src.mofasgd import ScaleByMoFaSGDState, mofasgd, scale_by_mofasgd
from mlorc_optax._src.randomized_svd import LowRankFactors, randomized_svd, reconstruct
from mlorc_optax._src.repair import repair_nonnegative
from mlorc_optax._src.summary import ParameterSummary, Summary, summarize
from mlorc_optax._src.transform import scale_by_adam, scale_by_lion

__version__ = '0.1.0'

__all__ = (
    'STATIC_ARGS',
    'CompressedMomentsState',
    'LowRankFactors',
    'MatrixView',
    'ParameterSummary',
    'ScaleByMoFaSGDState',
    'Summary',
    'adam',
    'adamw',
    'compress_moments',
    'default_view',
    'lion',
    'mofasgd',
    'nnx_views',
    'randomized_svd',
    'reconstruct',
    'repair_nonnegative',
    'resolve_views',
    'scale_by_adam',
    'scale_by_lion',
    'scale_by_mofasgd',
    'summarize',
)
