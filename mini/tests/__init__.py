"""The mini package's tests. A package, so that its conftest is imported as tests.conftest and never replaces
the product tests' own `conftest` module (which their modules import helpers from)."""
