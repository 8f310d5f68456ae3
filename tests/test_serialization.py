"""Tests for qatcore.serialization: exact round trips, refused values, bad files, fuzzing
and hand-built hostile payloads."""

from __future__ import annotations

import collections
import doctest
import enum
import os
import pathlib
import struct
import tracemalloc
import zlib

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qatcore
from qatcore import serialization
from qatcore.errors import SerializationError
from qatcore.serialization import dumps, load, loads, save

# The container exactly as the module docstring specifies it; written out here rather
# than imported so the tests pin the format independently of the implementation.
HEADER = struct.Struct("<8sHHQI")
DTYPE_NAMES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
)
DTYPES = [np.dtype(name) for name in DTYPE_NAMES]


def make_file(payload: bytes, *, version: int = 1, flags: int = 0, magic: bytes = b"QATCSAVE") -> bytes:
    """A qatcore file around ``payload`` with a valid length and checksum."""
    return HEADER.pack(magic, version, flags, len(payload), zlib.crc32(payload)) + payload


def array_ext(dtype: str, shape: list, raw: bytes, code: int = 2) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb([dtype, shape]) + raw)


def same(loaded, expected) -> bool:
    """True when ``loaded`` is what loading ``expected`` must give: same types all the way
    down, same bits, same dict order; arrays in C order, little-endian, writable, owning."""
    if isinstance(expected, np.ndarray):
        canonical = expected.astype(expected.dtype.newbyteorder("<"))
        return (
            type(loaded) is np.ndarray
            and loaded.dtype.str == canonical.dtype.str
            and loaded.shape == canonical.shape
            and loaded.tobytes() == canonical.tobytes()
            and loaded.flags.c_contiguous
            and loaded.flags.writeable
            and loaded.flags.owndata
        )
    if type(loaded) is not type(expected):
        return False
    if isinstance(expected, np.generic):
        return loaded.tobytes() == expected.tobytes()
    if isinstance(expected, float):
        return struct.pack("<d", loaded) == struct.pack("<d", expected)
    if isinstance(expected, (list, tuple)):
        return len(loaded) == len(expected) and all(map(same, loaded, expected))
    if isinstance(expected, dict):
        return same(list(loaded), list(expected)) and all(
            same(loaded[key], value) for key, value in expected.items()
        )
    return loaded == expected


def assert_round_trip(obj, tmp_path: pathlib.Path | None = None) -> None:
    assert same(loads(dumps(obj)), obj)
    if tmp_path is not None:
        path = tmp_path / "obj.qat"
        save(obj, path)
        assert same(load(path), obj)


def float_from_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


# --------------------------------------------------------------------------- round trips

SCALARS = [
    None, True, False, 0, 1, -1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1,
    0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 5e-324, 1.7976931348623157e308,
    "", "hello", "héllo ✓ 量子化", "\x00", "a" * 70_000,
    b"", b"\x00\xff", bytes(range(256)) * 300,
    [], (), {}, ((),), ([],), [()], {"": {}}, (None,),
]


@pytest.mark.parametrize("obj", SCALARS, ids=lambda obj: type(obj).__name__)
def test_round_trip_python_values(obj, tmp_path):
    assert_round_trip(obj, tmp_path)


def test_round_trip_float_bits_including_nan_payloads():
    patterns = [
        0x7FF8000000000000,  # the usual quiet NaN
        0xFFF8000000000000,  # negative NaN
        0x7FF8000000000123,  # quiet NaN with a payload
        0x7FF0000000000001,  # signalling NaN
        0x8000000000000000,  # -0.0
        0x0000000000000001,  # smallest subnormal
    ]
    values = [float_from_bits(bits) for bits in patterns]
    loaded = loads(dumps(values))
    assert [struct.pack("<d", value) for value in loaded] == [struct.pack("<Q", b) for b in patterns]

    for dtype, bits in (("<u2", [0x7E01, 0xFC01]), ("<u4", [0x7FC00001, 0x7F800001]),
                        ("<u8", [0x7FF8000000000123, 0x7FF0000000000001])):
        unsigned = np.array(bits, dtype=dtype)
        array = unsigned.view(f"<f{unsigned.itemsize}")
        loaded = loads(dumps(array))
        assert loaded.view(dtype).tolist() == bits
        assert np.array_equal(loaded, array, equal_nan=True)


