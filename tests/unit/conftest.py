"""Fixtures of the in-process tier."""

import pytest

from tests.support.demo import write_loras


@pytest.fixture
def lora_dir(tmp_path):
    return write_loras(tmp_path / "loras")
