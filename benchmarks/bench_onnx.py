"""ONNX export and ONNX Runtime next to qatcore's own runtimes, measured in the same run.

Prints one JSON object:

- ``export_ms`` / ``import_ms``: ``export_onnx`` of the float, QAT and int8 DigitsCNN (both int8
  forms) and ``import_onnx`` of the float file, median of a few runs after one warm-up (each
  includes the shape run, onnx.checker's full check and the atomic write);
- ``inference``: DigitsCNN on the 359 digits test images (one batch) and on one image, in ms:
  qatcore's float model (the baseline: our own float path), qatcore's int8 runtime, and ONNX
  Runtime (CPU, default threads) on the exported float, QAT (QDQ) and int8 (QDQ and
  qoperator) files; ONNX Runtime on one thread for the int8 QDQ file; PyTorch eager float
  when torch is installed;
- ``agreement``: the fraction of ONNX Runtime's int8 outputs equal to qatcore's.

The model is DigitsCNN with its seed-0 weights, prepared and observed on four training
batches (speed does not depend on training). Needs the onnx extra; without it the JSON
says ``skipped``.

Usage: ``python benchmarks/bench_onnx.py [--repeats N] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
from reference_models import digits_cnn_float_qat_int8
from timing import median_time_s, settle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions of each inference")
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        reason = 'the onnx extra is not installed (pip install -e ".[onnx]")'
        print(json.dumps({"benchmark": "onnx", "skipped": reason}))
        return
    from qatcore.autograd import no_grad
    from qatcore.interop.onnx import export_onnx, import_onnx

    _, x_test, model, qat, int8_model = digits_cnn_float_qat_int8()
    one = x_test[:1]
    folder = tempfile.mkdtemp()
    files = {name: os.path.join(folder, f"{name}.onnx") for name in ("float", "qat", "int8_qdq", "int8_qoperator")}
    exports = {
        "float": lambda: export_onnx(model, files["float"], one),
        "qat": lambda: export_onnx(qat, files["qat"], one),
        "int8_qdq": lambda: export_onnx(int8_model, files["int8_qdq"], one),
        "int8_qoperator": lambda: export_onnx(int8_model, files["int8_qoperator"], one, format="qoperator"),
    }
    export_ms = {name: 1e3 * median_time_s(fn, max(3, repeats // 5), warmup=1) for name, fn in exports.items()}
    import_ms = 1e3 * median_time_s(lambda: import_onnx(files["float"]), max(3, repeats // 5), warmup=1)

    def session(path, threads: int = 0):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    sessions = {name: session(path) for name, path in files.items()}
    sessions["int8_qdq_1_thread"] = session(files["int8_qdq"], threads=1)
    inference = {}
    for label, batch in (("batch_359", x_test), ("batch_1", one)):
        figures = {}
        with no_grad():
            settle()
            figures["qatcore_float"] = 1e3 * median_time_s(lambda b=batch: model(b), repeats)
            settle()
            figures["qatcore_int8"] = 1e3 * median_time_s(lambda b=batch: int8_model(b), repeats)
        for name, sess in sessions.items():
            settle()
            figures[f"onnxruntime_{name}"] = 1e3 * median_time_s(lambda s=sess, b=batch: s.run(None, {"x": b}),
                                                                 repeats)
        try:
            import torch

            torch_model = torch.nn.Sequential(
                torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(128, 10)).eval()
            tensor = torch.from_numpy(batch)
            with torch.no_grad():
                settle()
                figures["torch_float"] = 1e3 * median_time_s(lambda m=torch_model, t=tensor: m(t), repeats)
        except ImportError:
            pass
        figures["qatcore_int8_over_onnxruntime_int8_qdq"] = figures["qatcore_int8"] / figures["onnxruntime_int8_qdq"]
        inference[label] = figures
    ours = int8_model(x_test).data
    agreement = {name: float(np.mean(sessions[name].run(None, {"x": x_test})[0] == ours))
                 for name in ("int8_qdq", "int8_qoperator")}
    result = {"benchmark": "onnx", "onnx": onnx.__version__, "onnxruntime": ort.__version__,
              "onnxruntime_default_threads": "all cores (intra_op_num_threads=0)", "repeats": repeats,
              "file_bytes": {name: os.path.getsize(path) for name, path in files.items()},
              "export_ms": export_ms, "import_ms": import_ms, "inference_ms": inference, "agreement": agreement}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
