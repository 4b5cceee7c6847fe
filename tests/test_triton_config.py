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


@pytest.mark.parametrize("N, C, D, want", [
    (8192, 128_256, 4096, 6),    # Llama-3-8B: 128 row blocks fill the GPU, but 264 × 512 KB x blocks need ≥ 6 splits
    (1024, 1_000_000, 512, 17),  # ArcFace 1M: 16 row blocks, split for occupancy (2 programs per SM)
    (256, 100, 512, 1),          # a single class tile cannot be split
    (0, 10, 8, 1),
])
def test_class_splits_fill_the_gpu_and_keep_x_in_l2(N, C, D, want):
    from marginkern.triton_kernels.tiles import class_splits
    blocks = {k: GPU_CONFIG[k] for k in ("BLOCK_N", "BLOCK_C", "BLOCK_D")}
    splits, per_split = class_splits(N, C, D, 2, blocks, sm_count=132, l2_bytes=50 << 20)
    assert splits == want
    assert per_split % blocks["BLOCK_C"] == 0 and (splits - 1) * per_split < max(C, 1) <= splits * per_split


def test_host_grid_arithmetic_matches_triton():
    # device.cdiv / next_power_of_2 stand in for triton's constexpr functions on the host (~1.3 µs a call)
    import triton
    from marginkern.triton_kernels.device import cdiv, next_power_of_2
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in (1, 2, 3, 7, 16, 32, 1024))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
    assert cdiv(2**40 + 1, 1024) == triton.cdiv(2**40 + 1, 1024)


def test_subcenter_tiles_stay_within_16_elements_per_thread():
    # the sub-centre kernels keep best and winner tiles beside the accumulator: sm_90 compiles of larger
    # tiles took 210-255 registers or spilled (bench/NOTES.md, ninth session; tests/test_sm90_compile.py)
    from marginkern.triton_kernels.tiles import INTERPRETER_BLOCKS, subcenter_blocks
    assert subcenter_blocks(GPU_CONFIG, 8, 1) == GPU_CONFIG
    assert subcenter_blocks(GPU_CONFIG, 8, 3) == {**GPU_CONFIG, "BLOCK_C": 64}
    assert subcenter_blocks({**GPU_CONFIG, "BLOCK_N": 128}, 8, 2)["BLOCK_C"] == 32
    assert subcenter_blocks({**GPU_CONFIG, "BLOCK_N": 128}, 4, 2)["BLOCK_C"] == 16
    assert subcenter_blocks(INTERPRETER_BLOCKS, 4, 4) == INTERPRETER_BLOCKS


def test_every_launch_asks_for_fp_fusion():
    # Triton 3.9 warns at the first compile of a launch that leaves FMA contraction to the default, and 3.10 turns
    # that default off (other rounding, more instructions): every `kernel[grid](...)` passes device.FP_FUSION. (The
    # interpreter tier's launch recorder refuses a launch without it too, but only where the tier records launches.)
    import ast
    import pathlib
    from marginkern.triton_kernels.device import FP_FUSION
    assert FP_FUSION == {"enable_fp_fusion": True}
    launches, missing = 0, []
    for path in sorted((pathlib.Path(__file__).parents[1] / "triton_kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):  # kernel[grid](...)
                launches += 1
                if not any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == "FP_FUSION"
                           for k in node.keywords):
                    missing.append(f"{path.name}:{node.lineno}")
    assert launches >= 16 and not missing, missing
