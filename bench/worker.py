"""Measures one (case, provider) pair in a fresh process and writes its result dict as JSON.

    python bench/worker.py CASES_MODULE CASE_NAME PROVIDER DEVICE_TYPE OUT_JSON [--what time,memory] [--quick]

Started by harness.run_isolated; not meant to be run by hand except to debug one provider.
"""
import argparse
import importlib
import json
from pathlib import Path

import torch

import harness


def main():
    parser = argparse.ArgumentParser()
    for name in ("cases_module", "case", "provider", "device_type", "out"):
        parser.add_argument(name)
    parser.add_argument("--what", default="time,memory", help="comma-separated: time, memory")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    harness.put_repo_on_path()
    module = importlib.import_module(args.cases_module)
    case = next(c for c in module.cases(args.device_type, args.quick) if c.name == args.case)
    torch.manual_seed(0)  # every provider of a case sees the same inputs, so their losses must agree
    result = harness.measure(module.PROVIDERS[args.provider], case, torch.device(args.device_type), args.quick,
                             what=args.what.split(","))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
