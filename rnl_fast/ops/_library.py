"""How the ops are registered with torch: :func:`custom_op`, a light stand-in for
``torch.library.custom_op``.

``torch.library.custom_op`` wraps each implementation in ``torch._disable_dynamo``, which imports
the whole compiler stack (``torch._dynamo``) on the op's first call: 1.1–2 s before the first
IF step of a fresh process, for nothing on the eager path (dynamo never traces into a custom op's
implementation anyway: it sees the op as one opaque node). It also checks the outputs for aliasing
on every call. Here the same op is built from the lower-level ``torch.library`` pieces: the
schema inferred from the type hints (as custom_op does), the implementation registered for
``CompositeExplicitAutograd`` (every device; the function picks the backend), and the fake kernel
and autograd formula through ``torch.library.register_fake`` / ``register_autograd``. The
implementations return fresh tensors, never views of their inputs (opcheck tests it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: The ``rnl_fast`` operator namespace; every op of the package is defined in it.
_LIB = torch.library.Library("rnl_fast", "FRAGMENT")


class CustomOp:
    """One ``rnl_fast::<name>`` operator; calling it calls ``torch.ops.rnl_fast.<name>``."""

    def __init__(self, qualname: str, fn: Callable[..., Any]) -> None:
        namespace, name = qualname.split("::")
        if namespace != "rnl_fast":
            raise ValueError(f"rnl_fast ops live in the rnl_fast namespace, got {qualname!r}")
        self.qualname = qualname
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        self._overload = getattr(torch.ops.rnl_fast, name).default
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any) -> Any:
        return self._overload(*args)

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """The shape-and-dtype-only implementation (torch.compile, torch.export, meta tensors)."""
        torch.library.register_fake(self.qualname, fn, lib=_LIB)
        return fn

    def register_autograd(self, backward: Callable[..., Any], setup_context: Callable[..., Any]) -> None:
        """The gradient formula, as ``torch.library.register_autograd``."""
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_LIB)


def custom_op(qualname: str) -> Callable[[Callable[..., Any]], CustomOp]:
    """Decorator: ``@custom_op("rnl_fast::name")`` over an implementation with type hints, as
    ``torch.library.custom_op(qualname, mutates_args=())`` (no op here mutates its inputs)."""
    return lambda fn: CustomOp(qualname, fn)
