"""mlorc_optax: MLorc (momentum low-rank compression) optimizers for optax."""

from mlorc_optax._src.optimizers.adopt import ADOPT_STATIC_ARGS, adopt, scale_by_adopt
from mlorc_optax._src.optimizers.alias import STATIC_ARGS, adam, adamw, lion
from mlorc_optax._src.optimizers.came import came, scale_by_came
from mlorc_optax._src.options.cautious import CautiousWeightDecayState, add_cautious_weight_decay, cautious
from mlorc_optax._src.compress_moments import CompressedMomentsState, compress_moments
from mlorc_optax._src.optimizers.dadapt_lion import (
    DADAPT_LION_STATIC_ARGS, DAdaptLionGlobalState, dadapt_lion, scale_by_dadapt_lion,
)
from mlorc_optax._src.flax_adapter import nnx_views
from mlorc_optax._src.options.grams import grams
from mlorc_optax._src.leafwise import LeafwiseState, LeafwiseTransformation, full_state_transformation
from mlorc_optax._src.matrix_view import MatrixView, default_view, resolve_views
from mlorc_optax._src.optimizers.mofasgd import ScaleByMoFaSGDState, mofasgd, scale_by_mofasgd
from mlorc_optax._src.options.orthograd import orthograd
from mlorc_optax._src.optimizers.prodigy import PRODIGY_STATIC_ARGS, ProdigyGlobalState, prodigy, scale_by_prodigy
from mlorc_optax._src.randomized_svd import LowRankFactors, randomized_svd, reconstruct
from mlorc_optax._src.repair import repair_nonnegative
from mlorc_optax._src.options.stochastic_rounding import apply_updates_stochastic
from mlorc_optax._src.summary import ParameterSummary, Summary, summarize
from mlorc_optax._src.optimizers.transform import scale_by_adam, scale_by_lion

__version__ = '0.1.0'

__all__ = (
    'ADOPT_STATIC_ARGS',
    'DADAPT_LION_STATIC_ARGS',
    'PRODIGY_STATIC_ARGS',
    'STATIC_ARGS',
    'CautiousWeightDecayState',
    'CompressedMomentsState',
    'DAdaptLionGlobalState',
    'LeafwiseState',
    'LeafwiseTransformation',
    'LowRankFactors',
    'MatrixView',
    'ParameterSummary',
    'ProdigyGlobalState',
    'ScaleByMoFaSGDState',
    'Summary',
    'adam',
    'adamw',
    'add_cautious_weight_decay',
    'adopt',
    'apply_updates_stochastic',
    'came',
    'cautious',
    'compress_moments',
    'dadapt_lion',
    'default_view',
    'full_state_transformation',
    'grams',
    'lion',
    'mofasgd',
    'nnx_views',
    'orthograd',
    'prodigy',
    'randomized_svd',
    'reconstruct',
    'repair_nonnegative',
    'resolve_views',
    'scale_by_adam',
    'scale_by_adopt',
    'scale_by_came',
    'scale_by_dadapt_lion',
    'scale_by_lion',
    'scale_by_mofasgd',
    'scale_by_prodigy',
    'summarize',
)
