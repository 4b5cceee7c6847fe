"""Benchmark entry point: every case module, every provider, on whatever device is here.

    python bench/run.py                    # all case modules, full case list
    python bench/run.py --quick            # one small case per module, short timing (CPU: under a minute)
    python bench/run.py --cases face       # only the face-recognition cases
    python bench/run.py --device cpu       # force the CPU even where CUDA is present
    python bench/run.py --cases llm --only llama3-8b   # one case by name

Writes bench/results/<device>/<date>.{json,md,png} (never over existing files) and prints the table; the
JSON and the table are rewritten after every measurement, so a run stopped by SIGTERM (a time cap) keeps
what it measured, marked "interrupted". Exits 1 when the marginkern provider itself failed (an error, not a
skip or an OOM), so a script running it notices.
"""
import argparse
import datetime
import importlib
import os
import signal
import sys
import time

import torch

import harness

# Adding a family of cases = one module with cases(), PROVIDERS and FLOOR, plus one line here.
CASE_MODULES = {"face": "margin_cases", "llm": "lce_cases", "emo": "emo_cases", "cosent": "cosent_cases",
                "rl": "rl_cases", "kd": "kd_cases", "hf": "hf_cases", "proxy": "proxy_anchor_cases",
                "dpo": "preference_cases", "contrastive": "contrastive_cases", "gp": "global_pointer_cases",
                "sft": "sft_cases"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first case of each module, short timing")
    parser.add_argument("--cases", default="all", choices=["all", *CASE_MODULES],
                        help="which case module(s) to run (default: all)")
    parser.add_argument("--only", default=None,
                        help="comma-separated case names to run (default: every case of the chosen modules)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset of providers to run (default: all of them)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per (case, provider)")
    parser.add_argument("--tag", default=None, help="suffix for the result files: <date>-<tag>.* (-2, -3, ... "
                        "appended if those exist: nothing is overwritten)")
    parser.add_argument("--out-dir", default=None,
                        help="folder for the result files (default: bench/results/<device>/)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per measurement (OMP_NUM_THREADS); default: torch's own choice")
    return parser.parse_args()


def main():
    args = parse_args()
    device_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.threads:  # inherited by every worker process; torch reads it when it starts
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    harness.put_repo_on_path()
    env = {**harness.environment(device_type), **harness.marginkern_info(device_type)}
    chosen = list(CASE_MODULES) if args.cases == "all" else [args.cases]
    wanted = None if args.providers is None else set(args.providers.split(","))
    only = None if args.only is None else set(args.only.split(","))
    if only is not None:
        known = {case.name for family in chosen
                 for case in importlib.import_module(CASE_MODULES[family]).cases(device_type, args.quick)}
        if only - known:
            sys.exit(f"--only: no case named {', '.join(sorted(only - known))} among {', '.join(sorted(known))}")

    records = []
    start = time.perf_counter()
    load_before = _load_average()
    meta = {"command": " ".join(["python", "bench/run.py", *sys.argv[1:]]), "quick": args.quick,
            "date": datetime.date.today().isoformat(), "complete": False,
            # other processes on the machine skew CPU timings; these show whether there were any
            "load_average_1min_before": load_before}
    stem = harness.new_result_stem(device_type, args.tag, args.out_dir)
    signal.signal(signal.SIGTERM, _stop)  # timeout(1)'s signal: end like Ctrl-C, through the finally below
    try:
        _measure_all(args, chosen, wanted, only, device_type, records, start, env, meta, stem)
        meta["complete"] = True
    except KeyboardInterrupt:
        meta["interrupted"] = f"stopped after {time.perf_counter() - start:.0f} s"
        print(f"\ninterrupted: writing the {len(records)} measurements made", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the final write (and plot) is not to be cut short
        meta["wall_s"] = time.perf_counter() - start
        meta["load_average_1min_after"] = _load_average()
        table, paths = harness.write_results(records, env, meta, stem, with_plot=meta["complete"])
    print()
    print(table)
    print()
    print("wrote " + ", ".join(str(p) for p in paths))
    failed = [r for r in records if r["provider"] == "marginkern" and r["status"] == "error"]
    sys.exit(1 if failed or not meta["complete"] else 0)


def _stop(signum, frame):
    # once: timeout(1) may signal the process and its group, and a second signal must not interrupt the
    # final write of what was measured
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def _measure_all(args, chosen, wanted, only, device_type, records, start, env, meta, stem):
    for family in chosen:
        module_name = CASE_MODULES[family]
        module = importlib.import_module(module_name)
        for case in module.cases(device_type, args.quick):
            if only is not None and case.name not in only:
                continue
            for provider in module.PROVIDERS:
                if wanted is not None and provider not in wanted:
                    continue
                result = harness.run_isolated(module_name, case, provider, device_type, args.quick, args.timeout)
                record = {"family": family, "case": case.name, "N": case.N, "D": case.D, "C": case.C,
                          "dtype": case.dtype, "provider": provider, **result}
                print(f"[{time.perf_counter() - start:6.1f}s] {case.name:>18} {provider:<24} "
                      f"{_summary(record)}", flush=True)
                records.append(record)
                harness.add_floor_ratios([r for r in records if r["case"] == case.name], module.FLOOR)
                harness.write_results(records, env, meta, stem, with_plot=False)


def _load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _summary(record):
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('reason', '')}"[:200]
    mem = "n/a" if record.get("extra_mb") is None else f"{record['extra_mb']:.1f} MB"
    busy = record.get("other_load_cores")
    busy = f", contended: other processes kept {busy:.2f} cores busy" if record.get("contended") else ""
    return f"{record['ms']:.3f} ms, extra {mem}, first call {record['first_call_s']:.1f} s{busy}"


if __name__ == "__main__":
    main()
