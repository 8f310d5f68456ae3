"""Exercise 08: a bit-width sweep, and the 6 dB per bit rule.

Read first: docs/concepts.md, "2. The affine grid" (the SQNR yardstick);
exercise 06 for the SQNR.

Learning goal: derive how the quantization noise depends on the number of bits, and check the
rule on data; see how the shape of the data moves the curve without changing its slope.

With b bits and the min/max range of data spread evenly (uniformly) over [-A, A], the grid
has 2^b - 1 steps across the range, so the step is s = 2A / (2^b - 1). Rounding moves each
value by an error spread evenly over [-s/2, s/2]: its mean square is s^2 / 12. The signal's
mean square is A^2 / 3. So

    SQNR = 10 log10( (A^2 / 3) / (s^2 / 12) ) = 20 log10(2A / s) = 20 log10(2^b - 1)
         ~ 20 log10(2) * b = 6.02 b dB                       (for 2^b >> 1)

Each extra bit halves the step, which divides the noise power by 4: +6.02 dB. For 2 or 3 bits
the "- 1" matters (20 log10(3) = 9.5 dB, not 12.0).

The sweep quantizes with the unsigned b-bit affine grid ([0, 2^b - 1]) of the data's min/max
range, qatcore's range rule (``fake_quantize_min_max``, given), and measures the SQNR with
qatcore's definition (``sqnr_at_bits``, given; exercise 06).

What to implement: ``predicted_sqnr_db``, ``sweep`` and ``db_per_bit``.
What to observe (``main()``): on uniform data the table follows 20 log10(2^b - 1) within 0.1 dB
at every width from 8 bits (48.1 dB) down to 2 (9.5 dB), and each bit is worth 6.0 to 6.3 dB
from 8 down to 4 bits. Bell-shaped (normal) and heavy-tailed (Laplace) data, shaped like
trained weights, lose about 8 and 12 dB: the min/max range is set by rare large values while
most values sit near 0. Their slope is still about 6 dB per bit from 8 down to 4 bits.
Tolerances (the check's): |SQNR - 20 log10(2^b - 1)| < 0.1 dB at every width, and
|dB per bit - 6.02| < 0.35 dB between consecutive widths from 8 down to 4 bits (the measured
gaps are 6.03, 6.06, 6.18 and 6.30 dB; the gap grows at low widths as the "- 1" starts to count).
Check: pytest docs/exercises -k ex08.
"""

import numpy as np

from qatcore.quantization import QuantDType, fake_quantize
from qatcore.quantization.qat.statistics import sqnr_db
from qatcore.quantization.qparams import scale_zero_point_from_range

EXERCISE_FUNCTIONS = ("predicted_sqnr_db", "sweep", "db_per_bit")

BIT_WIDTHS = (8, 7, 6, 5, 4, 3, 2)


def predicted_sqnr_db(bits: int) -> float:
    """The SQNR of uniform data on its own min/max grid: 20 log10(2^bits - 1)."""
    raise NotImplementedError("exercise 08: write predicted_sqnr_db() (see its docstring)")


def sweep(x: np.ndarray, bit_widths=BIT_WIDTHS) -> dict[int, float]:
    """{bits: sqnr_at_bits(x, bits)} for each width, in the given order."""
    raise NotImplementedError("exercise 08: write sweep() (see its docstring)")


def db_per_bit(table: dict[int, float]) -> dict[int, float]:
    """{bits: table[bits] - table[bits - 1]} for every width whose predecessor is in the table."""
    raise NotImplementedError("exercise 08: write db_per_bit() (see its docstring)")


def fake_quantize_min_max(x: np.ndarray, bits: int) -> np.ndarray:
    """fake_quant(x) on the unsigned ``bits``-bit affine grid of [min(x), max(x)] (given)."""
    dtype = QuantDType(bits, signed=False)
    scale, zero_point = scale_zero_point_from_range(x.min(), x.max(), dtype, symmetric=False)
    return fake_quantize(x, scale[0], zero_point[0], dtype.qmin, dtype.qmax)


def sqnr_at_bits(x: np.ndarray, bits: int) -> float:
    """The SQNR (dB) of ``fake_quantize_min_max(x, bits)``, qatcore's definition (given)."""
    return sqnr_db(x, fake_quantize_min_max(x, bits))


def samples(seed: int = 8, size: int = 100_000) -> dict[str, np.ndarray]:
    """Uniform, normal and Laplace data, float32 (given)."""
    rng = np.random.default_rng(seed)
    return {"uniform": rng.uniform(-1, 1, size).astype(np.float32),
            "normal": rng.normal(size=size).astype(np.float32),
            "laplace": rng.laplace(size=size).astype(np.float32)}


def main() -> None:
    """Print what the module docstring asks you to observe."""
    print("bits      " + "".join(f"{bits:>7d}" for bits in BIT_WIDTHS))
    print("predicted " + "".join(f"{predicted_sqnr_db(bits):7.2f}" for bits in BIT_WIDTHS))
    for name, x in samples().items():
        table = sweep(x)
        print(f"{name:10s}" + "".join(f"{table[bits]:7.2f}" for bits in BIT_WIDTHS),
              " dB per bit:", " ".join(f"{v:.2f}" for v in db_per_bit(table).values()))


if __name__ == "__main__":
    main()
