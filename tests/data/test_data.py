"""Tests of qatcore.data: the embedded digits, the resumable DataLoader and IDX reading."""

from __future__ import annotations

import copy
import gzip
import importlib
import io
import math
import pathlib
import sys
import tempfile
import zipfile
from importlib import resources

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.data import DataLoader, load_digits, load_mnist_idx, read_idx
from qatcore.data import digits as digits_module
from qatcore.errors import ConfigError, DataError, QATCoreError

KNOWN_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def _raw_digits_table() -> np.ndarray:
    """The shipped CSV read independently of load_digits: (1797, 65) int64."""
    raw = resources.files("qatcore.data").joinpath("_data").joinpath("digits.csv.gz").read_bytes()
    return np.loadtxt(io.StringIO(gzip.decompress(raw).decode("ascii")), delimiter=",",
                      dtype=np.int64)


def _sorted_rows(table: np.ndarray) -> np.ndarray:
    return table[np.lexsort(table.T[::-1])]


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_range():
    x_train, y_train, x_test, y_test = load_digits()
    assert x_train.shape == (1438, 1, 8, 8) and x_test.shape == (359, 1, 8, 8)
    assert y_train.shape == (1438,) and y_test.shape == (359,)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
        counts = x * 16
        np.testing.assert_array_equal(counts, np.round(counts))  # exactly count / 16
    for y in (y_train, y_test):
        assert set(y.tolist()) == set(range(10))


def test_digits_class_counts_match_the_known_ones():
    _, y_train, _, y_test = load_digits(test_fraction=0.2, seed=0)
    overall = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
    assert overall.tolist() == KNOWN_CLASS_COUNTS
    # stratified: each class sends round(0.2 * n_c) images to test
    expected_test = [math.floor(0.2 * n + 0.5) for n in KNOWN_CLASS_COUNTS]
    assert np.bincount(y_test, minlength=10).tolist() == expected_test
    test_share = np.bincount(y_test, minlength=10) / overall
    assert np.all(np.abs(test_share - 0.2) < 0.01)


@pytest.mark.parametrize("test_fraction", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_digits_split_is_stratified_for_any_fraction(test_fraction):
    _, y_train, _, y_test = load_digits(test_fraction=test_fraction, seed=5)
    train_counts = np.bincount(y_train, minlength=10)
    test_counts = np.bincount(y_test, minlength=10)
    assert (train_counts + test_counts).tolist() == KNOWN_CLASS_COUNTS
    assert train_counts.min() >= 1 and test_counts.min() >= 1  # every class in both
    for n, n_test in zip(KNOWN_CLASS_COUNTS, test_counts):
        assert abs(n_test - test_fraction * n) <= 1


def test_digits_split_is_deterministic_per_seed():
    first, second = load_digits(seed=11), load_digits(seed=11)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_digits_different_seeds_give_different_splits():
    _, _, x_test_0, y_test_0 = load_digits(seed=0)
    _, _, x_test_1, y_test_1 = load_digits(seed=1)
    assert x_test_0.shape == x_test_1.shape
    assert not np.array_equal(x_test_0, x_test_1)
    # same class counts (stratified), different members
    assert np.bincount(y_test_0).tolist() == np.bincount(y_test_1).tolist()


@pytest.mark.parametrize("seed", [0, 1, 123])
def test_digits_split_is_disjoint_and_complete(seed):
    labels = _raw_digits_table()[:, -1]
    train_index, test_index = digits_module._stratified_split(labels, 0.2, seed)
    assert np.intersect1d(train_index, test_index).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_index, test_index])),
                                  np.arange(1797))
    # and the public arrays are exactly those rows of the file
    x_train, y_train, x_test, y_test = load_digits(seed=seed)
    table = _raw_digits_table()
    np.testing.assert_array_equal(y_train, table[train_index, -1])
    np.testing.assert_array_equal(x_test.reshape(-1, 64) * 16, table[test_index, :64])
    together = np.column_stack([np.concatenate([x_train, x_test]).reshape(-1, 64) * 16,
                                np.concatenate([y_train, y_test])]).astype(np.int64)
    np.testing.assert_array_equal(_sorted_rows(together), _sorted_rows(table))


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_digits_rejects_test_fraction_out_of_range(bad):
    with pytest.raises(ConfigError, match=r"test_fraction.*\(0, 1\)"):
        load_digits(test_fraction=bad)


