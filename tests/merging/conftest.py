"""Merges in these tests remember input digests in a temp folder, not the user's cache."""

import pytest


@pytest.fixture(autouse=True)
def _private_digest_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("UMM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "umm-cache"))
