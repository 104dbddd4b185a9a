"""README cannot drift: every ```python block runs, every `python -m miniflamingo ...` command shown
exists (its --help works), every benchmark named exists, and .ci/run runs exactly the README's
test command."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    return [line.strip() for b in blocks("bash") for line in b.splitlines() if line.strip()]


def run(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def test_readme_opens_with_the_two_setup_commands():
    first = commands()[:2]
    assert len(first) == 2, "README must open with the demo command and the test command"
    assert "python -m miniflamingo demo" in first[0] or "pretrain-lm" in first[0], first[0]
    assert "pytest" in first[1], first[1]
    for c in first:
        pinned = re.search(r"pip install (-q )?torch==2\.13\.0", c)
        assert pinned, f"setup command must pin the CPU torch first: {c}"


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands()[1] in ci.splitlines(), "README's test command and .ci/run differ"


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_python_snippet_runs(i):
    r = run([sys.executable, "-c", blocks("python")[i]])
    assert r.returncode == 0, f"README python block {i} failed:\n{r.stdout}\n{r.stderr}"


def test_commands_shown_exist():
    shown = [c for c in commands()[2:] if c.startswith("python -m miniflamingo")]
    names = sorted({c.split()[3] for c in shown})
    for name in names:
        r = run([sys.executable, "-m", "miniflamingo", name, "--help"])
        assert r.returncode == 0, f"`python -m miniflamingo {name} --help` failed:\n{r.stderr}"
    for c in commands():
        for path in re.findall(r"python (benchmarks/\S+\.py)", c):
            assert (ROOT / path).exists(), f"README names {path}, which does not exist"
