"""Frozen helper modules held *outside* a module's tree (a frozen transformer, a CLIP backend).

They are not in ``state_dict()`` (saved files and checkpoints stay small; they are rebuilt from their
source), not in ``parameters()`` (no optimiser, no DDP), always in eval mode, and still follow
``.to()`` / ``.half()`` of the module that holds them.
"""

from __future__ import annotations

from torch import nn


class FrozenHolder(nn.Module):
    """Mixin for modules that hold frozen helpers; register each with :meth:`hold_frozen`."""

    def hold_frozen(self, name: str, module: nn.Module) -> nn.Module:
        module.eval().requires_grad_(False)
        object.__setattr__(self, name, module)  # bypasses nn.Module's submodule registration
        object.__setattr__(self, "_frozen_names", (*getattr(self, "_frozen_names", ()), name))
        return module

    def _frozen(self) -> list[nn.Module]:
        return [getattr(self, name) for name in getattr(self, "_frozen_names", ())]

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen():
            module.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for module in self._frozen():
            module._apply(fn, recurse)
        return self