def test_dict_keys_keep_type_and_insertion_order():
    obj = {"b": 1, 3: "x", -(2**63): None, 2**64 - 1: [1], "a": {"z": 0, "y": 1}, 0: (), "0": ()}
    loaded = loads(dumps(obj))
    assert list(loaded) == list(obj)
    assert [type(key) for key in loaded] == [type(key) for key in obj]
    assert list(loaded["a"]) == ["z", "y"]
    assert same(loaded, obj)


def test_tuples_stay_tuples_and_lists_stay_lists(tmp_path):
    obj = ((1, [2, (3,)]), [(), [()]], {"t": (None, (True,))}, ())
    loaded = loads(dumps(obj))
    assert type(loaded) is tuple and type(loaded[0][1]) is list and type(loaded[0][1][1]) is tuple
    assert loaded == obj
    assert_round_trip(obj, tmp_path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (2, 3), (3, 0, 2), (2, 1, 3, 1), (1,) * 32])
def test_round_trip_arrays(dtype, shape):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    if dtype == np.bool_:
        raw = raw % 2
    array = raw.view(dtype).reshape(shape)  # arbitrary bits, NaNs included
    loaded = loads(dumps(array))
    assert same(loaded, array)
    assert loaded.dtype == dtype and loaded.shape == shape
    assert np.array_equal(loaded, array, equal_nan=dtype.kind == "f")


def test_non_contiguous_fortran_and_big_endian_arrays_load_as_c_order_little_endian():
    base = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    cases = [
        base[::2, ::-1, 1::2],
        base.transpose(2, 0, 1),
        np.asfortranarray(base),
        base.astype(">f4"),
        np.arange(10, dtype=">i8")[::3],
        np.array(2.5, dtype=">f8"),
        np.asfortranarray(np.arange(6, dtype=">u2").reshape(2, 3)),
        np.broadcast_to(np.arange(3, dtype=np.int16), (4, 3)),  # zero strides, read-only
    ]
    for array in cases:
        loaded = loads(dumps(array))
        assert same(loaded, array)
        assert np.array_equal(loaded, array)
        assert loaded.dtype == array.dtype.newbyteorder("=")
        assert loaded.dtype.isnative and loaded.flags.c_contiguous


def test_loaded_arrays_are_writable_and_own_their_memory():
    loaded = loads(dumps({"w": np.ones((2, 2), np.float32), "s": np.array(3, np.int8)}))
    for array in loaded.values():
        assert array.flags.writeable and array.flags.owndata
        array[...] = 0  # must not raise
    assert loaded["w"].sum() == 0 and loaded["s"] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_numpy_scalars_come_back_as_numpy_scalars(dtype):
    scalar = dtype.type(1)
    loaded = loads(dumps(scalar))
    assert type(loaded) is dtype.type
    assert not isinstance(loaded, np.ndarray)
    assert loaded == scalar
    assert same(loads(dumps([scalar, (scalar,)])), [scalar, (scalar,)])


def test_float32_scalar_is_not_a_zero_d_array():
    loaded = loads(dumps(np.float32(1.5)))
    assert type(loaded) is np.float32 and loaded == np.float32(1.5)
    assert type(loads(dumps(np.float64(-0.0)))) is np.float64
    assert type(loads(dumps(np.array(1.5, np.float32)))) is np.ndarray


def test_state_dict_like_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    state = {
        "model": {
            "layers": [
                {"weight": rng.standard_normal((8, 4)).astype(np.float32),
                 "bias": np.zeros(8, np.float32),
                 "observer": {"min": np.float32(-1.0), "max": np.float32(1.0), "enabled": True}},
                {"weight": rng.standard_normal((2, 8)).astype(np.float16), "bias": None},
            ],
        },
        "optimizer": {"step": 12, "lr": 1e-3, "betas": (0.9, 0.999), 0: {"m": np.ones(3)}},
        "rng": {"seed": 2**64 - 1, "note": b"\x00"},
    }
    assert_round_trip(state, tmp_path)


def test_nesting_up_to_the_depth_limit(tmp_path):
    deepest = 0
    for _ in range(255):
        deepest = [deepest]
    assert_round_trip(deepest, tmp_path)
    for container in (list, tuple):
        obj = 1
        for _ in range(256):
            obj = container([obj])
        assert same(loads(dumps(obj)), obj)
        with pytest.raises(SerializationError, match="deeper than 256"):
            dumps(container([obj]))


