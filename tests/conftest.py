"""pytest configuration. Test helpers live in helpers.py (`from helpers import ...`)."""

# Scripts run in a subprocess by the multi-device tests: they set the device
# count (XLA_FLAGS) before jax is imported, so --doctest-modules must not
# import them into the test process (its later subprocesses would inherit it).
collect_ignore_glob = ['*multidevice_run.py']
