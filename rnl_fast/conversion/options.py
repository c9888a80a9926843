"""The options every conversion method takes besides its recipe: the initial membrane
(``v_init``) and per-channel thresholds (``channel_wise``), and :class:`MethodVariant`, a method
with its options under one label (``"robustnorm+cw+half"``) for tables and results.json.

- ``v_init``: each neuron layer starts (and restarts at every new input) with the membrane
  ``v_init·θ``, θ its threshold (per channel when θ is). ``"half"`` is 0.5, the start at θ/2
  that removes the rounding-down bias of soft-reset IF neurons in the first steps (Bu et al.,
  AAAI 2022, "optimized potential initialization"); 0 is the paper's start.
- ``channel_wise``: one threshold (and spike weight) per output channel instead of one per layer
  (Kim et al. 2020; SpikingJelly's ``channel_wise=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The one string ``v_init`` accepts, and the fraction of θ it stands for.
HALF = "half"
_HALF_FRACTION = 0.5


def initial_fraction(v_init: object) -> float:
    """``v_init`` as the fraction of the threshold the membrane starts at, in [0, 1).

    Accepts a real number in [0, 1) (int 0 included) or ``"half"`` (0.5). Anything else (a bool,
    NaN, a number outside [0, 1), another string) raises a one-line ValueError naming ``v_init``.
    A start at θ or above would fire every neuron at step 1 whatever its input.
    """
    if isinstance(v_init, str):
        if v_init.strip().lower() == HALF:
            return _HALF_FRACTION
        raise ValueError(f"v_init must be a fraction of the threshold in [0, 1) or 'half', got the string {v_init!r}")
    if isinstance(v_init, bool) or not isinstance(v_init, (int, float)):
        raise ValueError(
            f"v_init must be a fraction of the threshold in [0, 1) or 'half', got {type(v_init).__name__} {v_init!r}"
        )
    if not (math.isfinite(v_init) and 0.0 <= v_init < 1.0):
        raise ValueError(f"v_init must be a fraction of the threshold in [0, 1) or 'half', got {v_init!r}")
    return float(v_init)


def check_channel_wise(channel_wise: object) -> bool:
    """``channel_wise`` itself, if it is a bool (a ValueError naming it otherwise)."""
    if not isinstance(channel_wise, bool):
        raise ValueError(f"channel_wise must be True or False, got {type(channel_wise).__name__} {channel_wise!r}")
    return channel_wise


@dataclass(frozen=True)
class MethodVariant:
    """A conversion method with its options, as :func:`rnl_fast.convert` takes them.

    ``label`` names it in tables, figures and results.json: the method's name for its default
    settings (``"maxnorm"``: per layer, membrane from 0; ``"qcfs"``: from θ/2), then ``+cw`` for
    channel-wise thresholds and ``+half`` (or ``+v0.25``, ``+v0``) for an initial membrane other
    than the method's default: ``"robustnorm+cw+half"``.
    """

    method: str
    #: Fraction of θ the membrane starts at ("half" is normalised to 0.5; None: the method's default).
    v_init: float | str | None = None
    channel_wise: bool = False

    def __post_init__(self) -> None:
        from .registry import default_v_init  # the registry imports this module

        default = initial_fraction(default_v_init(self.method))  # also rejects an unknown method
        object.__setattr__(self, "v_init", default if self.v_init is None else initial_fraction(self.v_init))
        object.__setattr__(self, "_default_v_init", default)
        check_channel_wise(self.channel_wise)

    @property
    def label(self) -> str:
        label = self.method
        if self.channel_wise:
            label += "+cw"
        if self.v_init != self._default_v_init:
            label += "+" + HALF if self.v_init == _HALF_FRACTION else f"+v{self.v_init:g}"
        return label

    @property
    def uses_defaults(self) -> bool:
        """Whether this is the method with its default settings: per layer, its default membrane
        (0 for the paper's methods, the way the paper converts)."""
        return self.v_init == self._default_v_init and not self.channel_wise
