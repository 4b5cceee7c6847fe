"""Redraws the PNG of a results JSON (harness.plot), for runs made where matplotlib was missing:

    python bench/plot_results.py bench/results/<device>/<date>[-tag].json     # writes the .png beside it
"""
import json
import sys
from pathlib import Path

import harness


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    path = Path(sys.argv[1])
    data = json.loads(path.read_text())
    env = data["environment"]
    harness.plot(data["results"], harness.plot_title(env, data["date"], data["run"]), path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
