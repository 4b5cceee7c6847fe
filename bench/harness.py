"""Generic benchmark machinery: timing, peak memory, device naming, isolated runs and result files.

Knows nothing about losses. A *cases module* (margin_cases.py, lce_cases.py, ...) provides
    cases(device_type, quick) -> list[Case]
    PROVIDERS: dict[name, build(case, device) -> Step]   (build raises Skip(reason) when it cannot run)
    FLOOR: the provider name whose time is the denominator of "ratio to floor"
and this file measures every (case, provider) pair in its own subprocess (worker.py), so a crash,
a CUDA OOM or a compile cache of one provider never leaks into the next one's numbers.
"""
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Skip(Exception):
    """Raised by a provider's build function when it cannot run here; the message is recorded."""


@dataclass
class Case:
    name: str
    N: int
    D: int
    C: int
    dtype: str  # key of DTYPES, kept as a string so a Case serializes to JSON
    classifier: bool = True  # an (N, D) × (C, D) classification case; False: no GEMMs (CoSENT's pairs)

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def gemm_flop(self):
        """FLOP of the three GEMMs any exact fwd+bwd needs: logits, dX, dW (2·N·C·D each); None for a case
        that has no such GEMMs."""
        return 3 * 2 * self.N * self.C * self.D if self.classifier else None


@dataclass
class Step:
    """One forward+backward, ready to call. `fn` returns the loss (or None); `grads_of` are the
    tensors whose .grad the user holds anyway (reset to None before every timed call).
    `memory_not_comparable`: why this step's peak memory means something else (then not reported)."""
    fn: Callable[[], Optional[torch.Tensor]]
    grads_of: list = field(default_factory=list)
    memory_not_comparable: Optional[str] = None


# ---------------------------------------------------------------------------------------- package

def put_repo_on_path():
    """Benchmark the installed marginkern if there is one, else the source tree this bench/ sits in."""
    import importlib.util
    if importlib.util.find_spec("marginkern") is None:
        sys.path.insert(0, str(REPO_ROOT))


def marginkern_info(device_type):
    """Which marginkern was measured, and which backend it says serves this device."""
    import marginkern
    info = {"marginkern_file": getattr(marginkern, "__file__", None),
            "marginkern_version": getattr(marginkern, "__version__", None)}
    dispatch = getattr(marginkern, "dispatch", None)
    if dispatch is not None:  # optional diagnostics, not part of the §3 contract
        info["marginkern_backends"] = dispatch.explain(device_type).splitlines()
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32  # the dtype of the standard cases
        info["marginkern_selected_backend"] = dispatch.selected_backend(device_type, dtype)
    return info


# ----------------------------------------------------------------------------------------- device

def _slug(text):
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device_type):
    """Human name of the device the numbers come from."""
    if device_type == "cuda":
        return torch.cuda.get_device_name(0)
    return cpu_model()


