"""The shipped examples train to a sensible result (they are part of the package's promise)."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.mark.parametrize("loss", ["arcface", "cosface", "sphereface"])
def test_margin_heads_learn_digits(monkeypatch, loss):
    import arcface_digits
    monkeypatch.setattr(sys, "argv", ["arcface_digits.py", "--loss", loss, "--epochs", "15"])
    assert arcface_digits.main() > 0.9
