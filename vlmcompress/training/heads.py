"""What the training-only auxiliary heads share: a forward hook that keeps the first output of a module
per step, and a main linear head plus an optional second one, saved under two names (a run made before
the second head existed has only the first)."""
from __future__ import annotations

import torch

__all__ = ["HookedHeads"]


class HookedHeads:
    """``head`` (always trained) and ``extra`` (trained when ``extra_weight > 0``) on what `module` outputs.

    Subclasses set ``names = (main, extra)``, the keys of :meth:`state_dict`.
    """

    names: tuple[str, str] = ("", "")

    def __init__(self, module: torch.nn.Module, head: torch.nn.Linear, extra: torch.nn.Linear, extra_weight: float):
        self.head, self.extra, self.extra_weight = head, extra, extra_weight
        self.captured = None
        module.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        if self.captured is None:  # the first call of the step (generation loops call it again)
            self.captured = output[0] if isinstance(output, tuple) else output

    def start(self) -> None:
        self.captured = None

    def take(self):
        """What the hook captured this step (``None`` if the module did not run), and forget it."""
        out, self.captured = self.captured, None
        return out

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters()) + (list(self.extra.parameters()) if self.extra_weight > 0 else [])

    def state_dict(self) -> dict:
        return {self.names[0]: self.head.state_dict(), self.names[1]: self.extra.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Loads what `state` has."""
        for name, module in zip(self.names, (self.head, self.extra)):
            if name in state:
                module.load_state_dict(state[name])
