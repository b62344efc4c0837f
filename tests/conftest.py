"""pytest configuration. Test helpers live in helpers.py (`from helpers import ...`)."""

# Run as a script by test_sharding.py (it sets the device count before jax is
# imported); --doctest-modules must not import it into the test process.
collect_ignore = ['multidevice_run.py']

# Transitional: test files not yet moved to `from helpers import ...`.
from helpers import COMPRESS_ALL, gradient, make_params  # noqa: E402,F401
