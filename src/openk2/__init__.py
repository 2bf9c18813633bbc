"""openk2: an open, hackable, full-stack implementation of the Kimi K2 recipe."""

__version__ = "0.1.0"
