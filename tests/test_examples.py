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


def test_word_lm_learns_and_measures_filtering():
    import word_lm_stdlib
    fused, materialised, rows = word_lm_stdlib.main(["--steps", "60", "--vocab", "4096", "--batch", "256",
                                                     "--max-chars", "400000"])
    assert abs(fused - materialised) < 1e-4
    assert fused < 8.32 - 2.0  # well below the uniform log(4096): it learned from the text
    kept = [k for _, k, _, _ in rows]
    assert kept == sorted(kept, reverse=True) and kept[-1] < 1.0  # larger eps drops more classes
