"""The conversion methods by name: one :class:`~.recipe.Recipe` each."""

from __future__ import annotations

from torch import nn

from .options import HALF
from .qcfs import QCFSRecipe
from .rate_norm import RateNormRecipe
from .recipe import Recipe
from .threshold_balancing import ThresholdBalancing

#: Every method :func:`rnl_fast.convert` knows, by name.
RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        ThresholdBalancing("maxnorm"),
        ThresholdBalancing("robustnorm"),
        RateNormRecipe("rnl"),
        RateNormRecipe("rnl_ril"),
        QCFSRecipe(),
        RateNormRecipe("rnl_qcfs", default_v_init=HALF),
    )
}
#: Their names, in the order tables show them.
METHODS = tuple(RECIPES)


def recipe_for(method: str) -> Recipe:
    """The recipe of ``method``; a ValueError lists the methods when it is unknown."""
    if method not in RECIPES:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return RECIPES[method]


def default_v_init(method: str) -> float | str:
    """The initial membrane ``method`` uses unless told otherwise (:attr:`Recipe.default_v_init`)."""
    return recipe_for(method).default_v_init


def methods_by_activation() -> dict[type[nn.Module], list[str]]:
    """Each activation type some method converts → the names of those methods."""
    by_activation: dict[type[nn.Module], list[str]] = {}
    for name, recipe in RECIPES.items():
        by_activation.setdefault(recipe.activation, []).append(name)
    return by_activation
