"""Copies of a module's parameters prepared for a fast kernel (cast, packed into a kernel's layout, gathered), kept
for as long as the parameters are unchanged.

A kept copy is current while each parameter is the same tensor object, at the same address, with the same version
counter, and no optimizer has taken a step since it was made. The optimizer count matters because fused optimizers
(`torch.optim.AdamW(..., fused=True)` and others on the CPU) update parameters without bumping their version
counters. What none of these can see is an in-place update through `.data` (`p.data.mul_(m)`, as some EMA teachers
do): `.data` has a version counter of its own; nor a write through a NumPy or DLPack view of the memory. After such
an update, call `forget_prepared()`.

Nothing is kept for inference tensors (made under `torch.inference_mode()`: they have no version counter), under
torch.func transforms (their tensors have no address), under a dispatch mode (fake tensors, FLOP counters), for CPU
tensors in shared memory (another process may write them) or while torch.distributed is initialised (collectives
such as `broadcast` and `all_reduce` write parameters without bumping their versions; what was kept before is
dropped); callers then prepare afresh on every call. The kept entry holds the parameters
themselves, not weak references, which `torch.utils.swap_tensors` (used by `load_state_dict` and `.to()` when
`torch.__future__.set_swap_module_params_on_conversion(True)`) would refuse.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import _get_current_dispatch_mode

T = TypeVar("T")

_optimizer_steps = 0  # optimizer steps taken in this process since the hook below was registered
_kept_any = False  # whether any cache may hold an entry (forget_prepared clears it)
_hook: object | None = None
_caches: weakref.WeakSet[PreparedCache] = weakref.WeakSet()


def _count_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def forget_prepared() -> None:
    """Drop every kept copy, for parameters changed in a way their version counters do not show (through `.data`)."""
    global _kept_any
    for cache in list(_caches):
        cache.clear()
    _kept_any = False


class PreparedCache:
    """One kept value per module, made from some of its tensors by `make` and returned while they are unchanged."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
        _caches.add(self)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, module: nn.Module, tensors: Sequence[torch.Tensor], make: Callable[[], T], tag: Hashable) -> T:
        """`make()`, or the value kept for `module` if it was made from these very tensors, unchanged, with the same
        `tag` (e.g. the dtype it was made in)."""
        global _hook, _kept_any
        try:
            state = [(t._version, t.data_ptr()) for t in tensors]
        except RuntimeError:  # an inference tensor (no version counter) or torch.func's (no address): keep nothing
            return make()
        if _get_current_dispatch_mode() is not None:
            return make()  # fake tensors, FLOP counters: their values are none to keep
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if _kept_any:  # collectives (broadcast, all_reduce) write parameters without bumping their versions, so
                forget_prepared()  # copies made before init may be stale after it: none outlives it (dropped once)
            return make()
        if _hook is None:  # registered on first use, so that importing gcvit changes nothing in torch
            _hook = register_optimizer_step_post_hook(_count_step)
        key = (tag, _optimizer_steps, state)
        entry = self._entries.get(module)
        if entry is not None and entry[0] == key and all(kept is t for kept, t in zip(entry[1], tensors)):
            return entry[3]
        value = make()
        # shared CPU memory is written by other processes, unseen: not kept (share_memory_() moves a tensor's
        # storage, so a tensor kept before it was shared misses on its new address). The entry holds the storages
        # too: after `p.data = new` the old address could otherwise come back, with the same version, for new values.
        if not any(t.device.type == "cpu" and t.is_shared() for t in tensors):
            self._entries[module] = (key, list(tensors), [t.untyped_storage() for t in tensors], value)
            _kept_any = True
        return value
