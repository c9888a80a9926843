"""ANN → SNN conversion (paper §2.1–2.2, Theorem 1) and the classic baselines.

- :mod:`.converter`: :func:`convert`, the one entry point;
- :mod:`.graph`: tracing, the checks of what can run on spikes, BatchNorm folding;
- :mod:`.recipe`: what a method is (:class:`Recipe`); :mod:`.registry`: the methods by name;
- :mod:`.options`: what every method takes besides its recipe (``v_init``, ``channel_wise``) and
  :class:`MethodVariant`, a method with its options under one label;
- one module per method family: :mod:`.rate_norm` (RNL, RNL+RIL, RNL with quantized rates),
  :mod:`.threshold_balancing` (MaxNorm, RobustNorm), :mod:`.qcfs` (QCFS).
"""

from .converter import convert
from .graph import check_convertible, fold_all_batchnorms, fold_batchnorm, trace
from .options import MethodVariant, check_channel_wise, initial_fraction
from .qcfs import QCFSRecipe
from .rate_norm import RateNormRecipe
from .recipe import ConversionError, NeuronLayerSpec, Recipe
from .registry import METHODS, RECIPES, recipe_for
from .threshold_balancing import (
    ROBUST_PERCENTILE,
    LayerScale,
    ThresholdBalancing,
    activation_scales,
    calibrate_scales,
    fold_spike_weight,
)

__all__ = [
    "METHODS",
    "RECIPES",
    "ROBUST_PERCENTILE",
    "ConversionError",
    "LayerScale",
    "MethodVariant",
    "NeuronLayerSpec",
    "QCFSRecipe",
    "RateNormRecipe",
    "Recipe",
    "ThresholdBalancing",
    "activation_scales",
    "calibrate_scales",
    "check_channel_wise",
    "check_convertible",
    "convert",
    "fold_all_batchnorms",
    "fold_batchnorm",
    "fold_spike_weight",
    "initial_fraction",
    "recipe_for",
    "trace",
]
