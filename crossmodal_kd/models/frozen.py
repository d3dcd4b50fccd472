"""The one mechanism for frozen modules: held *outside* the holder's module tree.

A frozen module (a teacher of a method, a frozen transformer, a CLIP backend and the networks inside it) is
registered with :meth:`FrozenHolder.hold_frozen`. It is then not in ``state_dict()`` (saved files and
checkpoints stay small; it is rebuilt from its source), not in ``parameters()`` (no optimiser, no DDP
wrapping), has no gradients, stays in eval mode whatever ``.train()`` is called on the holder, and follows
``.to()`` / ``.half()`` of the holder. :func:`frozen_state` reaches its weights (for fingerprints).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


class FrozenHolder(nn.Module):
    """Mixin for modules that hold frozen modules; register each with :meth:`hold_frozen`."""

    def hold_frozen(self, name: str, module: nn.Module, attribute: bool = True) -> nn.Module:
        """Freeze ``module`` and hold it under ``name`` (also as ``self.<name>`` unless ``attribute=False``)."""
        module.eval().requires_grad_(False)
        self.__dict__.setdefault("_held_frozen", {})[name] = module  # bypasses nn.Module's submodule registration
        if attribute:
            object.__setattr__(self, name, module)
        return module

    def frozen_modules(self) -> dict[str, nn.Module]:
        return dict(self.__dict__.get("_held_frozen", {}))

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules().values():
            module.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for module in self.frozen_modules().values():
            module._apply(fn, recurse)
        return self


def frozen_state(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the frozen modules held anywhere in ``module`` (recursively), with dotted names."""
    for sub_name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, FrozenHolder):
            for name, held in sub.frozen_modules().items():
                path = f"{sub_name}.<{name}>" if sub_name else f"<{name}>"
                for key, tensor in held.state_dict().items():
                    yield f"{path}.{key}", tensor
                yield from frozen_state(held, path)
