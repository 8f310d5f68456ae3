"""What the commands read from a run folder: files found by name, outputs next to the source,
a reference model recognised by its tensor names (each one, none for another model)."""

import numpy as np
import pytest

from qatcore.errors import ConfigError
from qatcore.models import MLP
from qatcore.pipeline import MODELS, guess_reference_model, make_model, model_input, output_path, run_file
from qatcore.quantization.qat import QATPreparer


@pytest.mark.parametrize("name", list(MODELS))
def test_each_reference_model_is_recognised_by_its_qat_state(name):
    channels, image_size = model_input(name)
    qat_model = QATPreparer().prepare_for_qat(make_model(name, np.random.default_rng(0), image_size, channels))
    assert guess_reference_model(qat_model.state_dict()) == name


def test_a_model_of_other_names_is_not_taken_for_a_reference_model():
    qat_model = QATPreparer().prepare_for_qat(MLP(in_features=64, hidden=(32,)))  # layers.1, layers.3 only
    assert guess_reference_model(qat_model.state_dict()) is None


def test_run_file_and_output_path(tmp_path):
    (tmp_path / "qat.ckpt").write_bytes(b"")
    assert run_file(tmp_path, "qat.ckpt") == tmp_path / "qat.ckpt"
    assert run_file(tmp_path / "qat.ckpt", "statistics.qat") == tmp_path / "qat.ckpt"  # a file is itself
    with pytest.raises(ConfigError, match=r"has no model.int8 \(qatcore run --output .* makes one\)"):
        run_file(tmp_path, "model.int8")
    with pytest.raises(ConfigError, match="does not exist"):
        run_file(tmp_path / "missing", "qat.ckpt")
    assert output_path(tmp_path, "model.onnx") == output_path(tmp_path / "qat.ckpt", "model.onnx") \
        == tmp_path / "model.onnx"