def test_self_containing_object_is_refused_not_a_recursion_error():
    looping = [1]
    looping.append(looping)
    with pytest.raises(SerializationError, match=r"deeper than 256.*contain itself"):
        dumps(looping)
    mapping = {}
    mapping["self"] = mapping
    with pytest.raises(SerializationError, match=r"obj\['self'\]\['self'\]"):
        dumps(mapping)


# --------------------------------------------------------------------------- hypothesis

KEYS = st.one_of(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1))


def numpy_arrays():
    layouts = [
        lambda a: a,
        lambda a: a[..., ::-1] if a.ndim else a,
        lambda a: a.T,
        lambda a: np.asfortranarray(a),
        lambda a: a.astype(a.dtype.newbyteorder(">")),
    ]
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
    return st.builds(
        lambda array, layout: layout(array),
        st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(dtype, shapes)),
        st.sampled_from(layouts),
    )


def numpy_scalars():
    return st.sampled_from(DTYPES).flatmap(
        lambda dtype: hnp.from_dtype(dtype).map(lambda value: dtype.type(value))
    )


LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
    st.text(max_size=12), st.binary(max_size=12), numpy_arrays(), numpy_scalars(),
)
OBJECTS = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(KEYS, children, max_size=4),
    ),
    max_leaves=20,
)
HYPOTHESIS = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@settings(HYPOTHESIS, max_examples=200)
@given(OBJECTS)
def test_random_objects_round_trip_through_bytes(obj):
    data = dumps(obj)
    assert same(loads(data), obj)
    assert dumps(loads(data)) == data  # canonical: loading and saving again is a fixed point


@settings(HYPOTHESIS, max_examples=40)
@given(OBJECTS)
def test_random_objects_round_trip_through_files(obj):
    import tempfile  # a function-scoped tmp_path fixture does not mix with @given

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "random.qat")
        save(obj, path)
        assert same(load(path), obj)
        assert os.listdir(tmp) == ["random.qat"]


# --------------------------------------------------------------------------- refusals


class Point(collections.namedtuple("Point", "x y")):
    pass


class Color(enum.IntEnum):
    RED = 1


class Opaque:
    pass


class FloatSubclass(float):
    pass


UNSUPPORTED = [
    (1 + 2j, "complex"),
    ({1, 2}, "set"),
    (frozenset(), "frozenset"),
    (bytearray(b"x"), "bytearray"),
    (memoryview(b"x"), "memoryview"),
    (Opaque(), "Opaque"),
    (Opaque, "type"),
    (len, "builtin_function_or_method"),
    (collections.OrderedDict(a=1), "OrderedDict"),
    (Point(1, 2), "Point"),
    (Color.RED, "Color"),
    (FloatSubclass(1.0), "FloatSubclass"),
    (np.array([1, "a"], dtype=object), "dtype object"),
    (np.zeros(2, np.complex128), "dtype complex128"),
    (np.zeros(2, "U3"), "dtype <U3"),
    (np.zeros(2, "datetime64[ns]"), "datetime64"),
    (np.zeros(2, [("a", "f4"), ("b", "i4")]), "numpy array of dtype"),
    (np.zeros(2, "V8"), "dtype |V8"),
    (np.complex64(1), "numpy scalar of dtype complex64"),
    (np.str_("x"), "numpy scalar of dtype <U1"),
    (np.longlong(1), "numpy.longlong"),
    (np.ma.masked_array([1, 2]), "MaskedArray"),
    (np.recarray(2, dtype=[("a", "f4")]), "recarray"),
]


@pytest.mark.parametrize(("value", "named"), UNSUPPORTED, ids=lambda v: type(v).__name__)
def test_unsupported_values_are_refused_naming_their_path(value, named, tmp_path):
    obj = {"model": {"layers": [0, 1, (2,), value]}}
    with pytest.raises(SerializationError) as info:
        dumps(obj)
    message = str(info.value)
    assert "obj['model']['layers'][3]" in message
    assert named in message
    assert "accepts None, bool, int" in message or "load as" in message
    with pytest.raises(SerializationError):
        save(obj, tmp_path / "never.qat")
    assert list(tmp_path.iterdir()) == []


def test_tensor_is_refused_with_a_hint():
    with pytest.raises(SerializationError, match=r"obj\[0\]: type qatcore.tensor.Tensor.*numpy\(\)"):
        dumps([qatcore.tensor([1.0, 2.0])])


