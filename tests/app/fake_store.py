"""Moved to support/fake_store.py and support/fashion_mnist.py; this module stays for tests/deploy,
which still imports it (as `fake_store` from this folder, or `tests.app.fake_store`). New code
imports `support.*`; delete this once tests/deploy does."""

from support.fake_store import *  # noqa: F403
from support.fashion_mnist import load_fashion_mnist_test, png_bytes  # noqa: F401
