"""Shared test settings: hypothesis without deadlines (the first call of a numba
kernel compiles it), a moderate number of examples so the suite stays fast, and
derandomized: every run tries the same examples, so CI cannot turn red on a new
random one (explore with a randomized profile locally:
``pytest --hypothesis-profile explore``)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "qatcore", deadline=None, max_examples=25, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("qatcore")
