"""wattgate: a self-hosted consent and metering gateway for AI spend."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One source of truth: pyproject.toml's version, as installed.
    __version__ = version("wattgate")
except PackageNotFoundError:  # a bare source tree on sys.path, never installed
    __version__ = "0+unknown"