@pytest.mark.parametrize("bad", ["0.2", None, True, [0.2]])
def test_digits_rejects_test_fraction_of_wrong_type(bad):
    with pytest.raises(ConfigError, match=r"test_fraction.*\(0, 1\)"):
        load_digits(test_fraction=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, "0", None, True])
def test_digits_rejects_bad_seed(bad):
    with pytest.raises(ConfigError, match="seed"):
        load_digits(seed=bad)


def test_digits_accepts_numpy_scalars():
    x_train, *_ = load_digits(test_fraction=np.float64(0.5), seed=np.int64(2))
    assert x_train.shape[0] == sum(n - math.floor(0.5 * n + 0.5) for n in KNOWN_CLASS_COUNTS)


def _gz_rows(rows: list[str]) -> bytes:
    return gzip.compress(("\n".join(rows) + "\n").encode("ascii"), compresslevel=1)


def _good_rows() -> list[str]:
    raw = resources.files("qatcore.data").joinpath("_data").joinpath("digits.csv.gz").read_bytes()
    return gzip.decompress(raw).decode("ascii").split()


def test_digits_parser_accepts_the_shipped_file():
    counts, labels = digits_module._parse_digits_csv(_gz_rows(_good_rows()), "digits.csv.gz")
    assert counts.shape == (1797, 64) and counts.dtype == np.uint8
    assert np.bincount(labels).tolist() == KNOWN_CLASS_COUNTS


def _damaged_files() -> dict[str, tuple[bytes, str]]:
    rows = _good_rows()
    wide = rows.copy()
    wide[5] += ",3"
    word = rows.copy()
    word[7] = word[7].replace("0", "x", 1)
    bright = rows.copy()
    bright[0] = "17" + bright[0][1:]
    bad_label = rows.copy()
    bad_label[0] = bad_label[0].rsplit(",", 1)[0] + ",10"
    no_nines = [r if not r.endswith(",9") else r[:-1] + "8" for r in rows]
    return {
        "not gzip": (b"hello, this is not gzip", "gzip"),
        "truncated gzip": (_gz_rows(rows)[:1000], "gzip"),
        "missing rows": (_gz_rows(rows[:-3]), "1794 rows"),
        "extra column": (_gz_rows(wide), "row 6 has 66"),
        "not a number": (_gz_rows(word), "row 8"),
        "pixel out of range": (_gz_rows(bright), "pixel values"),
        "label out of range": (_gz_rows(bad_label), "labels"),
        "class missing": (_gz_rows(no_nines), r"class\(es\) \[9\]"),
    }


@pytest.mark.parametrize("case", sorted(_damaged_files()))
def test_digits_parser_rejects_a_damaged_file(case):
    raw, message = _damaged_files()[case]
    with pytest.raises(DataError, match=message) as info:
        digits_module._parse_digits_csv(raw, "digits.csv.gz")
    assert "digits.csv.gz" in str(info.value)


def _zip_package(tmp_path: pathlib.Path, name: str, with_data: bool) -> pathlib.Path:
    archive = tmp_path / f"{name}.zip"
    raw = resources.files("qatcore.data").joinpath("_data").joinpath("digits.csv.gz").read_bytes()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "")
        if with_data:
            zf.writestr(f"{name}/_data/digits.csv.gz", raw)
    return archive


