"""Moved to support/server.py and support/bundled.py; this module stays for tests/deploy, which
still imports it. New code imports `support.*`; delete this once tests/deploy does."""

from support.bundled import BUNDLED_STORE, MODEL_NAME, REPO  # noqa: F401
from support.server import *  # noqa: F403
