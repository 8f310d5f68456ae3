"""``lazy_exports``: a package's public names, imported the first time they are used.

A package ``__init__`` that imported every submodule would make importing any
part of the package load all of it (``import qatcore`` would load the QAT engine,
``import qatcore.nn.functional`` every layer). Instead it lists where each name
lives and hands the table to :func:`lazy_exports`, whose two functions become
the package's PEP 562 ``__getattr__`` and ``__dir__``::

    __getattr__, __dir__ = lazy_exports(__name__, submodules=("init",),
                                        names={"qatcore.nn.linear": ("Linear",)})

``package.Linear`` then imports ``qatcore.nn.linear`` once and keeps the class as
an ordinary attribute, so later lookups cost nothing; ``from package import
Linear`` works the same way. A name in neither table is an AttributeError, as for
any module.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Iterable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, submodules: Iterable[str] = (), names: Mapping[str, Iterable[str]] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """PEP 562 ``(__getattr__, __dir__)`` for ``package``.

    Args:
        package: the package's ``__name__``.
        submodules: submodules reachable as attributes (``package.<name>``).
        names: defining module -> the names the package re-exports from it.

    >>> import qatcore
    >>> "optim" in dir(qatcore), qatcore.optim.SGD.__name__
    (True, 'SGD')
    """
    source = {name: f"{package}.{name}" for name in submodules}
    for module_name, exported in (names or {}).items():
        for name in exported:
            source[name] = module_name

    def __getattr__(name: str) -> Any:
        if name not in source:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(source[name])
        value = module if source[name] == f"{package}.{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)  # found from now on without this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(source))

    return __getattr__, __dir__
