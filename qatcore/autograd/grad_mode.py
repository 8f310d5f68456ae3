"""Whether operations record the graph for backward.

The flag lives in a :class:`contextvars.ContextVar`, so each thread and each
asyncio task has its own and ``no_grad`` in one cannot leak into another. It is
the only piece of context state in qatcore, and it never changes a result, only
whether a graph is recorded.

>>> import qatcore
>>> x = qatcore.tensor([1.0, 2.0], requires_grad=True)
>>> with qatcore.no_grad():
...     y = x * 2
>>> y.requires_grad
False
"""

import contextvars
import functools

__all__ = ["no_grad", "enable_grad", "is_grad_enabled"]

_grad_enabled = contextvars.ContextVar("qatcore_grad_enabled", default=True)


def is_grad_enabled() -> bool:
    """True when new operations record their inputs for backward."""
    return _grad_enabled.get()


class _GradMode:
    _value: bool

    def __enter__(self):
        self._token = _grad_enabled.set(self._value)
        return self

    def __exit__(self, *exc):
        _grad_enabled.reset(self._token)
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with type(self)():
                return fn(*args, **kwargs)

        return wrapper


class no_grad(_GradMode):
    """Context manager (or decorator) under which no graph is recorded."""

    _value = False


class enable_grad(_GradMode):
    """Context manager (or decorator) that turns recording back on."""

    _value = True
