"""The default generator: where qatcore draws randomness nobody passed in.

Every random draw in qatcore takes an explicit ``np.random.Generator`` (``rng=`` of a
layer, a ``DataLoader`` or ``Dropout``, ``generator=`` of ``functional.dropout``).
Where the caller gives none, the draw comes from this module's one *default
generator*:

- ``Linear`` and ``Conv2d`` built without ``rng=`` draw their initial weights from it;
- ``Dropout`` and a shuffling ``DataLoader`` built without ``rng=`` take a generator of
  their own, spawned from it (``spawn_generator``), so each owns an independent stream
  that its checkpoint can save and restore;
- ``functional.dropout`` without ``generator=`` draws its mask from it.

:func:`manual_seed` replaces it with ``np.random.default_rng(seed)``: after
``manual_seed(0)``, a script that builds and trains the same model the same way gets
the same weights and the same training, run after run.

The default, when ``manual_seed`` is never called, is ``manual_seed(DEFAULT_SEED)``
(seed 0), not a generator seeded from the operating system. A run that forgot to
seed is then still repeatable, which is the property users rely on without knowing
(two identical runs that give 0.805 and 0.925 look like a bug in the model), and
it is PyTorch's choice too (its CPU generator starts from a fixed seed). For
independent repetitions, seed each explicitly, e.g. ``manual_seed(secrets.randbits(63))``,
and record the seed (``initial_seed()``).

The reference models of :mod:`qatcore.models` are not affected: built without
``rng=`` they draw from their own ``np.random.default_rng(0)``, so ``DigitsCNN()`` is
the same network in every process, document and test.

>>> import numpy as np
>>> from qatcore.nn import Linear
>>> _ = manual_seed(3)
>>> first = Linear(4, 2).weight.data.copy()
>>> _ = manual_seed(3)
>>> bool(np.array_equal(Linear(4, 2).weight.data, first)), initial_seed()
(True, 3)
"""

from __future__ import annotations

import numbers

import numpy as np

from qatcore.errors import ConfigError

__all__ = ["DEFAULT_SEED", "manual_seed", "initial_seed", "default_generator", "generator_or_default",
           "spawn_generator"]

DEFAULT_SEED = 0

# The one piece of global state qatcore keeps, and only for draws nobody gave a generator for.
# The seed sequence is kept beside the generator so that children can be spawned from it.
_default: dict = {}


def manual_seed(seed: int) -> np.random.Generator:
    """Make the default generator ``np.random.default_rng(seed)`` and return it.

    Args:
        seed: a non-negative integer.

    Raises:
        ConfigError: ``seed`` is not a non-negative integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"manual_seed: seed must be a non-negative integer, got {seed!r}")
    sequence = np.random.SeedSequence(int(seed))  # default_rng(seed) seeds through the same sequence
    _default.update(seed=int(seed), sequence=sequence, generator=np.random.default_rng(sequence))
    return _default["generator"]


def initial_seed() -> int:
    """The seed the default generator was last made from (``DEFAULT_SEED`` if never set)."""
    return _default["seed"]


def default_generator() -> np.random.Generator:
    """The default generator (module docstring)."""
    return _default["generator"]


def generator_or_default(rng: np.random.Generator | None, owner: str = "rng") -> np.random.Generator:
    """``rng`` itself if given, else the default generator; ``owner`` names the argument in
    the error for anything that is not a ``np.random.Generator``."""
    if rng is None:
        return default_generator()
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"{owner} must be a numpy.random.Generator (e.g. np.random.default_rng(seed)) or None, "
                          f"got {type(rng).__name__}")
    return rng


def spawn_generator() -> np.random.Generator:
    """A new generator with a stream of its own, the next child of the default generator's
    seed (``SeedSequence.spawn``): fixed by the seed and by how many were spawned before,
    and independent of how many numbers were drawn."""
    (child,) = _default["sequence"].spawn(1)
    return np.random.default_rng(child)


manual_seed(DEFAULT_SEED)
