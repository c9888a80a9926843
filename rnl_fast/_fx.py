"""torch.fx tracing of the package's networks, safe beside other threads.

While torch.fx traces it patches ``nn.Module.__call__`` and ``__getattr__`` process-wide: a leaf
module (a Conv2d) called by another thread on real tensors would be recorded into the graph being
traced and hand that thread a Proxy, and two overlapping tracers restore each other's patches
(leaving ``nn.Module`` patched for good). :func:`trace_graph` serialises tracing (:data:`TRACE_LOCK`)
and lets every other thread's module calls and attribute reads run untouched, so inference need
not take the lock. Conversion (:mod:`rnl_fast.conversion.graph`) and training (the readout layers
of :mod:`rnl_fast.train`) both trace through it.
"""

from __future__ import annotations

import threading

from torch import fx, nn

from .nn import QCFS, RateNorm

#: Serialises every trace of :func:`trace_graph` across threads (see the module docstring).
TRACE_LOCK = threading.Lock()


class LeafTracer(fx.Tracer):
    """torch.fx's tracer keeping Rate Norm and QCFS layers as single (leaf) nodes, leaving module
    calls made by other threads alone. No math functions are auto-wrapped (fx would patch other
    modules' globals as they are called, from any thread): the networks here call none."""

    def __init__(self) -> None:
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self._thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (RateNorm, QCFS)) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def trace_graph(model: nn.Module) -> tuple[nn.Module, fx.Graph]:
    """``(root, graph)`` of ``model`` traced by :class:`LeafTracer`, one trace at a time; fx's own
    exceptions propagate (callers word them for their users)."""
    with TRACE_LOCK:
        tracer = LeafTracer()
        graph = tracer.trace(model)
    return tracer.root, graph
