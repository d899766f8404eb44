"""Zoo sizes by name."""

import pytest

from merging.testbed.sizes import ZOO_SIZES, build_any_zoo
from merging.testbed.zoo import RECIPES, ZooError


def test_the_sizes_are_the_tiny_recipes_then_real():
    assert (*RECIPES, "real") == ZOO_SIZES


def test_an_unknown_size_is_named(tmp_path):
    with pytest.raises(ZooError, match="expected zoo size micro, small, real, got 'huge'"):
        build_any_zoo("huge", tmp_path)
