"""Interoperability with other frameworks' model formats.

- :mod:`qatcore.interop.onnx`: export float, QAT (QDQ) and int8 models to ONNX, and
  import float ONNX models as trainable GraphModules. Needs the optional extra
  ``pip install "qatcore[onnx]"`` (onnx, onnxruntime), imported only when one of its
  functions runs; ``qatcore.interop.onnx`` itself is imported on first use.
"""

from qatcore.lazy_exports import lazy_exports

__all__ = ["onnx"]

__getattr__, __dir__ = lazy_exports(__name__, submodules=("onnx",))
