"""Interoperability with other frameworks' model formats.

- :mod:`qatcore.interop.onnx`: export float, QAT (QDQ) and int8 models to ONNX, and
  import float ONNX models as trainable GraphModules. Needs the optional extra
  ``pip install "qatcore[onnx]"`` (onnx, onnxruntime); nothing here is imported by
  ``import qatcore``.
"""
