"""Containers: Sequential (a chain) and ModuleList (an indexable list)."""

from __future__ import annotations

from typing import Iterable, Iterator

from qatcore.errors import QATCoreError
from qatcore.nn.module import Module

__all__ = ["Sequential", "ModuleList"]


def _check_modules(owner: str, modules: Iterable) -> list[Module]:
    out = list(modules)
    for i, m in enumerate(out):
        if not isinstance(m, Module):
            raise QATCoreError(f"{owner}: item {i} is a {type(m).__name__}, expected a Module")
    return out


class Sequential(Module):
    """Calls its children in order, each on the previous one's output.

    Children are named "0", "1", ... (so state_dict keys read "0.weight").

    >>> from qatcore.nn import Linear, ReLU
    >>> import numpy as np
    >>> net = Sequential(Linear(2, 3, rng=np.random.default_rng(0)), ReLU())
    >>> len(net), type(net[1]).__name__
    (2, 'ReLU')
    """

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for i, m in enumerate(_check_modules("Sequential", modules)):
            self.add_module(str(i), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x


class ModuleList(Module):
    """A list of Modules, registered so their parameters are found (named "0", "1", ...)."""

    def __init__(self, modules: Iterable[Module] = ()) -> None:
        super().__init__()
        for m in _check_modules("ModuleList", modules):
            self.append(m)

    def append(self, module: Module) -> ModuleList:
        _check_modules("ModuleList", [module])
        self.add_module(str(len(self._modules)), module)
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]