@pytest.mark.parametrize(
    ("obj", "pattern"),
    [
        ([0, {"x": 10**5000}], r"obj\[1\]\['x'\]: int of 16610 bits is larger than"),
        ({2**64: 1}, r"obj\[18446744073709551616\]: dict key"),
        ({"ok": {1.5: 0}}, r"obj\['ok'\]: dict key 1.5 has type float"),
        ({(1, 2): 0}, r"obj: dict key \(1, 2\) has type tuple"),
        ({True: 0}, r"dict key True has type bool"),
        ({None: 0}, r"dict key None has type NoneType"),
        ({b"k": 0}, r"dict key b'k' has type bytes"),
        (["ok", "\ud800"], r"obj\[1\]: str is not valid Unicode"),
        ({"\udfff": 1}, r"obj\['\\udfff'\]: dict key is not valid Unicode"),
    ],
)
def test_huge_ints_bad_keys_and_bad_strings_are_refused(obj, pattern):
    with pytest.raises(SerializationError, match=pattern):
        dumps(obj)


def test_long_paths_are_abbreviated():
    obj = 1j
    for _ in range(40):
        obj = [obj]
    with pytest.raises(SerializationError, match=r"obj(\[0\]){8}\.\.\.26 more\.\.\.(\[0\]){6}:"):
        dumps(obj)


def test_failed_save_leaves_an_existing_file_untouched(tmp_path):
    path = tmp_path / "ckpt.qat"
    save({"step": 1}, path)
    before = path.read_bytes()
    with pytest.raises(SerializationError, match=r"obj\['step'\]"):
        save({"step": {1, 2}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.qat"]
    assert load(path) == {"step": 1}


def test_failed_write_removes_the_temporary_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.qat"
    save([1], path)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SerializationError, match="No space left") as info:
        save([2], path)
    assert isinstance(info.value.__cause__, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.qat"]
    monkeypatch.undo()
    assert load(path) == [1]


def test_save_is_atomic_rename_from_the_same_directory(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.qat"
    save("old", path)
    seen = []
    real_replace = os.replace

    def spy(source, destination):
        seen.append((source, destination, load(path), loads(pathlib.Path(source).read_bytes())))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", spy)
    save("new", path)
    (source, destination, old_at_rename, new_at_rename), = seen
    assert os.path.dirname(source) == str(tmp_path) and destination == str(path)
    assert old_at_rename == "old" and new_at_rename == "new"
    assert load(path) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.qat"]


def test_saved_file_mode_follows_the_umask(tmp_path):
    old_umask = os.umask(0o022)
    try:
        save(1, tmp_path / "mode.qat")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "mode.qat").stat().st_mode & 0o777 == 0o644


def test_save_accepts_str_and_pathlike(tmp_path):
    class CustomPath(os.PathLike):
        def __fspath__(self):
            return str(tmp_path / "custom.qat")

    save(1, str(tmp_path / "str.qat"))
    save(2, tmp_path / "pathlib.qat")
    save(3, CustomPath())
    assert (load(str(tmp_path / "str.qat")), load(tmp_path / "pathlib.qat"), load(CustomPath())) == (1, 2, 3)
    with pytest.raises(SerializationError, match="path must be a str or os.PathLike"):
        save(1, 42)
    with pytest.raises(SerializationError, match="path must be a str or os.PathLike"):
        load(b"/bytes/path")


def test_save_into_a_missing_directory_names_the_path(tmp_path):
    path = tmp_path / "missing" / "ckpt.qat"
    with pytest.raises(SerializationError, match="does not exist") as info:
        save(1, path)
    assert str(path) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_save_onto_a_directory_fails_cleanly(tmp_path):
    (tmp_path / "ckpt.qat").mkdir()
    with pytest.raises(SerializationError, match="cannot save to"):
        save(1, tmp_path / "ckpt.qat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.qat"]


def test_load_of_a_missing_file(tmp_path):
    with pytest.raises(SerializationError, match="nothing.qat") as info:
        load(tmp_path / "nothing.qat")
    assert isinstance(info.value.__cause__, FileNotFoundError)


# --------------------------------------------------------------------------- bad files


def test_file_layout_is_as_documented():
    data = dumps(None)
    assert data == b"QATCSAVE" + struct.pack("<HHQI", 1, 0, 1, zlib.crc32(b"\xc0")) + b"\xc0"
    array = np.arange(3, dtype=">i2")
    expected_payload = msgpack.packb(array_ext("<i2", [3], b"\x00\x00\x01\x00\x02\x00"))
    assert dumps(array) == make_file(expected_payload)
    expected_tuple = msgpack.packb([msgpack.ExtType(1, b""), 1, "a"])
    assert dumps((1, "a")) == make_file(expected_tuple)
    assert dumps(np.float32(1.0)) == make_file(msgpack.packb(array_ext("<f4", [], b"\x00\x00\x80\x3f", 3)))


def test_bytes_like_inputs_to_loads():
    data = dumps({"a": (1,)})
    assert loads(bytearray(data)) == loads(memoryview(data)) == {"a": (1,)}
    with pytest.raises(SerializationError, match="takes bytes, got str"):
        loads("QATCSAVE")


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (b"", "truncated"),
        (b"PK\x03\x04" + b"\x00" * 40, "not a qatcore file"),
        (b"\x80\x04\x95" + b"\x00" * 40, "not a qatcore file"),  # a pickle
        (b"qatcsave" + b"\x00" * 16, "not a qatcore file"),
        (make_file(b"\xc0", version=2), r"version 2; this qatcore reads version 1"),
        (make_file(b"\xc0", version=0), r"version 0; this qatcore reads version 1"),
        (make_file(b"\xc0", flags=1), "unknown flags 0x0001"),
        (make_file(b"\xc0") + b"\x00", "1 trailing bytes"),
        (make_file(b"\xc0")[:-1], "truncated payload"),
        (make_file(b"\xc0")[:-1] + b"\xc2", "checksum mismatch"),
        (make_file(b"\xc0")[:20] + b"\x00\x00\x00\x00" + b"\xc0", "checksum mismatch"),
    ],
)
def test_bad_containers(data, pattern):
    with pytest.raises(SerializationError, match=pattern):
        loads(data)