def device_slug(device_type):
    """Folder name under bench/results/: 'nvidia-h100-80gb-hbm3' or 'cpu-intel-xeon-processor'."""
    if device_type == "cuda":
        return _slug(device_name("cuda"))
    return "cpu-" + _slug(cpu_model())


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device_type):
    """Versions and settings that explain a number; stored in the JSON next to it."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device_name(device_type),
        "device_slug": device_slug(device_type),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "MARGINKERN_BACKEND": os.environ.get("MARGINKERN_BACKEND"),
        # every marginkern setting in force (tile config, split-K, ...): a number means nothing without them
        "marginkern_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MARGINKERN_")},
        "git_commit": _git_commit(),
        "peers": peer_versions(),
    }
    if device_type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def peer_versions():
    """Installed versions of the optional benchmark peers (None: not installed, so their rows are skipped)."""
    from importlib import metadata
    versions = {}
    for name in ("liger-kernel", "cut-cross-entropy", "sentence-transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)
    except OSError:
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------- measure

def _reset_grads(step):
    for t in step.grads_of:
        t.grad = None


def _grad_bytes(step):
    return sum(t.grad.numel() * t.grad.element_size() for t in step.grads_of if t.grad is not None)


def _proc_status_bytes(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_extra_bytes(step, device):
    """Peak memory one fwd+bwd needs above its inputs and the gradients the user holds anyway.

    CUDA: max_memory_allocated over the call. CPU: the process's resident-set high-water mark
    (VmHWM, reset through /proc/self/clear_refs) over the call, meaningful when the process runs with
    a fixed glibc mmap threshold (see run_isolated) so freed blocks go back to the OS.
    Returns None where neither can be measured (no /proc).

    The gradients are subtracted as they stand after the call. That is exact when the peak comes once they
    exist (the backward pass, or a forward pass that makes them, as the 3-GEMM path and Liger do); a
    provider whose peak came in its forward pass, before any gradient existed, would be credited their
    bytes (none of today's providers: naive PyTorch and torch.compile peak in the backward pass).
    """
    _reset_grads(step)
    synchronize(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step.fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        try:
            base = _proc_status_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            step.fn()
            return None
        step.fn()
        peak = _proc_status_bytes("VmHWM")
    return max(peak - base - _grad_bytes(step), 0)


# CUDA timing: at least this many timed calls (triton's do_bench takes a time budget instead, which gave 1–2
# calls of an 80–150 ms step: medians of two samples), more while they fit in the budget.
CUDA_MIN_CALLS = {False: 10, True: 5}
CUDA_BUDGET_MS = {False: 200.0, True: 50.0}
L2_FLUSH_BYTES = 256 << 20  # more than any GPU's L2 (H100/H200: 50 MB), as do_bench's cache clear


def _cuda_time_ms(step, quick):
    """do_bench's method with a minimum call count: an estimate from 3 calls, warm-up calls worth ~25 ms (≥ 1),
    then n timed calls, each between its own CUDA events after zeroing a 256 MB buffer (L2 flushed),
    gradients reset to None before each call."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(3):
        _reset_grads(step)
        step.fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(begin.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(25.0 / estimate))):
        _reset_grads(step)
        step.fn()
    n = min(1000, max(CUDA_MIN_CALLS[quick], int(CUDA_BUDGET_MS[quick] / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        _reset_grads(step)
        flush.zero_()
        starts[i].record()
        step.fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return statistics.median(times), min(times), max(times), n


def time_ms(step, device, quick):
    """(median, min, max, timed calls) in milliseconds of one fwd+bwd, gradients reset to None before
    each call as in training. CUDA: CUDA events, L2 flushed between calls, ≥ 10 calls (_cuda_time_ms)."""
    if device.type == "cuda":
        return _cuda_time_ms(step, quick)
    # A time budget rather than a fixed count: hundreds of calls of a small case let the median
    # ride out a short burst of another process on the machine; a slow case still gets 3 calls.
    budget_s, max_reps = (0.5, 200) if quick else (2.0, 500)
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        _reset_grads(step)
        t0 = time.perf_counter()
        step.fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times), len(times)


def _machine_busy_s():
    """CPU-seconds all processes have spent busy since boot (/proc/stat), or None without /proc."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _spare_cores():
    """Cores this process's torch threads leave free for others without slowing it down."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, cores - torch.get_num_threads())


class OtherLoad:
    """Measures how many CPU cores *other* processes kept busy during a block: on a shared machine
    CPU timings are only trustworthy when this is near 0 (run_isolated retries when it is not)."""

    def __enter__(self):
        self.busy, self.own, self.wall = _machine_busy_s(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy = _machine_busy_s()
        wall = time.perf_counter() - self.wall
        own = time.process_time() - self.own
        self.cores = None if busy is None else max(0.0, (busy - self.busy - own) / wall)
        return False


def _is_oom(exc):
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # CPU allocator


def measure(step_builder, case, device, quick, what=("time", "memory")):
    """Build one provider, call it once (compiles whatever compiles), then measure `what` in this
    process. Returns a result dict; every failure becomes a status, never an exception."""
    result = {"status": "ok"}
    try:
        t0 = time.perf_counter()
        step = step_builder(case, device)
        _reset_grads(step)
        loss = step.fn()
        synchronize(device)
        result["first_call_s"] = time.perf_counter() - t0
        result["loss"] = None if loss is None else float(loss)
        _reset_grads(step)
        step.fn()  # second warm-up call: lazily made workspaces and caches exist before measuring
        if "memory" in what and step.memory_not_comparable:
            result["extra_mb"], result["memory_status"] = None, f"not comparable: {step.memory_not_comparable}"
        elif "memory" in what:
            peak = peak_extra_bytes(step, device)
            result["extra_mb"] = None if peak is None else peak / 2**20
        if "time" in what:
            with OtherLoad() as other:
                result["ms"], result["ms_min"], result["ms_max"], result["reps"] = time_ms(step, device, quick)
            result["other_load_cores"] = other.cores
            result["contended"] = other.cores is not None and other.cores > _spare_cores() + BUSY_CORES
            result["tflops"] = None if case.gemm_flop is None else case.gemm_flop / (result["ms"] * 1e-3) / 1e12
    except Skip as exc:
        return {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001  (every failure is recorded, never fatal to the run)
        if _is_oom(exc):
            return {"status": "OOM", "reason": str(exc).splitlines()[0][:300]}
        return {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:1500]}",
                "traceback": traceback.format_exc()[-4000:]}
    return result


# CPU timings are rerun (up to this many attempts, fewer with --quick to stay within its minute)
# while other processes kept more than BUSY_CORES cores busy beyond the cores the worker left spare.
CPU_TIME_ATTEMPTS = {False: 3, True: 2}
BUSY_CORES = 0.25
RETRY_PAUSE_S = 3.0  # lets a short burst of another process pass before the next attempt


def run_isolated(cases_module, case, provider, device_type, quick, timeout_s):
    """Measure one (case, provider) in fresh Python processes (worker.py); returns its result dict.

    CUDA: one process measures memory and time. CPU: time in one process, memory in a second one
    started with glibc's mmap threshold fixed at 64 KiB, so freed tensors leave the resident set and
    its high-water mark follows live memory; that setting slows small CPU ops down (every large block
    is a fresh mmap), so it must not be active while timing. A CPU timing during which other
    processes kept the machine busy is rerun, and the quietest attempt is kept."""
    if device_type == "cuda":
        return _run_worker(cases_module, case, provider, device_type, quick, timeout_s, "time,memory", {})
    attempts = []
    while len(attempts) < CPU_TIME_ATTEMPTS[quick]:
        if attempts:
            time.sleep(RETRY_PAUSE_S)
        attempts.append(_run_worker(cases_module, case, provider, device_type, quick, timeout_s, "time", {}))
        if not attempts[-1].get("contended"):
            break  # the machine was quiet enough (or the run failed, which a retry would not change)
    result = min(attempts, key=lambda r: (r["status"] != "ok", bool(r.get("contended")),
                                          r.get("other_load_cores") or 0.0))
    result["attempts"] = len(attempts)
    if result["status"] == "ok":
        memory = _run_worker(cases_module, case, provider, device_type, quick, timeout_s, "memory",
                             {"MALLOC_MMAP_THRESHOLD_": "65536"})
        result["extra_mb"] = memory.get("extra_mb")
        if memory["status"] != "ok":
            result["memory_status"] = f"{memory['status']}: {memory.get('reason', '')}"
    return result


def _run_worker(cases_module, case, provider, device_type, quick, timeout_s, what, extra_env):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(BENCH_DIR / "worker.py"), cases_module, case.name, provider, device_type,
               str(out), "--what", what] + (["--quick"] if quick else [])
        # Own process group, so a timeout also ends the compile workers torch.compile may have started.
        proc = subprocess.Popen(cmd, env={**os.environ, **extra_env}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"status": "timeout", "reason": f"no result within {timeout_s} s"}
        except BaseException:  # the run itself is stopped (SIGTERM from a time cap, Ctrl-C): no orphan worker
            os.killpg(proc.pid, signal.SIGKILL)  # (its own session: it would keep the GPU busy after us)
            raise
        if out.exists():
            return json.loads(out.read_text())
        tail = (stderr or stdout or "").strip().splitlines()[-5:]
        return {"status": "error", "reason": f"worker exited {proc.returncode}: " + " | ".join(tail)}


# ---------------------------------------------------------------------------------------- results

def add_floor_ratios(records, floor_provider):
    """ratio_to_floor = ms / ms of the floor provider of the same case."""
    floor_ms = {r["case"]: r["ms"] for r in records if r["provider"] == floor_provider and r.get("ms")}
    for r in records:
        if r.get("ms") and r["case"] in floor_ms:
            r["ratio_to_floor"] = r["ms"] / floor_ms[r["case"]]


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def markdown_table(records):
    lines = ["| case | N | D | C | dtype | provider | fwd+bwd ms (median) | ratio to floor | extra MB "
             "| GEMM TFLOP/s | first call s | loss | other procs' cores | status |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        if r.get("memory_status"):
            status += f"; memory probe {r['memory_status']}"
        status = status.replace("|", "/").replace("\n", " ")[:160]
        lines.append(
            f"| {r['case']} | {r['N']} | {r['D']} | {r['C']} | {r['dtype']} | {r['provider']} "
            f"| {_fmt(r.get('ms'), '.3f')} | {_fmt(r.get('ratio_to_floor'), '.2f')} "
            f"| {_fmt(r.get('extra_mb'), '.1f')} | {_fmt(r.get('tflops'), '.3f')} "
            f"| {_fmt(r.get('first_call_s'), '.2f')} | {_fmt(r.get('loss'), '.6g')} "
            f"| {_fmt(r.get('other_load_cores'), '.2f')}{' (contended)' if r.get('contended') else ''} "
            f"| {status} |")
    return "\n".join(lines)


def plot_title(env, day, meta):
    return f"{env['device']} · {day} · torch {env['torch']}" + (" · quick" if meta.get("quick") else "")


def plot(records, title, path):
    """Two log-scale panels: time as a multiple of the 3-GEMM floor (bars labelled with ms), and extra
    memory. Providers that ran nowhere (skipped everywhere) are left out; OOM/error/timeout are labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in records))
    providers = [p for p in dict.fromkeys(r["provider"] for r in records)
                 if any(r["provider"] == p and r["status"] != "skipped" for r in records)]
    colors = dict(zip(providers, plt.get_cmap("tab10").colors))
    width = 0.8 / max(len(providers), 1)
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(cases) + 3) * 2, 4.8))
    panels = [("ratio_to_floor", "fwd+bwd time / 3-GEMM floor (bar label: ms)"), ("extra_mb", "extra memory (MB)")]
    for ax, (key, label) in zip(axes, panels):
        for i, prov in enumerate(providers):
            for j, case in enumerate(cases):
                r = next((r for r in records if r["case"] == case and r["provider"] == prov), None)
                if r is None:
                    continue
                x = j + (i - (len(providers) - 1) / 2) * width
                if r.get(key):
                    busy = key == "ratio_to_floor" and r.get("contended")
                    ax.bar(x, r[key], width, color=colors[prov], hatch="//" if busy else None,
                           edgecolor="black" if busy else None)
                    if key == "ratio_to_floor":
                        ax.annotate(f"{r['ms']:.3g}", (x, r[key]), ha="center", va="bottom", fontsize=6)
                elif r["status"] not in ("ok", "skipped"):
                    ax.annotate(r["status"], (x, 1), rotation=90, ha="center", va="bottom", fontsize=7,
                                color=colors[prov])
        ax.set_xticks(range(len(cases)), cases, fontsize=8)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        if key == "ratio_to_floor":
            ax.axhline(1.0, color="black", linewidth=0.8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in providers]
    labels = list(providers)
    if any(r.get("contended") for r in records):
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//"))
        labels.append("timed while other processes were busy")
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 6))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)


def result_stem(folder, day, tag=None):
    """<folder>/<date>[-tag], with -2, -3, ... appended when files of that name exist: a second run on the
    same day (or a second GPU visit, whose script uses fixed tags) never overwrites committed results."""
    base = day + (f"-{tag}" if tag else "")
    stem, k = folder / base, 1
    while any(stem.with_suffix(s).exists() for s in (".json", ".md", ".png")):
        k += 1
        stem = folder / f"{base}-{k}"
    return stem


def new_result_stem(device_type, tag=None, out_dir=None):
    """Where a run's files go: <out_dir or bench/results/<device>>/<date>[-tag][-k] (see result_stem)."""
    folder = Path(out_dir) if out_dir else BENCH_DIR / "results" / device_slug(device_type)
    folder.mkdir(parents=True, exist_ok=True)
    return result_stem(folder, datetime.date.today().isoformat(), tag)


def write_results(records, env, meta, stem, with_plot=True):
    """<stem>.{json,md,png}; returns (table, paths written). Called after every measurement with
    with_plot=False (a run stopped by a time cap keeps what it measured), then once at the end. The PNG
    needs matplotlib; without it the run says so and writes the rest."""
    day = meta.get("date") or datetime.date.today().isoformat()
    payload = {"date": day, "environment": env, "run": meta, "results": records}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    title = plot_title(env, day, meta)
    table = markdown_table(records)
    state = ("" if meta.get("complete", True) else
             f"**Incomplete run** ({meta.get('interrupted', 'still running')}): only the rows below were measured.")
    header = [f"# Benchmark {day}: {env['device']}", "", *([state, ""] if state else []),
              f"torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
              f"{env['cpu_threads']} CPU threads, commit {env['git_commit']}, "
              f"marginkern settings {env.get('marginkern_env') or 'defaults'}, "
              f"command `{meta['command']}`, 1-min load average {_fmt(meta.get('load_average_1min_before'), '.2f')} "
              f"before and {_fmt(meta.get('load_average_1min_after'), '.2f')} after "
              "(it counts this run's own processes too; the per-row 'other procs' cores' is the precise "
              "measure).", "",
              "fwd+bwd = forward and backward of one training step, gradients reset to None before each call. "
              "extra MB = peak memory above the inputs and the gradients the user holds anyway "
              "(CUDA: max_memory_allocated; CPU: resident-set high-water mark). "
              "ratio to floor = time / time of the family's floor provider (the 3 plain GEMMs of the same "
              "shapes; CoSENT: reading both batches once; hf: transformers' own step). "
              "GEMM TFLOP/s = 6·N·C·D / time. MB = 2^20 bytes. other procs' cores = CPU cores other "
              "processes kept busy while this row was timed; 'contended' = more than the cores the "
              "measurement left spare (+0.25): such rows were retried, the quietest attempt is shown, "
              "and its time is likely inflated.", "", table, ""]
    stem.with_suffix(".md").write_text("\n".join(header))
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if not with_plot:
        return table, written
    try:
        plot(records, title, stem.with_suffix(".png"))
        written.append(stem.with_suffix(".png"))
    except ImportError as exc:  # the GPU machine may lack matplotlib: the numbers matter more than the plot
        print(f"no plot: {exc} (pip install matplotlib; bench/plot_results.py <json> redraws it later)")
    return table, written
