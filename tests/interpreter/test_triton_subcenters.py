"""Sub-center ArcFace through the Triton kernels (SUBCENTERS = K: K dot tiles per class tile, dL/da at the
winning sub-centre's column) against the float64 oracle.

Run in its own process with TRITON_INTERPRET=1, or on a CUDA machine as is (tests/test_gpu.py adds bf16
and larger shapes there).
"""
import pytest
import torch

from tests.helpers import (check_chunked_margin_matches_one_chunk, check_duplicate_subcenters_are_plain_margin_ce,
                           check_subcenter_edge_cases, check_subcenter_nan_stays_nan, check_subcenters_match_oracle,
                           subcenter_case)
from tests.interpreter.test_triton_kernels import DEVICE, pytestmark  # noqa: F401  (same skip rule)

OPTIONS = [dict(), dict(m2=0.0, m3=0.35, label_smoothing=0.1), dict(m1=4.0, m2=0.0, scale=30.0),
           dict(margin_grad="straight_through")]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("shape", [(37, 53, 3, 19), (3, 2, 2, 2), (19, 65, 2, 48), (5, 40, 5, 16)])  # D=48, 16: EVEN_D
def test_triton_matches_oracle(dtype, opts, shape):
    check_subcenters_match_oracle(DEVICE, dtype, shape, opts)


def test_duplicate_subcenters_are_plain_margin_ce():
    check_duplicate_subcenters_are_plain_margin_ce(DEVICE)


def test_empty_single_class_and_all_ignored():
    check_subcenter_edge_cases(DEVICE)


def test_small_gradient_buffer_streams_many_chunks():
    from marginkern.triton_kernels import TritonTiles
    check_chunked_margin_matches_one_chunk(TritonTiles(buffer_bytes=9 * 3 * 4 * 64), 9, 300, 3, 20, DEVICE)


def test_narrower_subcenter_tiles_than_the_class_chunks(monkeypatch):
    """With sub-centres the kernels run narrower class tiles than the chunking assumes (subcenter_blocks): the
    interpreter's blocks made GPU-sized, so that BLOCK_C halves twice (4 warps: 2048 elements per tile)."""
    from marginkern.triton_kernels import tiles
    monkeypatch.setattr(tiles, "INTERPRETER_BLOCKS", dict(tiles.INTERPRETER_BLOCKS, BLOCK_N=16, BLOCK_C=512))
    assert tiles.subcenter_blocks(tiles.INTERPRETER_BLOCKS, 4, 3)["BLOCK_C"] == 128
    check_subcenters_match_oracle(DEVICE, torch.float32, (21, 700, 3, 9), dict(label_smoothing=0.1))


def test_opcheck_through_triton():
    x, w, t = subcenter_case(7, 10, 3, 5, device=DEVICE, ignore=(1,))
    args = (x, w, t, 64.0, 1.0, 0.5, 0.0, True, True, 0.1, -100, 3)
    torch.library.opcheck(torch.ops.marginkern.margin_cross_entropy.default, args)


def test_nan_embedding_gives_nan_row():
    check_subcenter_nan_stays_nan(DEVICE)
