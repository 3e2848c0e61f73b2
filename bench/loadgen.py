"""Moved to support/loadgen.py; this module stays for tests/deploy, which still imports it.
New code imports `support.loadgen`; delete this once tests/deploy does."""

from support.loadgen import *  # noqa: F403
