"""wattgate: a self-hosted consent and metering gateway for AI spend."""

__version__ = "0.1.0"
