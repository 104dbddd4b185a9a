"""The demo's few-shot table over several runs (seeds): mean and range of each cell, for README.

    for s in 0 1 2 3; do python -m miniflamingo demo --seed $s --run runs/demo_seed$s; done
    python benchmarks/demo_seeds.py runs/demo_seed0 runs/demo_seed1 runs/demo_seed2 runs/demo_seed3

One demo's table is one draw: a perturbation of 5e-7 in the features moved its video questions from 62.5
to 46.5% (README). This reads each run's eval.json and prints, per task and shots, the mean over runs,
the lowest and the highest, and the blind row's mean (metrics x100, as the demo prints them).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(run: str) -> dict:
    path = Path(run) / "eval.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no eval.json (has the demo finished in {run}?)")
    try:
        return json.loads(path.read_text())["tasks"]
    except (json.JSONDecodeError, KeyError) as e:
        raise SystemExit(f"{path}: not an eval.json ({e})") from None


def table(runs: list[dict]) -> list[str]:
    lines = [f"{'task':<16}{'shots':>6}  {'mean':>6}  {'range':>13}  {'blind':>6}"]
    for task, first in runs[0].items():
        for shots in first["shots"]:
            values = [r[task]["shots"].get(shots) for r in runs if task in r]
            values = [100 * v for v in values if v is not None]
            if not values:
                continue  # a prompt longer than the LM's context in every run
            blind = [100 * r[task]["blind"][shots] for r in runs
                     if task in r and r[task].get("blind", {}).get(shots) is not None]
            blind_text = f"{statistics.mean(blind):6.1f}" if blind else f"{'-':>6}"
            lines.append(f"{task:<16}{shots:>6}  {statistics.mean(values):6.1f}  "
                         f"{min(values):6.1f}-{max(values):<6.1f}  {blind_text}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    print(f"{len(argv)} runs: {', '.join(argv)}")
    print("\n".join(table([load(r) for r in argv])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
