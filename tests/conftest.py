"""Shared test settings: hypothesis without deadlines (the first call of a numba
kernel compiles it), a moderate number of examples so the suite stays fast."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "qatcore", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("qatcore")
