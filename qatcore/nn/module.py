"""``Module``: the base of every layer and model.

Assigning a :class:`Parameter` or a Module to an attribute registers it (in
definition order); :meth:`Module.register_buffer` registers a non-trainable
state tensor (running statistics, observer ranges). Registration is what
``parameters()``, ``state_dict()``, ``train()`` and the QAT preparer walk.

``state_dict()`` maps dotted names (``"features.0.weight"``) to *copies* of the
arrays, so a saved state never changes behind your back when training goes on;
``load_state_dict()`` checks every key, shape and dtype before it writes
anything, then copies the values into the existing arrays (Parameters keep their
identity, so optimizers keep working).

>>> import numpy as np
>>> from qatcore.nn import Linear, Module, ReLU
>>> class TwoLayer(Module):
...     def __init__(self):
...         super().__init__()
...         rng = np.random.default_rng(0)
...         self.fc1 = Linear(4, 8, rng=rng)
...         self.act = ReLU()
...         self.fc2 = Linear(8, 2, rng=rng)
...     def forward(self, x):
...         return self.fc2(self.act(self.fc1(x)))
>>> model = TwoLayer()
>>> list(model.state_dict())
['fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias']
>>> model(np.ones((3, 4), dtype=np.float32)).shape
(3, 2)
"""

from __future__ import annotations

import itertools
from collections import namedtuple
from typing import Any, Callable, Iterator

import numpy as np

from qatcore.errors import QATCoreError, StateDictError
from qatcore.nn.parameter import Parameter
from qatcore.symbolic import find_symbolic
from qatcore.tensor import Tensor

__all__ = ["Module", "RemovableHandle", "IncompatibleKeys"]

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

_handle_ids = itertools.count()


class RemovableHandle:
    """Returned by hook registration; ``remove()`` unregisters the hook."""

    def __init__(self, hooks: dict, key: int) -> None:
        self._hooks, self._key = hooks, key

    @property
    def key(self) -> int:
        """The hook's key, the same in every ``copy_structure`` copy of the module (``Module.remove_hook``)."""
        return self._key

    def remove(self) -> None:
        self._hooks.pop(self._key, None)


