"""The tiny synthetic models, built once per test session."""

import pytest

from tests.search.tiny_models import build_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))
