"""Peak live tensor bytes of a training run, for real tensors or at full size under FakeTensorMode.

A full-size SDXL training step does not fit in this machine's memory, and would take hours on two CPU
cores. Under torch's ``FakeTensorMode`` every tensor carries only its shape, dtype and storage size, so
the real trainer code runs at full size in seconds and allocates nothing. ``LiveBytes`` is a
``TorchDispatchMode`` that sees every op's outputs, registers each new storage once (views share it)
with a ``weakref.finalize`` that subtracts it when the storage dies, and keeps the peak of the sum:
the equivalent of ``torch.cuda.max_memory_allocated`` (live tensor bytes; no allocator rounding,
fragmentation, kernel workspaces or CUDA context). It counts what autograd saves for backward,
gradients, optimizer state and activations alike, because all of them are op outputs.

The same tracker runs on real tensors, which is how it is checked against the process's measured
peak (VmHWM) and torch's profiler at a small size (``memory_bench.py --validate``).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

GIB = 1024 ** 3
MIB = 1024 ** 2


class LiveBytes(TorchDispatchMode):
    """Track the bytes of every live tensor storage created by an op while active; keep the peak.

    ``track(*tensors)`` registers tensors made before the mode was entered (the frozen weights).
    ``fake_scalars``: answer ``.item()``/``bool()`` of a fake tensor with a placeholder (1 for numbers,
    True for bools) so trainer code that reads its loss or checks finiteness runs under FakeTensorMode.
    """

    def __init__(self, fake_scalars: bool = False) -> None:
        super().__init__()
        self.fake_scalars = fake_scalars
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.marks: dict[str, int] = {}

    def track(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self._register(t)

    def track_module(self, module: torch.nn.Module) -> None:
        self.track(*module.parameters(), *module.buffers())

    def reset_peak(self) -> None:
        self.peak = self.current

    def mark(self, name: str) -> None:
        """Remember the live bytes now under ``name`` (e.g. the floor right after setup)."""
        self.marks[name] = self.current

    def _register(self, t: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(t):  # its inner tensors are op outputs themselves
            inner, _ = t.__tensor_flatten__()
            for name in inner:
                self._register(getattr(t, name))
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake_scalars and func is torch.ops.aten._local_scalar_dense.default:
            from torch._subclasses.fake_tensor import FakeTensor

            if isinstance(args[0], FakeTensor):
                dtype = args[0].dtype
                return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._register(t)
        return out


@contextlib.contextmanager
def fake_mode():
    """A ``FakeTensorMode`` in which ``Module.to()`` works on fake parameters and real inputs are allowed."""
    import weakref as _weakref

    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    stock_swap = torch.utils.swap_tensors

    def swap_tensors(t1, t2):  # Module.to() swaps fake parameters, which fails on their weakrefs
        if _weakref.getweakrefcount(t1):
            t1.data = t2.detach()
            return
        stock_swap(t1, t2)

    def numpy(self, *args, **kwargs):  # value reads (a weight fingerprint) see zeros
        import numpy as np

        return np.zeros(tuple(self.shape), dtype=np.float32)

    torch.utils.swap_tensors = swap_tensors
    FakeTensor.numpy = numpy
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        torch.utils.swap_tensors = stock_swap
        del FakeTensor.numpy


def gib(n: int) -> float:
    return n / GIB