class Module:
    """Base class of layers and models (subclasses define ``forward``)."""

    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_resizable", set())
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_forward_pre_hooks", {})
        object.__setattr__(self, "_forward_hooks", {})
        object.__setattr__(self, "training", True)

    def forward(self, *args, **kwargs):
        raise QATCoreError(f"{type(self).__name__} does not define forward()")

    # ---- registration -------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise QATCoreError(
                f"{type(self).__name__}: call super().__init__() before assigning attributes"
            )
        params, buffers, modules = self._parameters, self._buffers, self._modules
        if isinstance(value, Parameter):
            buffers.pop(name, None)
            modules.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            buffers.pop(name, None)
            modules[name] = value
        elif name in params:
            if value is not None:
                raise QATCoreError(
                    f"{type(self).__name__}.{name} is a parameter: assign a Parameter or None, "
                    f"not {type(value).__name__}"
                )
            params[name] = None
        elif name in buffers:
            buffers[name] = self._as_buffer(name, value)
            value = buffers[name]
        elif name in modules:
            if value is not None:
                raise QATCoreError(
                    f"{type(self).__name__}.{name} is a submodule: assign a Module or None, "
                    f"not {type(value).__name__}"
                )
            modules[name] = None
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._parameters.pop(name, None)
        self._buffers.pop(name, None)
        self._non_persistent.discard(name)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def _as_buffer(self, name: str, value: Any) -> Tensor | None:
        if value is None or isinstance(value, Tensor):
            return value
        if isinstance(value, (np.ndarray, np.generic)):
            return Tensor._from_array(np.array(value), requires_grad=False)
        raise QATCoreError(
            f"{type(self).__name__}.{name}: a buffer must be a Tensor, a numpy array or None, "
            f"not {type(value).__name__}"
        )

    def copy_structure(self) -> Module:
        """A copy of this module that shares its Parameters, buffers and children but has
        registration tables of its own, so replacing a child in the copy leaves this module
        as it was (eager-mode QAT preparation swaps layers in such a copy)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        for key in ("_parameters", "_buffers", "_modules", "_forward_pre_hooks", "_forward_hooks"):
            object.__setattr__(clone, key, dict(self.__dict__[key]))
        object.__setattr__(clone, "_non_persistent", set(self._non_persistent))
        object.__setattr__(clone, "_resizable", set(self._resizable))
        return clone

    def set_reference(self, name: str, value: Any) -> None:
        """Point attribute ``name`` at ``value`` without owning it: a Module assigned this way
        is not a submodule (its state is not in this module's state_dict, ``modules()`` does
        not reach it through here). A QAT layer uses it for the BatchNorm it folds and the
        quantizer that defines its input, both registered elsewhere in the model."""
        if name in self._parameters or name in self._buffers or name in self._modules:
            raise QATCoreError(f"{type(self).__name__}.{name} is registered state; a reference needs a free name")
        object.__setattr__(self, name, value)

    def mark_resizable(self, name: str) -> None:
        """Let ``load_state_dict`` give parameter or buffer ``name`` the loaded value's shape
        (state whose size the data decides, e.g. an observer's per-channel ranges, which are
        empty in a freshly prepared model). The Tensor or Parameter object is kept."""
        if name not in self._parameters and name not in self._buffers:
            raise QATCoreError(f"{type(self).__name__}: {name!r} is not a parameter or buffer")
        self._resizable.add(name)

    def register_buffer(self, name: str, value: Any, persistent: bool = True) -> None:
        """Register non-trainable state (saved in state_dict unless persistent=False)."""
        if name in self._parameters or name in self._modules:
            raise QATCoreError(f"{type(self).__name__}: {name!r} is already a parameter or submodule")
        self._buffers[name] = None
        if persistent:
            self._non_persistent.discard(name)
        else:
            self._non_persistent.add(name)
        setattr(self, name, value)

    def register_parameter(self, name: str, value: Parameter | None) -> None:
        """Register a Parameter (or a None placeholder, e.g. a bias that is off)."""
        if value is None:
            self._parameters[name] = None
            object.__setattr__(self, name, None)
        else:
            setattr(self, name, value)

    def add_module(self, name: str, module: Module | None) -> None:
        """Register a submodule under a name that need not be an identifier."""
        self._modules[name] = module
        object.__setattr__(self, name, module)

    # ---- traversal -------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """(dotted name, module) for this module and every descendant, each once."""
        seen: set[int] = set()
        stack: list[tuple[str, Module]] = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [
                (f"{name}.{child_name}" if name else child_name, child)
                for child_name, child in module._modules.items()
                if child is not None
            ]
            stack.extend(reversed(children))

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, child in self._modules.items():
            if child is not None:
                yield name, child

    def children(self) -> Iterator[Module]:
        for _, child in self.named_children():
            yield child

    def get_child(self, name: str) -> Module | None:
        """The child module registered under ``name`` (not a dotted path), or None."""
        return self._modules.get(name)

    def get_state(self, name: str) -> Tensor | None:
        """The parameter or buffer registered on this module under ``name``, or None."""
        value = self._parameters.get(name)
        return value if value is not None else self._buffers.get(name)

    def is_persistent(self, name: str) -> bool:
        """Whether buffer ``name`` goes into ``state_dict`` (``register_buffer(persistent=...)``)."""
        return name not in self._non_persistent

    def get_submodule(self, target: str) -> Module:
        """The submodule at a dotted path (``""`` is this module)."""
        module: Module = self
        for part in target.split(".") if target else []:
            child = module._modules.get(part)
            if child is None:
                raise QATCoreError(
                    f"{type(self).__name__} has no submodule {target!r} ({part!r} not found among "
                    f"{sorted(module._modules)})"
                )
            module = child
        return module

    def _named_members(self, kind: str, recurse: bool) -> Iterator[tuple[str, Any]]:
        seen: set[int] = set()
        modules = self.named_modules() if recurse else [("", self)]
        for prefix, module in modules:
            for name, value in getattr(module, kind).items():
                if value is None or id(value) in seen:
                    continue
                seen.add(id(value))
                yield (f"{prefix}.{name}" if prefix else name), value

    def named_parameters(self, recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter), each shared Parameter once."""
        return self._named_members("_parameters", recurse)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self.named_parameters(recurse):
            yield p

    def named_buffers(self, recurse: bool = True) -> Iterator[tuple[str, Tensor]]:
        return self._named_members("_buffers", recurse)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, b in self.named_buffers(recurse):
            yield b

    # ---- modes -----------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Set training mode here and in every descendant (affects BatchNorm, Dropout)."""
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def apply(self, fn: Callable[[Module], None]) -> Module:
        """Call fn on every descendant (children first) and on this module."""
        for module in reversed(list(self.modules())):
            fn(module)
        return self

    # ---- state -----------------------------------------------------------------------
    def _state_items(self) -> Iterator[tuple[str, Tensor]]:
        # torch order: a module's parameters, then its buffers, then its children.
        for prefix, module in self.named_modules():
            dot = f"{prefix}." if prefix else ""
            for name, p in module._parameters.items():
                if p is not None:
                    yield dot + name, p
            for name, b in module._buffers.items():
                if b is not None and name not in module._non_persistent:
                    yield dot + name, b

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every parameter and persistent buffer by dotted name, as array copies."""
        return {name: np.array(t.data, copy=True) for name, t in self._state_items()}

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> IncompatibleKeys:
        """Copy values into this module's parameters and buffers, in place.

        Everything is checked first: with ``strict`` any missing or unexpected key
        is an error; a shape mismatch or an impossible dtype cast is always one.
        The error lists every offending key; nothing is written unless all fit.
        """
        if not isinstance(state_dict, dict):
            raise StateDictError(f"load_state_dict expects a dict, got {type(state_dict).__name__}")
        targets = dict(self._state_items())
        resizable = {f"{prefix}.{name}" if prefix else name
                     for prefix, module in self.named_modules() for name in module._resizable}
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        mismatched, values = [], {}
        for key, target in targets.items():
            if key not in state_dict:
                continue
            raw = state_dict[key]
            value = raw.data if isinstance(raw, Tensor) else np.asarray(raw)
            if value.shape != target.data.shape and key not in resizable:
                mismatched.append(f"{key}: checkpoint {value.shape} vs model {target.data.shape}")
            elif not np.can_cast(value.dtype, target.data.dtype, casting="same_kind"):
                mismatched.append(f"{key}: dtype {value.dtype} cannot become {target.data.dtype}")
            else:
                values[key] = value
        problems = []
        if mismatched:
            problems.append("mismatched: " + "; ".join(mismatched))
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(map(str, unexpected)))
        if problems:
            raise StateDictError(
                f"load_state_dict into {type(self).__name__} failed; " + " | ".join(problems)
            )
        for key, value in values.items():
            target = targets[key]
            if value.shape != target.data.shape:  # a resizable entry: same object, new array
                target.data = np.array(value, dtype=target.data.dtype)
            else:
                np.copyto(target.data, value, casting="same_kind")
        return IncompatibleKeys(missing, unexpected)

    # ---- calling -----------------------------------------------------------------------
    def register_forward_pre_hook(self, hook: Callable) -> RemovableHandle:
        """hook(module, args) runs before forward; it may return replacement args."""
        key = next(_handle_ids)
        self._forward_pre_hooks[key] = hook
        return RemovableHandle(self._forward_pre_hooks, key)

    def remove_hook(self, handle: RemovableHandle) -> None:
        """Unregister the hook of ``handle`` from this module: the module it was registered on,
        or a ``copy_structure`` copy of it, which holds the same hooks under the same keys (the
        int8 copy of an eager-mode QAT model drops the QAT controller's step counter this way)."""
        self._forward_pre_hooks.pop(handle.key, None)
        self._forward_hooks.pop(handle.key, None)

    def register_forward_hook(self, hook: Callable) -> RemovableHandle:
        """hook(module, args, output) runs after forward; it may return a new output."""
        key = next(_handle_ids)
        self._forward_hooks[key] = hook
        return RemovableHandle(self._forward_hooks, key)

    def __call__(self, *args, **kwargs):
        symbolic = find_symbolic(args, kwargs)
        if symbolic is not None:  # a graph is being recorded (qatcore.graph.trace)
            return symbolic.record_module_call(self, args, kwargs)
        return self._call_eager(args, kwargs)

    def _call_eager(self, args: tuple, kwargs: dict):
        """Run pre-hooks, forward and hooks on real values."""
        if self._forward_pre_hooks:
            for hook in list(self._forward_pre_hooks.values()):
                result = hook(self, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        output = self.forward(*args, **kwargs)
        if self._forward_hooks:
            for hook in list(self._forward_hooks.values()):
                result = hook(self, args, output)
                if result is not None:
                    output = result
        return output

    # ---- printing ----------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = []
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n" + "\n".join(lines) + "\n)"
