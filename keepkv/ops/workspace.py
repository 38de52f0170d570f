"""Scratch buffers reused across the eager forwards of one prefill (the MLP's two ``[tokens, intermediate]``
activations).

A prefill chunk's largest tensors are its MLP activations, ``gate(x)`` and ``up(x)``, ``tokens x intermediate``
each. Allocated fresh for every layer of every chunk, they cycle through the process's allocator: on a CPU with
glibc ``malloc``, blocks that large go back to the kernel when freed (heap trimming, or ``mmap`` above 32 MiB), and
the first touch of every returned page is a page fault, which made the MLP of a long prefill markedly slower than
with warm memory (``docs/profile.md``, section 22). A :class:`Workspace` hands out the same storage to every layer
and chunk of one prefill instead and frees it at the end (the engine opens one per prefill:
``Transformer.scratch_buffers``). The two buffers stay allocated for the whole prefill (through each layer's
attention too), where the plain MLP holds at most three such tensors for the length of the MLP. On a GPU the
caching allocator already recycles such blocks; there the workspace saves no faults.

Contract: a buffer is valid until the next :meth:`Workspace.buffer` call with the same name (the caller finishes
with it first: layers run one after another) and holds garbage when handed out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Workspace:
    """Named scratch buffers, one flat tensor per ``(name, dtype, device)``, grown when a larger shape is asked
    for and viewed to the shape requested."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``, storage shared with every earlier request of ``name``
        (same dtype and device)."""
        numel = math.prod(shape)
        key = (name, dtype, torch.device(device))
        flat = self._buffers.get(key)
        if flat is None or flat.numel() < numel:
            # the smaller buffer goes before the larger one is allocated: drop the dict's reference and this one
            self._buffers.pop(key, None)
            flat = None
            flat = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)

    def resident_bytes(self) -> int:
        return sum(flat.numel() * flat.element_size() for flat in self._buffers.values())

    def clear(self) -> None:
        """Free every buffer."""
        self._buffers.clear()
