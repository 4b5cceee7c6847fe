"""The benchmark tools a GPU visit depends on run (on the CPU here), so that a visit is not spent on a typo."""
import subprocess
import sys
from pathlib import Path

from tests.helpers import needs_triton_interpreter

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=BENCH.parent, timeout=600)


def test_profile_step_lists_where_a_step_spends_its_time():
    # a provider that cannot run here (no CUDA extension) is reported and the others still run
    done = run(str(BENCH / "profile_step.py"), "face", "cpu-face-5k", "marginkern cuda", "marginkern", "3-GEMM floor",
               "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("aten calls/step") == 2 and "aten::mm" in done.stdout
    assert "marginkern cuda: Skip" in done.stdout


def test_no_grad_skipping_times_each_loss_eager_and_compiled():
    done = run(str(BENCH / "no_grad_skipping.py"), "--shape", "64", "32", "512")
    assert done.returncode == 0, done.stderr
    timed = [line for line in done.stdout.splitlines()[1:] if line.split()[-1].replace(".", "").isdigit()]
    assert len(timed) == 9 and sum("compiled skipping" in line for line in timed) == 2, done.stdout


def test_run_only_names_an_unknown_case():
    done = run(str(BENCH / "run.py"), "--cases", "face", "--device", "cpu", "--only", "cpu-face-5k,nope")
    assert done.returncode != 0 and "no case named nope among" in done.stderr


def test_sweep_names_each_cases_fastest_config_for_the_benchmarks(tmp_path):
    """scripts/gpu_session.sh benchmarks with the config the sweep wrote; a failed row never wins and a
    case without a measured row is left out (the default config then applies)."""
    sys.path.insert(0, str(BENCH))
    import sweep_triton_configs as sweep
    from marginkern.triton_kernels.tiles import parse_config
    slow, fast = sweep.grid(quick=True)[:2]
    rows = [{"case": "arcface-1M", "status": "ok", **slow, "fwd_ms": 2.0, "chunk_ms": 0.1, "chunk_classes": 10_000},
            {"case": "arcface-1M", "status": "ok", **fast, "fwd_ms": 1.0, "chunk_ms": 0.1, "chunk_classes": 10_000},
            {"case": "arcface-1M", "status": "error: out of shared memory", **slow},
            {"case": "llama3-8b", "status": "error: out of shared memory", **fast}]
    path = tmp_path / "best.txt"
    sweep.write_best(rows, ["arcface-1M", "llama3-8b"], path)
    (line,) = path.read_text().splitlines()
    case, config = line.split()
    assert case == "arcface-1M" and parse_config(config) == parse_config(",".join(f"{k}={v}" for k, v in fast.items()))


@needs_triton_interpreter
def test_count_host_ops_counts_a_step_without_a_gpu():
    import os
    env = {**os.environ, "TRITON_INTERPRET": "1", "MARGINKERN_BACKEND": "triton"}
    done = subprocess.run([sys.executable, str(BENCH / "count_host_ops.py"), "linear", "--dtype", "float16"],
                          capture_output=True, text=True, cwd=BENCH.parent, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert "outermost ATen ops" in done.stdout and "marginkern::linear_cross_entropy_backward" in done.stdout
    assert "streaming_ce_grad_logits_kernel" in done.stdout


@needs_triton_interpreter
def test_margin_step_host_ops_stay_few():
    # face-small (N = 256) is host-bound: one ArcFace fwd+bwd was 229 outermost ATen ops, 66 after the
    # per-row Triton kernels (bench/NOTES.md, "Sixth session"), 56 after the eighth session's trims. A
    # bound, so that a regression shows here before a GPU visit does (torch is pinned in CI; its internals
    # set the exact count)
    import os
    import re
    env = {**os.environ, "TRITON_INTERPRET": "1", "MARGINKERN_BACKEND": "triton"}
    done = subprocess.run([sys.executable, str(BENCH / "count_host_ops.py"), "margin", "--dtype", "bfloat16"],
                          capture_output=True, text=True, cwd=BENCH.parent, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    ops, launches = map(int, re.search(r"(\d+) outermost ATen ops, (\d+) Triton launches", done.stdout).groups())
    assert ops <= 62 and launches <= 8, done.stdout


@needs_triton_interpreter
def test_count_host_ops_times_the_host_side():
    import os
    import re
    env = {**os.environ, "TRITON_INTERPRET": "1", "MARGINKERN_BACKEND": "triton"}
    done = subprocess.run([sys.executable, str(BENCH / "count_host_ops.py"), "margin", "--time"],
                          capture_output=True, text=True, cwd=BENCH.parent, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    micros = float(re.search(r"(\d+) µs of host time per fwd\+bwd", done.stdout).group(1))
    assert 10 < micros < 100_000, done.stdout  # no-op launches: no interpreter time in it


def test_results_never_overwrite_and_survive_a_missing_matplotlib(tmp_path):
    # a second run of the same day and tag (e.g. a second GPU visit: its script uses fixed tags) writes
    # <date>-<tag>-2.*; without matplotlib (the GPU machine may lack it) the numbers are still written
    args = (str(BENCH / "run.py"), "--cases", "face", "--device", "cpu", "--only", "cpu-face-5k", "--quick",
            "--providers", "3-GEMM floor", "--tag", "t", "--out-dir", str(tmp_path))
    for _ in range(2):
        done = run(*args)
        assert done.returncode == 0, done.stderr
    stems = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert len(stems) == 2 and stems[0].endswith("-t") and stems[1].endswith("-t-2"), stems
    assert all((tmp_path / f"{s}.md").exists() for s in stems)


def test_a_run_stopped_by_sigterm_keeps_its_measurements(tmp_path):
    # a GPU visit's step is cut by timeout(1): what was measured must survive (the JSON is rewritten after
    # every measurement) and the worker in progress must not outlive the run (it has its own session)
    import json
    import signal
    import time
    cmd = [sys.executable, str(BENCH / "run.py"), "--cases", "face", "--device", "cpu", "--only", "cpu-face-5k",
           "--quick", "--providers", "3-GEMM floor,naive,marginkern", "--out-dir", str(tmp_path), "--tag", "cut"]
    proc = subprocess.Popen(cmd, cwd=BENCH.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("*.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err  # not complete
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert data["run"]["complete"] is False and "interrupted" in data["run"], data["run"]
    assert len(data["results"]) >= 1 and data["results"][0]["status"] == "ok", data["results"]
    assert "Incomplete run" in path.with_suffix(".md").read_text()
    for _ in range(50):  # the worker's SIGKILL is delivered asynchronously
        workers = subprocess.run(["pgrep", "-f", "worker.py margin_cases cpu-face-5k"], capture_output=True, text=True)
        if not workers.stdout.strip():
            break
        time.sleep(0.1)
    assert workers.stdout.strip() == "", "a worker outlived the run"


def test_hf_case_steps_build_one_model_and_batch():
    # the whole-model case (bench/hf_cases.py): both providers' steps, built under one seed as the worker builds
    # them, run a tiny Llama to the same loss and fill every parameter's gradient
    import pytest
    import torch
    pytest.importorskip("transformers")
    sys.path.insert(0, str(BENCH))
    try:
        import hf_cases
        from harness import Case
    finally:
        sys.path.remove(str(BENCH))
    import marginkern.huggingface
    case = Case("tiny-hf", 256, 64, 4000, "float32", classifier=False)
    losses, patched = [], []
    real_patch = marginkern.huggingface.patch_causal_lm
    try:
        marginkern.huggingface.patch_causal_lm = lambda model: patched.append(model) or real_patch(model)
        for build in (hf_cases.transformers_step, hf_cases.patched_step):
            torch.manual_seed(0)
            step = build(case, "cpu")
            losses.append(step.fn())
            assert all(p.grad is not None for p in step.grads_of)
    finally:
        marginkern.huggingface.patch_causal_lm = real_patch
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    tokens = torch.ones(1, 4, dtype=torch.long)
    assert len(patched) == 1 and patched[0](tokens, labels=tokens).logits is None  # the patched provider is patched


def test_the_visits_benchmark_steps_name_existing_cases_and_providers():
    """Every `bench <family> <cases> "<providers>"` step of scripts/gpu_session.sh's visit names a family of run.py,
    CUDA cases of that family and providers it has: a typo there costs a GPU visit's step, found only on the GPU."""
    import importlib
    import re
    import shlex
    sys.path.insert(0, str(BENCH))
    try:
        run_module = importlib.import_module("run")
        script = (BENCH.parent / "scripts" / "gpu_session.sh").read_text().replace("\\\n", " ")
        steps = [shlex.split(line.split("bench ", 1)[1]) for line in script.splitlines()
                 if re.match(r'^\s*(MARGINKERN_\w+="[^"]*"\s+)?bench \w', line)]
        assert len(steps) >= 15
        for family, names, providers, *_ in steps:
            module = importlib.import_module(run_module.CASE_MODULES[family])
            cuda_cases = {case.name for case in module.cases("cuda", quick=False)}
            assert set(names.split(",")) <= cuda_cases, (family, names, cuda_cases)
            assert set(providers.split(",")) <= set(module.PROVIDERS), (family, providers, set(module.PROVIDERS))
    finally:
        sys.path.remove(str(BENCH))
