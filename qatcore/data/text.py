"""``load_text``: the Tiny Shakespeare text that ships inside qatcore, as character tokens.

The text is the 1,115,394 characters of Shakespeare's plays (public domain) that
Andrej Karpathy gathered for char-rnn (``_data/TINYSHAKESPEARE_ATTRIBUTION.md``). It is
packaged gzip-compressed, so the transformer examples train on real text without a
download: qatcore never downloads anything.

Tokens are characters: the vocabulary is the sorted distinct characters of the whole
text (65), token ``i`` is ``vocabulary[i]``. The first ``1 - validation_fraction`` of
the sequence is for training, the rest for validation (no shuffling: the validation text
is text the model never saw, as in nanoGPT).

:func:`text_windows` cuts a token sequence into (input, target) windows of ``block_size``
tokens, the target shifted by one; a :class:`~qatcore.data.DataLoader` over them gives
shuffled (B, T) batches, resumable mid-epoch like every DataLoader.

>>> text = load_text()
>>> len(text.vocabulary), text.train.size + text.validation.size
(65, 1115394)
>>> text.decode(text.train[:14])
'First Citizen:'
>>> x, y = text_windows(text.encode("To be, or not to be"), block_size=4)
>>> text.decode(x[0]), text.decode(y[0]), x.shape
('To b', 'o be', (4, 4))
"""

from __future__ import annotations

import gzip
import hashlib
import numbers
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from qatcore.errors import ConfigError, DataError

__all__ = ["TextData", "load_text", "text_windows"]

_DATA_PACKAGE = "qatcore.data"
_DATA_FILE = ("_data", "tinyshakespeare.txt.gz")
_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclass(frozen=True, eq=False)
class TextData:
    """A character-level text split: ``train`` and ``validation`` token arrays (int64) over
    ``vocabulary`` (the sorted distinct characters of the whole text)."""

    train: np.ndarray = field(repr=False)
    validation: np.ndarray = field(repr=False)
    vocabulary: str

    @property
    def vocabulary_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str) -> np.ndarray:
        """The tokens of ``text`` (DataError naming the first character not in the vocabulary)."""
        index = {ch: i for i, ch in enumerate(self.vocabulary)}
        try:
            return np.array([index[ch] for ch in text], dtype=np.int64)
        except KeyError as e:
            raise DataError(f"TextData.encode: character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, tokens) -> str:
        """The text of ``tokens`` (a sequence of ints in ``0 .. vocabulary_size - 1``)."""
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= len(self.vocabulary)):
            raise DataError(f"TextData.decode: tokens must be in 0..{len(self.vocabulary) - 1}, "
                            f"got values in {int(tokens.min())}..{int(tokens.max())}")
        return "".join(self.vocabulary[int(t)] for t in tokens.reshape(-1))


def load_text(validation_fraction: float = 0.1) -> TextData:
    """The packaged Tiny Shakespeare text as character tokens, split into train and validation.

    Args:
        validation_fraction: the share of the sequence, at its end, kept for validation
            (strictly between 0 and 1).

    Raises:
        ConfigError: a fraction outside (0, 1).
        DataError: the packaged file is missing or not the text it should be.
    """
    if (isinstance(validation_fraction, bool) or not isinstance(validation_fraction, numbers.Real)
            or not 0 < validation_fraction < 1):
        raise ConfigError(f"load_text: validation_fraction must be a number strictly between 0 and 1, "
                          f"got {validation_fraction!r}")
    codes = np.frombuffer(_read_packaged_text().encode("utf-32-le"), dtype="<u4")  # one code point each
    vocabulary_codes = np.unique(codes)  # sorted: the vocabulary in code point order
    tokens = np.searchsorted(vocabulary_codes, codes).astype(np.int64)
    vocabulary = "".join(map(chr, vocabulary_codes.tolist()))
    split = int(round(tokens.size * (1 - validation_fraction)))
    return TextData(np.ascontiguousarray(tokens[:split]), np.ascontiguousarray(tokens[split:]), vocabulary)


def text_windows(tokens: np.ndarray, block_size: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets): the windows ``tokens[s : s + block_size]`` and ``tokens[s + 1 : s +
    block_size + 1]`` for ``s = 0, stride, 2 * stride, ...`` as long as the target fits;
    ``stride`` defaults to ``block_size`` (windows side by side). Both are (windows,
    block_size) int64 arrays (copies)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ConfigError(f"text_windows: tokens must be a 1-d integer array, got {tokens.dtype} of shape "
                          f"{tokens.shape}")
    stride = block_size if stride is None else stride
    for name, value in (("block_size", block_size), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"text_windows: {name} must be a positive int, got {value!r}")
    if tokens.size < block_size + 1:
        raise ConfigError(f"text_windows: {tokens.size} tokens cannot make one window of {block_size} tokens "
                          f"and its shifted target")
    starts = np.arange(0, tokens.size - block_size, stride)
    index = starts[:, None] + np.arange(block_size)
    return tokens[index].astype(np.int64), tokens[index + 1].astype(np.int64)


def _read_packaged_text() -> str:
    resource = resources.files(_DATA_PACKAGE)
    for part in _DATA_FILE:
        resource = resource.joinpath(part)
    try:
        raw = gzip.decompress(resource.read_bytes())
    except (FileNotFoundError, NotADirectoryError, KeyError, OSError, EOFError) as error:
        raise DataError(f"load_text: the packaged file {'/'.join(_DATA_FILE)} is missing or unreadable "
                        f"from {_DATA_PACKAGE!r}; reinstall qatcore ({type(error).__name__}: {error})") from error
    return _check_text(raw)


def _check_text(raw: bytes) -> str:
    """``raw`` decoded, once its SHA-256 says it is the packaged text (DataError if not)."""
    if hashlib.sha256(raw).hexdigest() != _SHA256:
        raise DataError(f"load_text: {'/'.join(_DATA_FILE)} is not the Tiny Shakespeare text it should be "
                        f"(SHA-256 differs); reinstall qatcore")
    return raw.decode("utf-8")
