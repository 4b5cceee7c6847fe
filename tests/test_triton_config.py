"""The GPU tuning override of the Triton block sizes (parsed on any machine; used only on CUDA)."""
import pytest

pytest.importorskip("triton")
from marginkern.triton_kernels.tiles import GPU_CONFIG, parse_config  # noqa: E402


def test_override_keeps_unnamed_keys():
    config = parse_config("BLOCK_N=128, num_warps=4")
    assert config == {**GPU_CONFIG, "BLOCK_N": 128, "num_warps": 4}
    assert parse_config("") == GPU_CONFIG


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="BLOCK_Q"):
        parse_config("BLOCK_Q=1")
