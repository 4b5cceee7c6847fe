"""The Triton kernels compile for Hopper (sm_90) the way the GPU needs them, checked without a GPU: the GEMM
tiles run on wgmma with cp.async software pipelining and no register spills at the default config, and the
row kernels compile. A change that silently drops the pipelining (e.g. unaligned pointer arithmetic) or
spills would otherwise only show up as a slower benchmark on the next GPU visit (bench/sm90_compile.py)."""
import sys
from pathlib import Path

import pytest

from tests.helpers import TRITON_COMPILER_UNSUPPORTED

if TRITON_COMPILER_UNSUPPORTED:
    pytest.skip(TRITON_COMPILER_UNSUPPORTED, allow_module_level=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sm90_compile  # noqa: E402
from marginkern.triton_kernels.tiles import GPU_CONFIG  # noqa: E402

HOPPER_SHARED_BYTES = 227 * 1024  # per block, opt-in maximum


def _check_gemm_tile(report):
    assert report["wgmma"] > 0, "the logit tile does not run on Hopper's tensor cores (wgmma)"
    assert report["cp_async"] > 0, "the K loop is not software-pipelined (no cp.async)"
    assert report["stack_bytes"] == 0 and report["local_bytes"] == 0, f"register spills: {report}"
    assert report["shared_bytes"] <= HOPPER_SHARED_BYTES


@pytest.mark.parametrize("has_cost, subcenters, has_entropy, has_teacher, jsd, softcap",
                         [(False, 1, False, False, False, False), (True, 1, False, False, False, False),
                          (False, 2, False, False, False, False), (False, 3, False, False, False, False),
                          (False, 4, False, False, False, False), (False, 1, True, False, False, False),
                          (False, 1, False, True, False, False), (False, 1, False, False, True, False),
                          (False, 1, False, False, False, True)])
def test_engine_kernels_pipeline_on_wgmma_without_spills(has_cost, subcenters, has_entropy, has_teacher, jsd, softcap):
    for label, kernel, constexprs in sm90_compile.engine_kernels(GPU_CONFIG, has_cost=has_cost, subcenters=subcenters,
                                                                 has_entropy=has_entropy, has_teacher=has_teacher,
                                                                 jsd=jsd, softcap=softcap):
        report = sm90_compile.compile_sm90(kernel, constexprs, GPU_CONFIG["num_warps"], GPU_CONFIG["num_stages"])
        _check_gemm_tile(report)


@pytest.mark.parametrize("subcenters", [1, 3])
def test_hard_negative_kernels_pipeline_on_wgmma_without_spills(subcenters):
    """CurricularFace's / MV-Softmax's re-weighting in both streaming kernels (alone and with sub-centres)."""
    for label, kernel, constexprs in sm90_compile.engine_kernels(GPU_CONFIG, subcenters=subcenters,
                                                                 hard_negatives=True):
        report = sm90_compile.compile_sm90(kernel, constexprs, GPU_CONFIG["num_warps"], GPU_CONFIG["num_stages"])
        _check_gemm_tile(report)


def test_from_dots_epilogue_and_row_kernels_compile():
    """The 3-GEMM path's epilogue (reads fp32 dot products: no tensor-core work), the dW/dX finisher and the
    CoSENT cosine kernels."""
    from marginkern.triton_kernels.pairwise_cosine import pairwise_cosine_bwd_kernel, pairwise_cosine_fwd_kernel
    from marginkern.triton_kernels.row_projection import finish_grad_rows_kernel
    for _, kernel, constexprs in sm90_compile.engine_kernels(GPU_CONFIG, from_dots=True):
        report = sm90_compile.compile_sm90(kernel, constexprs, GPU_CONFIG["num_warps"], GPU_CONFIG["num_stages"],
                                           types={"x_ptr": "*fp32", "w_ptr": "*fp32"})
        assert report["local_bytes"] == 0 and report["wgmma"] == 0
    from marginkern.triton_kernels.streaming_ce import merge_splits_kernel
    rows = [(finish_grad_rows_kernel, dict(PROJECT=True, BLOCK_R=8, BLOCK_D=256)),
            (merge_splits_kernel, dict(NEED_SUM_LOGITS=True, HAS_COST=True, BLOCK=1024)),
            (merge_splits_kernel, dict(NEED_SUM_LOGITS=False, HAS_COST=False, HAS_ENTROPY=True, BLOCK=1024)),
            (merge_splits_kernel, dict(NEED_SUM_LOGITS=False, HAS_COST=False, HAS_TEACHER=True, BLOCK=1024)),
            (pairwise_cosine_fwd_kernel, dict(BLOCK_R=16, BLOCK_D=128)),
            (pairwise_cosine_bwd_kernel, dict(BLOCK_R=16, BLOCK_D=128))]
    for kernel, constexprs in rows:
        report = sm90_compile.compile_sm90(kernel, constexprs, num_warps=4, num_stages=2)
        assert report["local_bytes"] == 0 and report["stack_bytes"] == 0, f"{kernel.fn.__name__}: {report}"


def test_kernels_compile_with_integer_arguments_equal_to_one():
    """Triton's launcher turns an int argument equal to 1 into a constant: the teacher's forward and JSD kernels
    called .to() on num_splits, so linear_kl_divergence and linear_jsd failed to compile whenever the classes ran in
    a single split (C ≤ 128, or N ≥ ~17k at D = 768), which the interpreter never showed."""
    from marginkern.triton_kernels.streaming_ce import merge_splits_kernel
    kernels = [k for kw in (dict(), dict(has_teacher=True), dict(jsd=True), dict(has_entropy=True),
                            dict(has_cost=True), dict(subcenters=3), dict(softcap=True), dict(hard_negatives=True))
               for k in sm90_compile.engine_kernels(GPU_CONFIG, **kw)]
    kernels += [(f"merge {flags}", merge_splits_kernel, dict(flags, BLOCK=1024)) for flags in (
        dict(NEED_SUM_LOGITS=True, HAS_COST=True), dict(NEED_SUM_LOGITS=False, HAS_COST=False, HAS_ENTROPY=True),
        dict(NEED_SUM_LOGITS=False, HAS_COST=False, HAS_TEACHER=True))]
    for label, kernel, constexprs in kernels:
        sm90_compile.compile_sm90(kernel, sm90_compile.integers_as_ones(kernel, constexprs),
                                  GPU_CONFIG["num_warps"], GPU_CONFIG["num_stages"])
    # the row, scan and projection kernels too
    from marginkern.triton_kernels import cosent_scan
    from marginkern.triton_kernels.margin_rows import (BLOCK_ROWS, margin_target_grad_rows_kernel,
                                                       margin_target_rows_kernel)
    from marginkern.triton_kernels.pairwise_cosine import pairwise_cosine_bwd_kernel, pairwise_cosine_fwd_kernel
    from marginkern.triton_kernels.row_projection import (finish_grad_rows_kernel, projected_weight_grad_blocks,
                                                          projected_weight_grad_kernel)
    blocks, launch = projected_weight_grad_blocks(512, on_gpu=True)
    types = {"score_ptr": "*fp32", "order_ptr": "*i64", "labels_ptr": "*i64", "first_ptr": "*i32", "last_ptr": "*i32",
             "edge_totals_ptr": "*i32", "scale": "fp32", "column_ptr": "*i64", "m1": "fp32", "m2": "fp32",
             "m3": "fp32", "lam": "fp32", "smoothing": "fp32", "grad_loss_ptr": "*fp32"}
    for kernel, constexprs in [
            (cosent_scan.cosent_block_totals_kernel, dict(BLOCK=1024)),
            (cosent_scan.cosent_block_scans_kernel, dict(BLOCK=2048, CHUNK=1024)),
            (cosent_scan.cosent_terms_kernel, dict(BLOCK=1024)),
            (cosent_scan.cosent_grad_kernel, dict(BLOCK=2048, CHUNK=1024)),
            (margin_target_rows_kernel, dict(NORMALIZE=True, BLOCK_R=BLOCK_ROWS, BLOCK_D=256, SUBCENTERS=3)),
            (margin_target_rows_kernel, dict(NORMALIZE=False, BLOCK_R=BLOCK_ROWS, BLOCK_D=256)),
            (margin_target_grad_rows_kernel, dict(NORMALIZE=True, EXACT=True, BLOCK_R=BLOCK_ROWS)),
            (finish_grad_rows_kernel, dict(PROJECT=True, BLOCK_R=8, BLOCK_D=256)),
            (pairwise_cosine_fwd_kernel, dict(BLOCK_R=16, BLOCK_D=128)),
            (pairwise_cosine_bwd_kernel, dict(BLOCK_R=16, BLOCK_D=128)),
            (projected_weight_grad_kernel, dict(blocks, EVEN_N=True, DOT_PRECISION="tf32"))]:
        own = {**types, "g_ptr": "*bf16"} if kernel is projected_weight_grad_kernel else types
        sm90_compile.compile_sm90(kernel, sm90_compile.integers_as_ones(kernel, constexprs, own), num_warps=4,
                                  num_stages=2, types=own)


@pytest.mark.parametrize("D", [128, 256, 512])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_projected_weight_grad_kernel_compiles(D, dtype):
    """The fused dW GEMM + projection: 16-bit on wgmma with cp.async, up to D = 256 without spills, at 512
    (16 warps, 128 registers each) with a small spill that bench/sm90_compile.py showed (≤ 256 bytes of
    stack); fp32 (exact dot, no tensor cores) fits shared memory too (≤ 512 bytes of stack)."""
    from marginkern.triton_kernels.row_projection import projected_weight_grad_blocks, projected_weight_grad_kernel
    blocks, launch = projected_weight_grad_blocks(D, on_gpu=True)
    precision = "ieee" if dtype == "fp32" else "tf32"
    report = sm90_compile.compile_sm90(projected_weight_grad_kernel, dict(blocks, EVEN_N=True, DOT_PRECISION=precision),
                                       launch["num_warps"], launch["num_stages"],
                                       types={name: f"*{dtype}" for name in ("g_ptr", "x_ptr", "w_ptr", "out_ptr")})
    assert report["cp_async"] > 0 and report["local_bytes"] == 0 and report["shared_bytes"] <= HOPPER_SHARED_BYTES
    if dtype == "fp32":
        assert report["stack_bytes"] <= 512, report
    else:
        assert report["wgmma"] > 0
        assert report["stack_bytes"] == 0 if D <= 256 else report["stack_bytes"] <= 256, report


@pytest.mark.parametrize("labels", ["*i64", "*fp32"])
def test_cosent_scan_kernels_compile(labels):
    from marginkern.triton_kernels import cosent_scan
    types = {"score_ptr": "*fp32", "order_ptr": "*i64", "labels_ptr": labels, "first_ptr": "*i32", "last_ptr": "*i32",
             "edge_totals_ptr": "*i32", "scale": "fp32"}
    for kernel, constexprs in [(cosent_scan.cosent_block_totals_kernel, dict(BLOCK=1024)),
                               (cosent_scan.cosent_block_scans_kernel, dict(BLOCK=2048, CHUNK=1024)),
                               (cosent_scan.cosent_terms_kernel, dict(BLOCK=1024)),
                               (cosent_scan.cosent_grad_kernel, dict(BLOCK=2048, CHUNK=1024))]:
        report = sm90_compile.compile_sm90(kernel, constexprs, num_warps=4, num_stages=2, types=types)
        assert report["local_bytes"] == 0 and report["stack_bytes"] == 0, f"{kernel.fn.__name__}: {report}"


@pytest.mark.parametrize("rows", ["*bf16", "*fp32"])
@pytest.mark.parametrize("exact", [True, False])
def test_margin_row_kernels_compile(exact, rows):
    """The margin losses' per-row kernels: acos (a polynomial), cos, sin and floor lower for sm_90, without spills at
    the launcher's blocks and warps for fp32 and bf16 embeddings, D a multiple of 16 or not, with 3 sub-centres and
    per-row margins (AdaFace, MagFace: m2, m3 become per-row vectors). 256 features at 4 warps spilled 216 bytes for
    fp32 rows at D = 512 and 1.3 KB at an odd D with sub-centres."""
    from marginkern.triton_kernels.margin_rows import (BLOCK_FEATURES, BLOCK_ROWS, TARGET_ROWS_WARPS,
                                                       margin_target_grad_rows_kernel, margin_target_rows_kernel)
    types = {"column_ptr": "*i64", "m1": "fp32", "m2": "fp32", "m3": "fp32", "lam": "fp32", "smoothing": "fp32",
             "grad_loss_ptr": "*fp32", "x_ptr": rows, "w_ptr": rows}
    launches = [(margin_target_rows_kernel, TARGET_ROWS_WARPS, divisible,
                 dict(NORMALIZE=exact, BLOCK_R=BLOCK_ROWS, BLOCK_D=BLOCK_FEATURES, SUBCENTERS=subcenters,
                      ROW_MARGINS=row_margins))
                for divisible in (True, False) for subcenters, row_margins in ((1, False), (3, True))]
    launches += [(margin_target_grad_rows_kernel, 4, True, dict(NORMALIZE=not exact, EXACT=exact, BLOCK_R=BLOCK_ROWS,
                                                                ROW_MARGINS=row_margins)) for row_margins in (False, True)]
    for kernel, warps, divisible, constexprs in launches:
        report = sm90_compile.compile_sm90(kernel, constexprs, num_warps=warps, num_stages=3, types=types,
                                           divisible_sizes=divisible)
        # no spills (ptxas's count); a small stack frame is calls': libdevice's cos/sin (its slow argument reduction
        # for |φ| ≫ π) and the IEEE division's slow path
        assert report["spill_bytes"] == 0 and report["local_bytes"] == 0 and report["stack_bytes"] <= 64, \
            f"{kernel.fn.__name__} {constexprs} divisible={divisible}: {report}"


@pytest.mark.parametrize("g", ["*bf16", "*fp32"])
def test_proxy_anchor_epilogues_compile(g):
    """Proxy-Anchor's two chunk epilogues (fp32 dot products in; dL/d(x·w) out in bf16 or fp32) compile without
    spills, also with every integer argument equal to one (a single row or column)."""
    from marginkern.triton_kernels import proxy_anchor as kernels
    types = {"z_ptr": "*fp32", "g_ptr": g, "column_ptr": "*i64", "out_ptr": "*fp32", "alpha": "fp32",
             "margin": "fp32"}
    blocks = dict(BLOCK_N=kernels.BLOCK_N, BLOCK_C=kernels.BLOCK_C)
    for kernel in (kernels.proxy_anchor_negative_terms_kernel, kernels.proxy_anchor_grad_kernel):
        for constexprs in (blocks, sm90_compile.integers_as_ones(kernel, blocks, types)):
            report = sm90_compile.compile_sm90(kernel, constexprs, num_warps=4, num_stages=2, types=types)
            assert report["local_bytes"] == 0 and report["stack_bytes"] == 0, f"{kernel.fn.__name__}: {report}"


@pytest.mark.parametrize("h", ["*bf16", "*fp32"])
def test_contrastive_epilogues_compile(h):
    """InfoNCE's, SigLIP's, SupCon's and Proxy-Anchor's chunk epilogues (fp32 dot products in; G in the backward GEMMs'
    dtype out) compile without spills at the warps their launcher uses, also for a chunk whose sizes and strides are
    no multiple of 16 (SupCon's gradient spilled there at 4 warps) and with every integer argument equal to one:
    SupCon's statistics kernel called B.to() and so failed to compile for a batch of one row, which the interpreter
    never showed."""
    from marginkern.triton_kernels import info_nce, proxy_anchor, siglip, supcon
    from marginkern.triton_kernels.chunk_tiles import TILE_WARPS
    types = {"d_ptr": "*fp32", "h_ptr": h, "g_ptr": h, "row_scale_ptr": "*fp32", "col_scale_ptr": "*fp32",
             "positive_ptr": "*i64", "bias_ptr": "*fp32", "row_class_ptr": "*i64", "key_class_ptr": "*i64",
             "eps_over_m": "fp32", "eps_over_b": "fp32", "positive_cell_ptr": "*fp32", "column_ptr": "*i64",
             "alpha": "fp32", "margin": "fp32"}
    for module, kernel, flags in [(info_nce, info_nce.info_nce_stats_kernel, {}),
                                  (info_nce, info_nce.info_nce_grad_kernel, dict(SYMMETRIC=True)),
                                  (info_nce, info_nce.info_nce_grad_kernel, dict(SYMMETRIC=False)),
                                  (siglip, siglip.siglip_row_sums_kernel, {}), (siglip, siglip.siglip_grad_kernel, {}),
                                  (supcon, supcon.supcon_stats_kernel, {}), (supcon, supcon.supcon_grad_kernel, {}),
                                  (proxy_anchor, proxy_anchor.proxy_anchor_grad_kernel, {})]:
        blocks = dict(flags, BLOCK_N=module.BLOCK_N, BLOCK_C=module.BLOCK_C)
        for constexprs, divisible in ((blocks, True), (blocks, False),
                                      (sm90_compile.integers_as_ones(kernel, blocks, types), True)):
            report = sm90_compile.compile_sm90(kernel, constexprs, num_warps=TILE_WARPS, num_stages=2, types=types,
                                               divisible_sizes=divisible)
            assert report["local_bytes"] == 0 and report["stack_bytes"] == 0, f"{kernel.fn.__name__}: {report}"


def test_recorded_interpreter_launches_compile(tmp_path):
    """scripts/test.sh records every launch of the interpreter tier and compiles each for sm_90; here on one test
    file: the recorder sees each kernel as the GPU launcher would specialise it (types, an integer 1 a constant), and
    SupCon's statistics kernel at a batch of one row (B.to() failed there) is among what compiles."""
    import json
    import os
    import subprocess
    import sys
    launches = tmp_path / "launches.json"
    env = dict(os.environ, TRITON_INTERPRET="1", MARGINKERN_RECORD_LAUNCHES=str(launches))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/interpreter/test_triton_contrastive.py", "-k", "mode_one or confident_pairs"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    entries = json.loads(launches.read_text())
    kernels = {e["kernel"] for e in entries}
    assert {"supcon_stats_kernel", "supcon_grad_kernel", "info_nce_stats_kernel"} <= kernels, kernels
    grad = next(e for e in entries if e["kernel"] == "supcon_grad_kernel")
    assert grad["arguments"]["d_ptr"] == ["*fp32", "D"] and grad["arguments"]["BLOCK_N"][0] == "constexpr"
    # a batch of one row: B is the constant 1, as Triton's launcher makes it
    one_row = dict(next(e for e in entries if e["kernel"] == "supcon_stats_kernel"))
    one_row["arguments"] = {**one_row["arguments"], "B": ["constexpr", 1]}
    launches.write_text(json.dumps(entries + [one_row]))
    results = sm90_compile.compile_recorded(str(launches), jobs=1)
    assert results and not [(label, error) for label, _, error in results if error]
    assert any(label.startswith("supcon_stats_kernel") and "B=1" in label for label, _, _ in results)
