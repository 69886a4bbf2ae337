"""One owner and one removal protocol for everything vlmcompress attaches to a model.

Every change a patch makes to a loaded model is either a forward (pre-)hook on a module or an instance
attribute set over the class's (a layer's ``forward``, the model's ``forward``/``generate``). Each
component that attaches something (the patch itself, stage-A vision merging, the LLM's proportional
attention) records it in its own :class:`Attachments` and undoes it with :meth:`Attachments.remove`: hooks
removed, attributes put back as they were (deleted when there was none), in reverse order, idempotent.

Surviving ``copy.deepcopy``: nothing attached is a closure over the original model. Hook functions and
attribute values are bound methods or ``functools.partial`` objects whose arguments are the model's own
modules or the component objects that hold them, and ``deepcopy`` rebuilds both with the copied objects
(its memo maps the original modules to the copy's). The records here hold modules and torch's hook
handles, which ``deepcopy`` maps the same way, so ``remove()`` on a copy undoes the copy's changes and
never the original's.
"""
from __future__ import annotations

import torch

class Attachments:
    """The hooks and instance attributes one component attached; :meth:`remove` undoes them all."""

    def __init__(self) -> None:
        self._records: list[tuple] = []

    def hook(self, module: torch.nn.Module, fn, *, pre: bool = False, with_kwargs: bool = False) -> None:
        """``module.register_forward_pre_hook(fn)`` (``pre``) or ``register_forward_hook(fn)``, recorded."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._records.append(("hook", register(fn, with_kwargs=with_kwargs)))

    def set_attr(self, obj, name: str, value) -> None:
        """Set instance attribute ``obj.name = value`` (bypassing ``nn.Module.__setattr__``), recorded with
        what ``obj.__dict__`` held before (or that it held nothing)."""
        had = name in obj.__dict__       # a flag, not a sentinel object: deepcopy would copy a sentinel
        previous = obj.__dict__.get(name)
        object.__setattr__(obj, name, value)
        self._records.append(("attr", obj, name, had, previous))

    def remove(self) -> None:
        """Undo everything, newest first. Calling it again does nothing."""
        while self._records:
            record = self._records.pop()
            if record[0] == "hook":
                record[1].remove()
                continue
            _, obj, name, had, previous = record
            if not had:
                obj.__dict__.pop(name, None)
            else:
                object.__setattr__(obj, name, previous)

    def __len__(self) -> int:
        return len(self._records)

    def __bool__(self) -> bool:
        return bool(self._records)
