"""Session-wide test settings: loopback only, no hub, quiet hivemind."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
os.environ.setdefault("GOLOG_LOG_LEVEL", "error")


@pytest.fixture(scope="session")
def micro_zoo():
    """The micro test-bed zoo, trained once and cached under $UMM_ZOO_CACHE (or ~/.cache/umm/zoo)."""
    from merging.testbed.zoo import build_zoo

    return build_zoo("micro")
