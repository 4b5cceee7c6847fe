"""The issues' performance targets, checked against benchmark results: one verdict per target and device.

    python bench/check_targets.py bench/results/nvidia-h100-80gb-hbm3/     # every JSON in a folder
    python bench/check_targets.py a.json b.json --markdown                # a table for README/NOTES

A target compares marginkern with another provider (the 3-GEMM floor, torch.compile, a peer) measured in
the SAME run (one results file): timings of different runs are not comparable (clocks, load, code). Where
the two rows come from different files the verdict says so and does not count as met. Verdicts:

    met            every condition holds in one run
    NOT met        a condition fails (the numbers say which)
    not measured   a row the target needs is missing or did not finish (OOM, skip, error)

Rows timed fewer than 10 times (the first H100 visit's do_bench timed 1–2 calls of the longest steps) or
from an interrupted run are marked, and a marginkern row from a GPU other than an H100/H200 or not in bf16
does not decide a GPU target. Reads JSON, writes nothing; exit status 0 whatever the verdicts.
"""
import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

FLOOR = "3-GEMM floor"
MIB = 1 << 20


@dataclass(frozen=True)
class Target:
    issue: str
    what: str
    case: str
    ratio_to: tuple = ()        # (provider, at most this many times its time)
    faster_than: tuple = ()     # providers marginkern must beat
    max_ms: float = None
    max_mb: float = None
    gpu: bool = True            # an H100/H200 bf16 target (else: the CPU target of the csrc issue)


def quarter_logits_mb(N, C):
    """The csrc issue's CPU memory bound: a quarter of one fp32 N × C logits matrix (the gradients, which
    the bound adds, are not in the harness's extra memory)."""
    return N * C * 4 / 4 / MIB


TARGETS = [
    Target("2", "ArcFace (1024, 512, 1M): ≤ 1.5× floor, ≤ 64 MB", "arcface-1M", ratio_to=(FLOOR, 1.5), max_mb=64),
    Target("2", "ArcFace (256, 512, 100k): ≤ 2× floor", "face-small-100k", ratio_to=(FLOOR, 2.0)),
    *(Target("3", f"{case}: default faster than torch.compile, Liger, CCE; ≤ 256 MB", case,
             faster_than=("torch.compile", "liger-kernel", "cut-cross-entropy"), max_mb=256)
      for case in ("gemma2-2b", "llama3-8b")),
    *(Target("3", f"{case}: exact ≤ 1.35× floor", case, ratio_to=(FLOOR, 1.35)) for case in ("gemma2-2b", "llama3-8b")),
    Target("4", "EMO + CE, Llama-3-8B shape: ≤ 75 ms, ≤ 256 MB", "emo-llama3-8b", max_ms=75.0, max_mb=256),
    Target("4", "CoSENT from embeddings, 65536 pairs: ≤ 2× reading both once", "cosent-65k",
           ratio_to=("read both once", 2.0)),
    *(Target("5", f"CPU {case} (512, 128, 200000): ≥ naive's speed, < ¼ fp32 logits ({quarter_logits_mb(512, 200_000):.1f} MB)",
             case, faster_than=("naive",), max_mb=quarter_logits_mb(512, 200_000), gpu=False)
      for case in ("cpu-face-200k", "cpu-llm-200k", "cpu-emo-200k")),
]


@dataclass
class Row:
    file: str
    date: str
    device: str
    on_cpu: bool
    complete: bool
    data: dict

    @property
    def ok(self):
        return self.data.get("status") == "ok" and self.data.get("ms") is not None

    def caveats(self):
        notes = []
        reps = self.data.get("reps")
        if not self.on_cpu and (reps is None or reps < 10):  # the CPU harness times long steps 3–5 times
            notes.append(f"{'unknown' if reps is None else reps} timed calls")
        if not self.complete:
            notes.append("interrupted run")
        if self.data.get("contended"):
            notes.append("contended")
        return notes


def load_rows(paths):
    """Every result row of the JSON files named or found in the folders named, with its file and device."""
    files = []
    for p in map(Path, paths):
        if not p.exists():  # a visit whose benchmarks all failed or were skipped has no results folder
            print(f"check_targets: no results at {p}", file=sys.stderr)
            continue
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    rows = []
    for f in files:
        data = json.loads(f.read_text())
        env, complete = data.get("environment", {}), data.get("complete", True) is not False
        device = env.get("device", "?")
        on_cpu = env["device_slug"].startswith("cpu-") if "device_slug" in env else "NVIDIA" not in device
        for r in data.get("results", []):
            rows.append(Row(str(f), str(data.get("date", "")), device, on_cpu, complete, r))
    return rows


def ms_text(ms):
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


@dataclass
class Verdict:
    target: Target
    device: str
    state: str                      # met / NOT met / not measured
    numbers: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    date: str = ""                  # of the results file, which decides "latest"
    file: str = ""


