"""The packaged Tiny Shakespeare text: vocabulary, split, encode/decode, windows, and a
resumable DataLoader of (B, T) windows over it."""

import gzip

import numpy as np
import pytest

import qatcore.data.text as text_module
from qatcore.data import DataLoader, load_text, text_windows
from qatcore.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def text():
    return load_text()


def test_the_text_its_vocabulary_and_split(text):
    assert text.vocabulary_size == 65 and text.vocabulary == "".join(sorted(text.vocabulary))
    assert text.vocabulary[0] == "\n" and text.vocabulary.endswith("xyz")
    assert text.train.dtype == np.int64 and text.train.size + text.validation.size == 1_115_394
    assert text.train.size == round(0.9 * 1_115_394)
    assert text.decode(text.validation[-22:]) == "Whiles thou art waking.\n"[-22:] and text.validation.size == 111_539
    assert text.decode(text.validation[:8]) == "\n\nGREMIO:"[:8]
    whole = np.concatenate([text.train, text.validation])
    assert text.decode(whole[:33]) == "First Citizen:\nBefore we proceed "
    assert np.bincount(whole, minlength=65).min() > 0  # every character occurs
    smaller = load_text(validation_fraction=0.5)
    assert abs(smaller.train.size - smaller.validation.size) <= 1


def test_encode_and_decode_are_inverse(text):
    line = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert text.decode(text.encode(line)) == line
    with pytest.raises(DataError, match="'~' is not in the vocabulary"):
        text.encode("a~b")
    with pytest.raises(DataError, match="tokens must be in 0..64"):
        text.decode([0, 65])


def test_windows_are_inputs_and_targets_shifted_by_one():
    tokens = np.arange(11)
    x, y = text_windows(tokens, block_size=4)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    x, y = text_windows(tokens, block_size=4, stride=3)
    assert x[:, 0].tolist() == [0, 3, 6] and np.array_equal(y, x + 1)
    with pytest.raises(ConfigError, match="block_size must be a positive int"):
        text_windows(tokens, 0)
    with pytest.raises(ConfigError, match="cannot make one window"):
        text_windows(tokens, 11)
    with pytest.raises(ConfigError, match="1-d integer array"):
        text_windows(np.zeros((2, 3)), 2)


def test_a_loader_of_windows_resumes_mid_epoch(text):
    x, y = text_windows(text.validation, block_size=32)

    def loader():
        return DataLoader(x, y, batch_size=16, shuffle=True, rng=np.random.default_rng(7))

    straight = [xb.copy() for xb, _ in loader()]
    first = loader()
    batches = iter(first)
    for _ in range(5):
        next(batches)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    rest = [xb for xb, _ in resumed]
    assert len(rest) == len(straight) - 5 and all(np.array_equal(a, b) for a, b in zip(rest, straight[5:]))
    assert straight[0].shape == (16, 32)


def test_bad_fraction_and_a_damaged_file(monkeypatch):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        load_text(validation_fraction=1.0)
    damaged = gzip.compress(b"First Citizen:\n")
    monkeypatch.setattr(text_module, "_read_packaged_text",
                        lambda: text_module._check_text(gzip.decompress(damaged)))
    with pytest.raises(DataError, match="SHA-256 differs"):
        load_text()
