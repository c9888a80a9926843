"""Results of a conversion study as the paper shows them.

- :mod:`.results`: :class:`MethodResult` (what one method measured) and ``results.json``;
- :mod:`.table`: the paper's Table 2 as text and the verdict in plain words;
- :mod:`.figures`: accuracy against T, the K curves per layer, power per step.
"""

from .figures import log_binned, plot_accuracy, plot_k_curves, plot_power
from .results import PAPER_METHODS, TARGET_MARGIN, MethodResult, write_results
from .table import TABLE_STEPS, paper_table, unfit_anns, verdict

__all__ = [
    "TABLE_STEPS",
    "PAPER_METHODS",
    "TARGET_MARGIN",
    "MethodResult",
    "log_binned",
    "paper_table",
    "plot_accuracy",
    "plot_k_curves",
    "plot_power",
    "unfit_anns",
    "verdict",
    "write_results",
]
