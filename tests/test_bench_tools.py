"""The benchmark tools a GPU visit depends on run (on the CPU here), so that a visit is not spent on a typo."""
import subprocess
import sys
from pathlib import Path

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


def test_run_only_names_an_unknown_case():
    done = run(str(BENCH / "run.py"), "--cases", "face", "--device", "cpu", "--only", "cpu-face-5k,nope")
    assert done.returncode != 0 and "no case named nope among" in done.stderr