@pytest.mark.parametrize("with_data", [True, False])
def test_digits_file_is_read_from_a_zip_package(tmp_path, monkeypatch, with_data):
    name = f"qatcore_zip_probe_{int(with_data)}"
    monkeypatch.syspath_prepend(str(_zip_package(tmp_path, name, with_data)))
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(name)
        assert module.__spec__.loader.__class__.__name__ == "zipimporter"
        if with_data:
            raw = digits_module._read_packaged_file(name)
            counts, labels = digits_module._parse_digits_csv(raw, "digits.csv.gz")
            assert counts.shape == (1797, 64) and labels.shape == (1797,)
        else:
            with pytest.raises(DataError, match="missing"):
                digits_module._read_packaged_file(name)
    finally:
        sys.modules.pop(name, None)


# ------------------------------------------------------------------------- DataLoader


def _labels_of_epoch(loader: DataLoader) -> list[int]:
    return [int(v) for _, yb in loader for v in yb]


@settings(max_examples=60, deadline=None)
@given(num_samples=st.integers(0, 40), batch_size=st.integers(1, 12), shuffle=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_loader_covers_every_sample_once_per_epoch(num_samples, batch_size, shuffle, seed):
    x = np.arange(num_samples * 3, dtype=np.float32).reshape(num_samples, 3)
    y = np.arange(num_samples)
    loader = DataLoader(x, y, batch_size=batch_size, shuffle=shuffle,
                        rng=np.random.default_rng(seed) if shuffle else None)
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader) == math.ceil(num_samples / batch_size)
        seen = []
        for xb, yb in batches:
            assert len(yb) >= 1 and len(yb) <= batch_size and xb.shape == (len(yb), 3)
            np.testing.assert_array_equal(xb[:, 0], yb * 3)  # x and y stay paired
            seen.extend(yb.tolist())
        assert sorted(seen) == list(range(num_samples))
        if not shuffle:
            assert seen == list(range(num_samples))


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_drop_last(shuffle):
    x, y = np.zeros((10, 2)), np.arange(10)
    rng = np.random.default_rng(0) if shuffle else None
    kept = DataLoader(x, y, batch_size=4, shuffle=shuffle, rng=rng, drop_last=False)
    dropped = DataLoader(x, y, batch_size=4, shuffle=shuffle, rng=rng, drop_last=True)
    assert len(kept) == 3 and [len(yb) for _, yb in kept] == [4, 4, 2]
    assert len(dropped) == 2 and [len(yb) for _, yb in dropped] == [4, 4]
    exact = DataLoader(x[:8], y[:8], batch_size=4, drop_last=True)
    assert len(exact) == 2 and sorted(_labels_of_epoch(exact)) == list(range(8))
    assert len(DataLoader(x[:3], y[:3], batch_size=4, drop_last=True)) == 0
    assert list(DataLoader(x[:3], y[:3], batch_size=4, drop_last=True)) == []


def test_loader_len():
    x, y = np.zeros((1438, 1, 8, 8), np.float32), np.zeros(1438, np.int64)
    assert len(DataLoader(x, y)) == 23
    assert len(DataLoader(x, y, batch_size=1438)) == 1
    assert len(DataLoader(x, y, batch_size=5000)) == 1
    assert len(DataLoader(x, y, batch_size=5000, drop_last=True)) == 0
    assert len(DataLoader(x[:0], y[:0])) == 0


def test_loader_without_shuffle_yields_views_of_the_arrays():
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10)
    (xb, yb), *_ = DataLoader(x, y, batch_size=4)
    assert np.shares_memory(xb, x) and np.shares_memory(yb, y)
    np.testing.assert_array_equal(xb, x[:4])


