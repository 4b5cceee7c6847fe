"""The GPU tuning override of the Triton block sizes (parsed on any machine; used only on CUDA)."""
import pytest
import torch

pytest.importorskip("triton")
from marginkern.triton_kernels.tiles import GPU_CONFIG, parse_config  # noqa: E402


def test_override_keeps_unnamed_keys():
    config = parse_config("BLOCK_N=128, num_warps=4")
    assert config == {**GPU_CONFIG, "BLOCK_N": 128, "num_warps": 4}
    assert parse_config("") == GPU_CONFIG


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="BLOCK_Q"):
        parse_config("BLOCK_Q=1")


def test_default_chunk_budget_fits_the_issues_memory_goals():
    # bf16 backward chunks (G: N × chunk in bf16, the chunk's dW in fp32) under the default budget:
    # face (1024, 1M, 512) leaves room for ≈ 12 MB of (C,) vectors within the 64 MB goal; LLM shapes stay
    # within 256 MB together with the (N, D) fp32 dX accumulator.
    from marginkern.triton_kernels.tiles import TritonTiles
    tiles = TritonTiles()
    for (N, C, D), goal in [((1024, 1_000_000, 512), 64 << 20), ((8192, 128_256, 4096), 256 << 20),
                            ((8192, 256_000, 2304), 256 << 20)]:
        x = torch.empty(N, D, dtype=torch.bfloat16, device="meta")
        c0, c1 = tiles.class_chunks(N, C, x, bytes_per_class=4 * D)[0]
        chunk_bytes = (c1 - c0) * (2 * N + 4 * D)
        vectors = 3 * 4 * C if goal == 64 << 20 else 0
        assert chunk_bytes + 4 * N * D + vectors <= goal - (4 << 20), (N, C, D, chunk_bytes >> 20)
        assert c1 - c0 >= 1024  # chunks stay large enough for efficient GEMMs
