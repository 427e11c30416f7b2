import os

import pytest


@pytest.fixture(autouse=True)
def _isolate_fuyu_env(monkeypatch):
    """No FUYU_* variable from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("FUYU_"):
            monkeypatch.delenv(key)