def test_loader_shuffle_differs_between_epochs_and_is_reproducible():
    x, y = np.zeros((50, 1)), np.arange(50)
    loader = DataLoader(x, y, batch_size=8, shuffle=True, rng=np.random.default_rng(42))
    epochs = [_labels_of_epoch(loader) for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert all(sorted(e) == list(range(50)) for e in epochs)
    assert epochs[0] != list(range(50))
    again = DataLoader(x, y, batch_size=8, shuffle=True, rng=np.random.default_rng(42))
    assert [_labels_of_epoch(again) for _ in range(3)] == epochs
    other = DataLoader(x, y, batch_size=8, shuffle=True, rng=np.random.default_rng(43))
    assert _labels_of_epoch(other) != epochs[0]


def test_loader_new_iter_starts_a_new_epoch():
    loader = DataLoader(np.zeros((12, 1)), np.arange(12), batch_size=4, shuffle=True,
                        rng=np.random.default_rng(0))
    reference = DataLoader(np.zeros((12, 1)), np.arange(12), batch_size=4, shuffle=True,
                           rng=np.random.default_rng(0))
    abandoned = iter(loader)
    next(abandoned)
    second_epoch = _labels_of_epoch(loader)  # a fresh iter() abandons the first epoch
    _labels_of_epoch(reference)
    assert second_epoch == _labels_of_epoch(reference)
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["next_batch"] == 3


EPOCHS = 3


def _make_loader(seed: int, shuffle: bool = True, drop_last: bool = False) -> DataLoader:
    x = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    y = np.arange(23, dtype=np.int64)
    rng = np.random.default_rng(seed) if shuffle else None
    return DataLoader(x, y, batch_size=5, shuffle=shuffle, rng=rng, drop_last=drop_last)


def _uninterrupted(shuffle: bool, drop_last: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    loader = _make_loader(7, shuffle, drop_last)
    return [batch for _ in range(EPOCHS) for batch in loader]


def _interrupted(shuffle: bool, drop_last: bool, epoch: int, taken: int,
                 copy_state: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run ``epoch`` full epochs and ``taken`` batches of the next, save, and continue
    in a new loader whose generator has another seed (so only the state can help)."""
    loader = _make_loader(7, shuffle, drop_last)
    produced = [batch for _ in range(epoch) for batch in loader]
    batches = iter(loader)
    produced += [next(batches) for _ in range(taken)]
    state = loader.state_dict()
    if copy_state:  # the state must not depend on sharing objects with the old loader
        state = copy.deepcopy(state)
    resumed = _make_loader(999, shuffle, drop_last)
    resumed.load_state_dict(state)
    if taken < len(resumed):
        produced += list(resumed)  # the rest of the interrupted epoch
    for _ in range(epoch + 1, EPOCHS):
        produced += list(resumed)
    return produced


@pytest.mark.parametrize(("shuffle", "drop_last"), [(True, False), (True, True), (False, False)])
def test_loader_resumes_mid_epoch_exactly(shuffle, drop_last):
    reference = _uninterrupted(shuffle, drop_last)
    num_batches = len(_make_loader(0, shuffle, drop_last))
    assert len(reference) == EPOCHS * num_batches
    for epoch in range(EPOCHS):
        for taken in range(num_batches + 1):
            produced = _interrupted(shuffle, drop_last, epoch, taken, copy_state=taken % 2 == 1)
            assert len(produced) == len(reference), (epoch, taken)
            for (xa, ya), (xb, yb) in zip(produced, reference):
                np.testing.assert_array_equal(ya, yb)
                np.testing.assert_array_equal(xa, xb)


def test_loader_resumes_from_a_state_saved_before_the_first_epoch():
    reference = _uninterrupted(True, False)
    fresh = _make_loader(7)
    resumed = _make_loader(999)
    resumed.load_state_dict(fresh.state_dict())
    produced = [batch for _ in range(EPOCHS) for batch in resumed]
    assert [yb.tolist() for _, yb in produced] == [yb.tolist() for _, yb in reference]


def test_loader_state_dict_is_plain_and_a_copy():
    loader = _make_loader(3)
    batches = iter(loader)
    next(batches)
    next(batches)
    state = loader.state_dict()
    assert set(state) == {"num_samples", "batch_size", "drop_last", "shuffle", "epoch",
                          "next_batch", "rng_state", "order"}
    assert state["epoch"] == 1 and state["next_batch"] == 2
    assert state["num_samples"] == 23 and state["batch_size"] == 5
    assert isinstance(state["order"], np.ndarray) and state["order"].dtype == np.int64
    assert sorted(state["order"].tolist()) == list(range(23))
    assert isinstance(state["rng_state"], dict)
    assert state["rng_state"]["bit_generator"] == "PCG64"
    # the recorded rng state is the epoch's start: it redraws the epoch's order
    replay = np.random.default_rng()
    replay.bit_generator.state = state["rng_state"]
    np.testing.assert_array_equal(replay.permutation(23), state["order"])
    # mutating the returned dict does not reach into the loader
    state["order"][:] = 0
    state["rng_state"]["state"]["state"] = 1
    assert sorted(loader.state_dict()["order"].tolist()) == list(range(23))
    assert loader.state_dict()["rng_state"]["state"]["state"] != 1
    plain = _make_loader(0, shuffle=False).state_dict()
    assert plain["rng_state"] is None and plain["order"] is None


def _saved_state() -> dict:
    loader = _make_loader(7)
    batches = iter(loader)
    next(batches)
    return loader.state_dict()


def _tampered(key, value=None, delete=False) -> dict:
    state = _saved_state()
    if delete:
        del state[key]
    else:
        state[key] = value
    return state


@pytest.mark.parametrize(
    ("state", "key"),
    [
        (_tampered("epoch", delete=True), "epoch"),
        (_tampered("rng_state", delete=True), "rng_state"),
        (_tampered("bogus", 1), "bogus"),
        (_tampered("num_samples", 24), "num_samples"),
        (_tampered("batch_size", 4), "batch_size"),
        (_tampered("drop_last", True), "drop_last"),
        (_tampered("shuffle", False), "shuffle"),
        (_tampered("next_batch", 6), "next_batch"),
        (_tampered("next_batch", -1), "next_batch"),
        (_tampered("next_batch", 1.5), "next_batch"),
        (_tampered("epoch", "1"), "epoch"),
        (_tampered("order", None), "order"),
        (_tampered("order", np.arange(22)), "order"),
        (_tampered("order", np.arange(23)), "order"),
        (_tampered("rng_state", "PCG64"), "rng_state"),
        (_tampered("rng_state", np.random.Philox(0).state), "rng_state"),
        (_tampered("rng_state", {"bit_generator": "PCG64"}), "rng_state"),
    ],
)
def test_loader_load_state_dict_names_the_bad_key(state, key):
    loader = _make_loader(7)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        loader.load_state_dict(state)


def test_loader_load_state_dict_rejects_other_bad_states():
    with pytest.raises(ConfigError, match="must be a dict"):
        _make_loader(7).load_state_dict([("epoch", 1)])
    plain_state = _make_loader(0, shuffle=False).state_dict()
    plain_state["order"] = np.arange(23)
    with pytest.raises(ConfigError, match="'order' must be None"):
        _make_loader(0, shuffle=False).load_state_dict(plain_state)
    fresh_state = _make_loader(7).state_dict()
    fresh_state["next_batch"] = 2
    with pytest.raises(ConfigError, match="'next_batch' must be 0"):
        _make_loader(7).load_state_dict(fresh_state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"y": np.arange(9)}, "same length"),
        ({"x": [[1.0]] * 10}, "x must be a numpy array"),
        ({"y": np.float32(3.0)}, "y must be a numpy array"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -2}, "batch_size"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": "8"}, "batch_size"),
        ({"shuffle": 1, "rng": np.random.default_rng(0)}, "shuffle"),
        ({"drop_last": None}, "drop_last"),
        ({"shuffle": True, "rng": np.random.RandomState(0)}, "rng must be a numpy.random.Gen"),
        ({"rng": 0}, "rng"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs, message):
    arguments = {"x": np.zeros((10, 2)), "y": np.arange(10)} | kwargs
    with pytest.raises(ConfigError, match=message):
        DataLoader(**arguments)


def test_loader_accepts_numpy_integer_batch_size():
    loader = DataLoader(np.zeros((10, 2)), np.arange(10), batch_size=np.int64(3))
    assert len(loader) == 4 and loader.batch_size == 3 and type(loader.batch_size) is int


# ------------------------------------------------------------------------------ MNIST

_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
          np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array)
    header = bytes([0, 0, _CODES[array.dtype], array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx(path: pathlib.Path, array: np.ndarray) -> pathlib.Path:
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _fake_mnist(folder: pathlib.Path, train: int = 5, test: int = 3, side: tuple = (4, 3),
                gz: bool = False, dotted: bool = False, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images": rng.integers(0, 256, (train, *side), dtype=np.uint8),
        "train-labels": rng.integers(0, 10, train, dtype=np.uint8),
        "t10k-images": rng.integers(0, 256, (test, *side), dtype=np.uint8),
        "t10k-labels": rng.integers(0, 10, test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        kind = "idx3" if array.ndim == 3 else "idx1"
        name = f"{stem}{'.' if dotted else '-'}{kind}-ubyte{'.gz' if gz else ''}"
        _write_idx(folder / name, array)
    return arrays


@pytest.mark.parametrize(("gz", "dotted"), [(False, False), (True, False), (False, True),
                                            (True, True)])
def test_mnist_loads_plain_and_gzipped_files(tmp_path, gz, dotted):
    arrays = _fake_mnist(tmp_path, gz=gz, dotted=dotted)
    x_train, y_train, x_test, y_test = load_mnist_idx(tmp_path)
    assert x_train.shape == (5, 1, 4, 3) and x_test.shape == (3, 1, 4, 3)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    np.testing.assert_array_equal(x_train[:, 0] * np.float32(255), arrays["train-images"])
    np.testing.assert_allclose(x_test[:, 0], arrays["t10k-images"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y_train, arrays["train-labels"])
    np.testing.assert_array_equal(y_test, arrays["t10k-labels"])
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0


def test_mnist_extreme_pixels_map_to_0_and_1(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte",
               np.array([[[0, 255]], [[128, 1]]], dtype=np.uint8))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([4, 2], dtype=np.uint8))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 1, 2), np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1], np.uint8))
    x_train, y_train, _, _ = load_mnist_idx(str(tmp_path))
    expected = np.array([[0.0, 1.0], [128 / 255, 1 / 255]], dtype=np.float32)
    np.testing.assert_array_equal(x_train[:, 0, 0, :], expected)
    assert y_train.tolist() == [4, 2]


def test_mnist_prefers_the_uncompressed_file(tmp_path):
    plain = _fake_mnist(tmp_path, seed=1)
    _fake_mnist(tmp_path, gz=True, seed=2)
    _, y_train, _, _ = load_mnist_idx(tmp_path)
    np.testing.assert_array_equal(y_train, plain["train-labels"])


def test_mnist_missing_file_lists_the_names_looked_for(tmp_path):
    _fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as info:
        load_mnist_idx(tmp_path)
    message = str(info.value)
    for name in ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte",
                 "t10k-labels-idx1-ubyte.gz", "t10k-labels.idx1-ubyte.gz"):
        assert name in message
    assert str(tmp_path) in message and "test labels" in message


def test_mnist_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist or is not a directory"):
        load_mnist_idx(tmp_path / "nowhere")


def test_mnist_count_mismatch_names_both_files(tmp_path):
    _fake_mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    with pytest.raises(DataError) as info:
        load_mnist_idx(tmp_path)
    message = str(info.value)
    assert "5 images" in message and "4 labels" in message
    assert "train-images-idx3-ubyte" in message and "train-labels-idx1-ubyte" in message


def test_mnist_rejects_wrong_array_kinds(tmp_path):
    _fake_mnist(tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 4, 3), np.float32))
    with pytest.raises(DataError, match="test images .* 3-D uint8"):
        load_mnist_idx(tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 4, 3), np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((3, 1), np.uint8))
    with pytest.raises(DataError, match="test labels .* 1-D integer"):
        load_mnist_idx(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 5, 3), np.uint8))
    with pytest.raises(DataError, match="4x3 but test images are 5x3"):
        load_mnist_idx(tmp_path)


@settings(max_examples=80, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(sorted(_CODES, key=str)),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    ),
    compressed=st.booleans(),
)
def test_read_idx_round_trips_random_arrays(array, compressed):
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / ("array.idx" + (".gz" if compressed else ""))
        _write_idx(path, array)
        loaded = read_idx(path)
    assert loaded.shape == array.shape
    assert loaded.dtype == array.dtype and loaded.dtype.isnative
    assert loaded.flags.writeable
    np.testing.assert_array_equal(loaded, array)  # NaNs compare equal here


def test_read_idx_reads_big_endian_values(tmp_path):
    path = tmp_path / "values.idx"
    header = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2])
    path.write_bytes(header + bytes([0, 0, 1, 0, 0xFF, 0xFF, 0xFF, 0xFE]))
    assert read_idx(path).tolist() == [256, -2]


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x00", "truncated: it has 2 bytes"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x03\x00\x00", r"truncated in its header: 2 dim"),
        (_idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))[:-1],
         r"truncated: .*shape \(3, 4\).*needs 12 data bytes, but 11 are present"),
        (_idx_bytes(np.arange(6, dtype=np.int32))[:-4], r"truncated: .*needs 24 .*20 are"),
        (_idx_bytes(np.arange(6, dtype=np.int32)) + b"\x00", "has bytes after the declared data"),
        (b"\x01\x02\x08\x01\x00\x00\x00\x01\x07", "bad magic 01 02 08 01"),
        (b"\x00\x00\x0a\x01\x00\x00\x00\x01\x07", r"unknown dtype code 0x0A.*0x08 uint8"),
        (b"\x00\x00\x08\x00", "declares 0 dimensions"),
        (b"\x00\x00\x08\x02\xff\xff\xff\xff\xff\xff\xff\xff\x01\x02",
         r"truncated: .*needs 18446744065119617025 data bytes, but 2"),
    ],
)
def test_read_idx_rejects_damaged_files(tmp_path, compressed, content, message):
    path = tmp_path / ("broken-idx" + (".gz" if compressed else ""))
    path.write_bytes(gzip.compress(content) if compressed else content)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_hints_at_a_missing_gz_suffix(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(gzip.compress(_idx_bytes(np.arange(3, dtype=np.uint8))))
    with pytest.raises(DataError, match="bad magic 1f 8b.*name it with a .gz suffix"):
        read_idx(path)


def test_read_idx_rejects_a_broken_gzip_stream(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="could not be read.*gzip") as info:
        read_idx(path)
    assert "labels.gz" in str(info.value)
    truncated = tmp_path / "short.gz"
    truncated.write_bytes(gzip.compress(_idx_bytes(np.arange(300, dtype=np.int32)))[:-30])
    with pytest.raises(DataError, match="short.gz"):
        read_idx(truncated)


def test_read_idx_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "absent-idx1-ubyte")
    with pytest.raises(DataError, match="is a directory"):
        read_idx(tmp_path)


def test_errors_belong_to_the_qatcore_hierarchy(tmp_path):
    with pytest.raises(QATCoreError):
        load_mnist_idx(tmp_path)
    with pytest.raises(QATCoreError):
        load_digits(test_fraction=2)
