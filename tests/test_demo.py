"""`python -m miniflamingo demo --quick` runs every stage of the pipeline end to end (a smoke test: the
quick budgets check that the stages fit together, not that the model learns), and a rerun resumes
from the recorded stages instead of training again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def demo(run: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "miniflamingo", "demo", "--quick", "--run", str(run)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_resumes(tmp_path):
    r = demo(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for f in ("vision.pt", "lm.pt", "flamingo.pt", "eval.json", "stages.json"):
        assert (tmp_path / f).is_file(), f"demo did not write {f}"
    assert "LM binding probe" in r.stdout
    assert (tmp_path / "lm_stage.log").is_file(), "the LM stage runs in the background, logging there"
    results = json.loads((tmp_path / "eval.json").read_text())
    for name, task in results["tasks"].items():
        assert set(task) >= {"metric", "shots", "blind"}, name
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert {"vision", "lm", "train", "eval"} <= set(stages)
    again = demo(tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("done in an earlier run") == 4, again.stdout
