"""plugins/nunchaku_flux/package.py: the real Nunchaku told from PyPI's unrelated `nunchaku` by its files alone.

Fake packages laid out as files stand in for what a machine may have; both refuse to be imported.
"""

import sys

import pytest

from plugins.nunchaku_flux.package import detect, problem
from tests.support.nunchaku import real_shaped_package, unrelated_package

TORCH = "2.13.0"
PY = (3, 11)


def test_the_unrelated_pypi_package_is_recognised_without_importing_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(unrelated_package(tmp_path / "site")))
    found = detect()
    assert (found.kind, found.version) == ("unrelated", "0.16.1")
    assert "nunchaku" not in sys.modules  # its __init__ would have raised
    assert "detected from its files, without importing it" in problem(found, TORCH, PY)


def test_a_wheel_shaped_package_is_recognised_with_the_torch_it_was_built_for(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(real_shaped_package(tmp_path / "site")))
    found = detect()
    assert (found.kind, found.built_for_torch) == ("real", "2.10")
    assert "nunchaku" not in sys.modules
    assert "built for torch 2.10" in problem(found, TORCH, PY)


def test_no_package_is_absent(tmp_path, monkeypatch):
    if detect().kind != "absent":
        pytest.skip("a nunchaku package is installed in this environment")
    assert "not installed" in problem(detect(), TORCH, PY)
