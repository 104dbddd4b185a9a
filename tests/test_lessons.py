"""Lessons cannot drift from the code: every lessons/NN_*.py runs to exit code 0 (each asserts the claim it
teaches), in its quick form when it offers one (`--quick`), and lessons/README.md lists exactly the
lessons that exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
TIMEOUT = 300  # seconds per lesson; each aims at under 60 s on 2 cores


def test_there_are_lessons():
    assert LESSONS, f"no lessons/NN_*.py under {ROOT / 'lessons'}"


@pytest.mark.slow
@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_runs(path):
    args = [sys.executable, str(path)]
    if "--quick" in path.read_text():
        args.append("--quick")
    # One thread: lessons use tiny tensors, where a second thread only adds contention on a shared runner.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    try:
        r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{' '.join(args[1:])} ran over {TIMEOUT} s; its output so far:\n{out}")
    command = "python " + " ".join(args[1:])
    assert r.returncode == 0, (
        f"`{command}` exited with {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    )


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_says_how_to_run_it(path):
    doc = path.read_text()
    assert doc.startswith('"""Lesson '), f"{path.name} must open with a docstring 'Lesson N: ...'"
    run = f"python lessons/{path.name}"
    assert run in doc, f"{path.name}'s docstring must say how to run it: `{run}`"
    assert re.search(r"^Paper: ", doc, flags=re.M), f"{path.name}'s docstring must cite the paper section"


def test_readme_lists_exactly_the_lessons():
    readme = (ROOT / "lessons" / "README.md").read_text()
    named = set(re.findall(r"\b(\d\d_\w+\.py)\b", readme))
    present = {p.name for p in LESSONS}
    assert present <= named, f"lessons missing from lessons/README.md: {sorted(present - named)}"
    assert named <= present, f"lessons/README.md names files that do not exist: {sorted(named - present)}"
