"""The one exception hierarchy of qatcore.

Every error a user can cause derives from :class:`QATCoreError`, so a harness can
catch them all with one ``except``; the subclasses say which part of the library
refused the input. Messages name the layer, key or field and what was expected.

>>> try:
...     raise ShapeError("linear: weight has shape (3, 4), expected (out, 5)")
... except QATCoreError as e:
...     print(type(e).__name__)
ShapeError
"""

__all__ = [
    "QATCoreError",
    "ShapeError",
    "DTypeError",
    "GradientError",
    "StateDictError",
    "SerializationError",
    "ConfigError",
    "DataError",
    "GraphError",
    "TraceError",
    "ObserverError",
    "CheckpointError",
    "InteropError",
    "RunInterrupted",
    "DistributedError",
]


class QATCoreError(Exception):
    """Base class of every error qatcore raises on purpose."""


class ShapeError(QATCoreError, ValueError):
    """An array has a shape the operation cannot accept."""


class DTypeError(QATCoreError, TypeError):
    """An array has a dtype the operation cannot accept."""


class GradientError(QATCoreError, RuntimeError):
    """backward() was asked for something the graph cannot give."""


class StateDictError(QATCoreError, KeyError):
    """A state_dict does not fit the module or optimizer it is loaded into."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class SerializationError(QATCoreError, ValueError):
    """A file given to qatcore.load is truncated, corrupted or not a qatcore file,
    or an object given to qatcore.save has a type qatcore cannot store."""


class ConfigError(QATCoreError, ValueError):
    """A configuration value is outside what the field accepts."""


class DataError(QATCoreError, ValueError):
    """A dataset file is missing, malformed or inconsistent."""


class GraphError(QATCoreError, ValueError):
    """A graph edit or lint found a broken invariant (the message names the node)."""


class TraceError(QATCoreError, RuntimeError):
    """A model cannot be traced into a graph (the message names the module and line)."""


class ObserverError(QATCoreError, ValueError):
    """An observer saw NaN/Inf, or was asked for parameters before observing anything
    (the message names the observer and its layer)."""


class CheckpointError(QATCoreError, ValueError):
    """A QAT checkpoint (or int8 model file) is corrupted, truncated, hostile, of another
    format version, or does not fit the model it is loaded into."""


class InteropError(QATCoreError, ValueError):
    """A model cannot be exported to, or an ONNX file imported from, another framework's
    format: an operator or setting that has no faithful counterpart (named, with the node),
    or a file that is malformed; also raised when the optional ``onnx`` extra is missing."""


class RunInterrupted(QATCoreError):
    """A pipeline run (``qatcore.pipeline``) stopped at a training-step boundary because a
    stop was requested (Ctrl-C); its state is saved in ``folder``, and
    ``resume_pipeline(folder)`` finishes it with the result the uninterrupted run gives."""

    def __init__(self, folder) -> None:
        super().__init__(f"the run was interrupted and saved in {folder}; resume_pipeline({str(folder)!r}) "
                         f"(or qatcore run --resume {folder}) finishes it")
        self.folder = folder


class DistributedError(QATCoreError, RuntimeError):
    """A data-parallel run cannot go on: a rank was lost, raised, or stopped answering
    (the message names it), or the ranks disagree on something they must share."""
