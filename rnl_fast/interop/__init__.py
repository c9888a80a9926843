"""Exchange with other SNN toolchains.

- :mod:`.nir`: :func:`to_nir` (a converted :class:`~rnl_fast.SpikingNetwork` → a NIR graph) and
  :func:`from_nir` (a NIR graph or file → a :class:`~rnl_fast.SpikingNetwork`). It needs the
  optional ``nir`` package (``pip install 'rnl_fast[nir]'``), imported only when one of the two is
  first used, so that ``import rnl_fast`` never imports it.
- :mod:`.spikingjelly`: :func:`from_spikingjelly` (a SpikingJelly model → the same model on our IF
  kernels). It needs SpikingJelly 2.0, imported when it is called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["from_nir", "from_spikingjelly", "to_nir"]


def __getattr__(name: str) -> Any:
    if name == "from_spikingjelly":
        from .spikingjelly import from_spikingjelly

        return from_spikingjelly
    if name in __all__:
        from . import nir

        return getattr(nir, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