def _row_counts(row, target):
    """Whether a marginkern row can decide `target`: an H100/H200 in bf16 for the GPU targets, a CPU for the
    CPU ones."""
    if target.gpu:
        return any(name in row.device for name in ("H100", "H200")) and row.data.get("dtype") == "bfloat16"
    return row.on_cpu


def check(target, rows):
    """One verdict per results file holding the target's marginkern row (main() reports each device's latest)."""
    mine = [r for r in rows if r.data.get("case") == target.case and r.data.get("provider") == "marginkern"
            and _row_counts(r, target)]
    if not mine:
        return [Verdict(target, "-", "not measured", notes=["no marginkern row"])]
    verdicts = []
    for row in mine:
        v = Verdict(target, row.device, "met", notes=[f"{Path(row.file).name}"] + row.caveats(), date=row.date,
                    file=row.file)
        if not row.ok:
            v.state = "not measured"
            v.numbers.append(f"marginkern {row.data.get('status')}")
            verdicts.append(v)
            continue
        ms, mb = row.data["ms"], row.data.get("extra_mb")
        v.numbers.append(ms_text(ms) + (f", {mb:.1f} MB" if mb is not None else ""))
        failed = missing = False
        if target.max_ms is not None and ms > target.max_ms:
            failed = True
            v.numbers.append(f"> {target.max_ms:g} ms")
        if target.max_mb is not None and (mb is None or mb > target.max_mb):
            failed = True
            v.numbers.append(f"> {target.max_mb:.1f} MB")
        others = list(target.faster_than) + ([target.ratio_to[0]] if target.ratio_to else [])
        for provider in others:
            same_run = [r for r in rows if r.file == row.file and r.data.get("case") == target.case
                        and r.data.get("provider") == provider]
            elsewhere = [r for r in rows if r.file != row.file and r.device == row.device
                         and r.data.get("case") == target.case and r.data.get("provider") == provider and r.ok]
            if same_run and same_run[0].ok:
                other = same_run[0].data["ms"]
            elif same_run and same_run[0].data.get("status") == "oom" and provider in target.faster_than:
                v.numbers.append(f"{provider}: out of memory")  # it cannot be faster than a finished run
                continue
            else:
                missing = True
                hint = f" (other run: {ms_text(elsewhere[0].data['ms'])}, {Path(elsewhere[0].file).name})" if elsewhere else ""
                v.numbers.append(f"{provider}: not in this run{hint}")
                continue
            if target.ratio_to and provider == target.ratio_to[0]:
                ratio, bound = ms / other, target.ratio_to[1]
                v.numbers.append(f"{ratio:.2f}× {provider} ({ms_text(other)}; goal ≤ {bound:g}×)")
                failed |= ratio > bound
            if provider in target.faster_than:
                v.numbers.append(f"{provider} {ms_text(other)}")
                failed |= not ms < other
        v.state = "NOT met" if failed else ("not measured" if missing else "met")
        verdicts.append(v)
    return verdicts


def latest_per_device(verdicts):
    """The verdict of each device's latest run (by the results' date, then file name: `-2` after the first),
    so that a later regression is not hidden behind an earlier run that met the target."""
    latest = {}
    for v in sorted(verdicts, key=lambda v: (v.date, *run_order(v.file))):
        latest[v.device] = v
    return list(latest.values())


def run_order(file):
    """(name, n) of a results file: the harness names a repeated run <name>-2, -3, ... beside <name>."""
    path = Path(file)
    match = re.fullmatch(r"(.*)-(\d+)", path.stem)
    if match and path.with_name(match.group(1) + path.suffix).exists():
        return match.group(1), int(match.group(2))
    return path.stem, 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="results JSON files or folders of them")
    parser.add_argument("--markdown", action="store_true", help="a markdown table instead of plain lines")
    parser.add_argument("--all-runs", action="store_true", help="every run's verdict, not only each device's latest")
    args = parser.parse_args()
    rows = load_rows(args.paths)
    verdicts = []
    for target in TARGETS:
        found = check(target, rows)
        verdicts.extend(found if args.all_runs else latest_per_device(found))
    if args.markdown:
        print("| issue | target | device | verdict | numbers | notes |\n|---|---|---|---|---|---|")
    for v in verdicts:
        if args.markdown:
            print(f"| {v.target.issue} | {v.target.what} | {v.device} | {v.state} | {'; '.join(v.numbers)} | "
                  f"{'; '.join(v.notes)} |")
        else:
            print(f"issue {v.target.issue}  {v.state:12s}  {v.target.what}\n      {v.device}: "
                  f"{'; '.join(v.numbers)}  [{'; '.join(v.notes)}]")


if __name__ == "__main__":
    main()