def test_every_truncation_and_trailing_garbage_is_refused(tmp_path):
    data = dumps({"w": np.arange(4, dtype=np.float32), "t": (1, "x"), "b": b"\x01"})
    for length in range(len(data)):
        with pytest.raises(SerializationError):
            loads(data[:length])
    for garbage in (b"\x00", b"\xc0", data):
        with pytest.raises(SerializationError, match="trailing bytes"):
            loads(data + garbage)
    path = tmp_path / "cut.qat"
    path.write_bytes(data[:30])
    with pytest.raises(SerializationError, match=r"cut\.qat.*truncated payload"):
        load(path)


def test_every_single_byte_corruption_is_caught_by_header_or_checksum():
    data = dumps([1.5, (np.int16(3), "abc")])
    for index in range(len(data)):
        corrupted = bytearray(data)
        corrupted[index] ^= 0xFF
        with pytest.raises(SerializationError):
            loads(bytes(corrupted))


# --------------------------------------------------------------------------- fuzzing


def fuzz_bases():
    rng = np.random.default_rng(2024)
    state_dict = {
        "conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "fc.weight": rng.standard_normal((3, 8)).astype(np.float32),
        "fc.scale": np.float32(0.05),
        "fc.zero_point": np.int32(-3),
    }
    nested = [1, (2.5, "x", [None, True, ()]), {"k": (b"\x00\x01", -7), 3: [[[]]]}, ((),), [(1,), [2]]]
    scalars = (0, -1, 2**64 - 1, -(2**63), 1.5, float("nan"), -0.0, np.float16(0.25),
               np.int8(-3), np.bool_(True), np.uint64(2**64 - 1), "ü", b"", None, False)
    return [state_dict, nested, scalars]


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random corruption: bit flips, a random byte, truncation, insertion or deletion."""
    out = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:
        for _ in range(rng.integers(1, 4)):
            out[rng.integers(len(out))] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        out[rng.integers(len(out))] = rng.integers(256)
    elif kind == 2:
        del out[rng.integers(len(out)):]
    elif kind == 3:
        at = rng.integers(len(out) + 1)
        out[at:at] = rng.integers(0, 256, size=rng.integers(1, 9), dtype=np.uint8).tobytes()
    else:
        start = rng.integers(len(out))
        del out[start:start + rng.integers(1, 9)]
    return bytes(out)


def test_fuzz_mutated_files_load_equal_or_raise_serialization_error():
    rng = np.random.default_rng(12345)
    bases = [(obj, dumps(obj)) for obj in fuzz_bases()]
    outcomes = collections.Counter()
    for case in range(3000):
        original, data = bases[case % len(bases)]
        payload = data[HEADER.size:]
        if case % 2:
            # Behind a recomputed header the payload parser is on its own: any result
            # must be made of storable values (dumps accepts it), or an error.
            mutated = mutate(payload, rng) if payload else payload
            try:
                result = loads(make_file(mutated))
            except SerializationError:
                outcomes["payload refused"] += 1
                continue
            assert same(loads(dumps(result)), result), (case, mutated)
            outcomes["payload loaded"] += 1
        else:
            try:
                result = loads(mutate(data, rng))
            except SerializationError:
                outcomes["file refused"] += 1
                continue
            assert same(result, original), case
            outcomes["file loaded"] += 1
    assert sum(outcomes.values()) == 3000
    # Both outcomes of the checksum-free path must actually be exercised.
    assert outcomes["payload refused"] > 200 and outcomes["payload loaded"] > 200, outcomes
    assert outcomes["file refused"] >= 1490, outcomes  # a random byte may equal the old one


# --------------------------------------------------------------------------- hostile payloads

HOSTILE_PAYLOADS = {
    "array of 10**12 elements with 4 bytes": msgpack.packb(array_ext("<f4", [10**6, 10**6], b"abcd")),
    "array whose shape overflows int64": msgpack.packb(array_ext("<f8", [2**40] * 3, b"")),
    "zero-size array with huge dims": msgpack.packb(array_ext("<f4", [0, 2**62, 2**62], b"")),
    "dim beyond uint64": msgpack.packb(array_ext("<f4", [0, 2**64 - 1], b"")),
    "negative dim": msgpack.packb(array_ext("<f4", [-1, 4], b"\x00" * 16)),
    "negative dims cancelling": msgpack.packb(array_ext("<f4", [-1, -4], b"\x00" * 16)),
    "bool dim": msgpack.packb(array_ext("<f4", [True], b"\x00" * 4)),
    "float dim": msgpack.packb(array_ext("<f4", [1.0], b"\x00" * 4)),
    "33 dims": msgpack.packb(array_ext("<f4", [1] * 33, b"\x00" * 4)),
    "object dtype": msgpack.packb(array_ext("|O", [1], b"\x00" * 8)),
    "O dtype": msgpack.packb(array_ext("O", [1], b"\x00" * 8)),
    "complex dtype": msgpack.packb(array_ext("<c16", [1], b"\x00" * 16)),
    "void dtype": msgpack.packb(array_ext("V8", [1], b"\x00" * 8)),
    "big-endian dtype": msgpack.packb(array_ext(">f4", [1], b"\x00" * 4)),
    "dtype without byte order": msgpack.packb(array_ext("f4", [1], b"\x00" * 4)),
    "datetime dtype": msgpack.packb(array_ext("<M8[ns]", [1], b"\x00" * 8)),
    "dtype as int": msgpack.packb(array_ext(7, [1], b"\x00" * 4)),
    "array header not a list": msgpack.packb(msgpack.ExtType(2, msgpack.packb("x"))),
    "array header of three": msgpack.packb(msgpack.ExtType(2, msgpack.packb(["<f4", [1], 0]))),
    "array header truncated": msgpack.packb(msgpack.ExtType(2, msgpack.packb(["<f4", [1]])[:-1])),
    "array ext empty": msgpack.packb(msgpack.ExtType(2, b"")),
    "array with too many bytes": msgpack.packb(array_ext("<f4", [1], b"\x00" * 5)),
    "array header bigger than 512 bytes": msgpack.packb(
        msgpack.ExtType(2, msgpack.packb(["<f4" + "x" * 600, [1]]) + b"\x00" * 4)
    ),
    "scalar with a shape": msgpack.packb(array_ext("<f4", [2], b"\x00" * 8, code=3)),
    "map declaring 10**9 entries": b"\xdf" + struct.pack(">I", 10**9) + b"\xc0" * 6,
    "array declaring 2**32-1 items": b"\xdd\xff\xff\xff\xff" + b"\xc0" * 6,
    "str declaring 4 GiB": b"\xdb\xff\xff\xff\xff" + b"a" * 6,
    "bin declaring 4 GiB": b"\xc6\xff\xff\xff\xff" + b"a" * 6,
    "ext declaring 4 GiB": b"\xc9\xff\xff\xff\xff\x02" + b"a" * 6,
    "100,000 nested lists": b"\x91" * 100_000 + b"\xc0",
    "100,000 nested maps": b"\x81\xa1a" * 100_000 + b"\xc0",
    "100,000 nested tuples": b"\x92\xc7\x00\x01" * 100_000 + b"\xc0",
    "deeply nested array header": msgpack.packb(msgpack.ExtType(2, b"\x91" * 400 + b"\xc0")),
    "array header of 100,000 nested lists": msgpack.packb(msgpack.ExtType(2, b"\x91" * 100_000)),
    "invalid utf-8": b"\xa2\xff\xfe",
    "reserved byte 0xc1": b"\xc1",
    "two objects": b"\xc0\xc0",
    "empty payload": b"",
    "timestamp ext": b"\xd6\xff\x00\x00\x00\x01",
    "timestamp inside a list": b"\x91\xd6\xff\x00\x00\x00\x01",
    "unknown ext": msgpack.packb(msgpack.ExtType(7, b"")),
    "negative ext": b"\xd5\xfbab",  # fixext 2 of type -5
    "top-level tuple marker": msgpack.packb(msgpack.ExtType(1, b"")),
    "tuple marker not first": msgpack.packb([None, msgpack.ExtType(1, b"")]),
    "two tuple markers": msgpack.packb([msgpack.ExtType(1, b""), msgpack.ExtType(1, b"")]),
    "tuple marker as map value": msgpack.packb({"a": msgpack.ExtType(1, b"")}),
    "tuple marker as map key": b"\x81\xc7\x00\x01\x01",
    "tuple marker with data": msgpack.packb([msgpack.ExtType(1, b"x")]),
    "bool key": msgpack.packb({True: 1}),
    "float key": msgpack.packb({1.5: 1}),
    "nil key": msgpack.packb({None: 1}),
    "bytes key": msgpack.packb({b"k": 1}, use_bin_type=True),
    "list key": b"\x81\x90\x01",
    "tuple key": b"\x81\x91\xc7\x00\x01\x01",
    "array key": b"\x81" + msgpack.packb(array_ext("<f4", [1], b"\x00" * 4)) + b"\x01",
    "duplicate key": b"\x82\xa1a\x01\xa1a\x02",
}


@pytest.mark.parametrize("payload", HOSTILE_PAYLOADS.values(), ids=HOSTILE_PAYLOADS.keys())
def test_hostile_payloads_raise_without_large_allocations(payload):
    data = make_file(payload)
    tracemalloc.start()
    try:
        with pytest.raises(SerializationError, match="cannot load data"):
            loads(data)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 2**20 + 2 * len(data)


def test_legal_but_unusual_payloads_load():
    # Not what save writes, but well-formed values of supported types.
    assert loads(make_file(b"\xca\x3f\xc0\x00\x00")) == 1.5  # msgpack float32 -> float
    assert loads(make_file(b"\xd0\x05")) == 5  # int8 encoding of a small int
    deep = loads(make_file(b"\x91" * 1000 + b"\xc0"))  # within msgpack's own stack limit
    for _ in range(1000):
        assert type(deep) is list
        deep = deep[0]
    assert deep is None


# --------------------------------------------------------------------------- docs


def test_docstring_examples_run():
    results = doctest.testmod(serialization, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 4
    assert results.failed == 0


def test_public_api():
    assert sorted(serialization.__all__) == ["dumps", "load", "loads", "save", "write_atomically"]
    assert "QATCSAVE" in serialization.__doc__ and "crc32" in serialization.__doc__


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 2**127 + 12345, -(2**200), 2**8190])
def test_big_ints_round_trip(value):
    loaded = loads(dumps({"v": value, "list": [value, 1]}))
    assert loaded == {"v": value, "list": [value, 1]} and type(loaded["v"]) is int


def test_generator_state_round_trips():
    rng = np.random.default_rng(12345)
    rng.random(7)
    state = loads(dumps(rng.bit_generator.state))
    other = np.random.default_rng()
    other.bit_generator.state = state
    np.testing.assert_array_equal(other.random(5), rng.random(5))


def test_big_int_ext_must_be_canonical():
    payload = msgpack.packb(msgpack.ExtType(4, (5).to_bytes(2, "little", signed=True)))
    with pytest.raises(SerializationError):
        loads(make_file(payload))
    with pytest.raises(SerializationError):
        loads(make_file(msgpack.packb(msgpack.ExtType(4, b""))))
