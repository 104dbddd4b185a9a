"""`python -m miniflamingo demo --quick` runs every stage of the pipeline end to end (a smoke test: the
quick budgets check that the stages fit together, not that the model learns), and a rerun resumes
from the recorded stages instead of training again."""

import json
import os
import subprocess
import sys
import time
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
    # a vision stage that was cut short (here: its record lost after its last checkpoint) resumes from its
    # checkpoint instead of training from step 0
    del stages["vision"]
    (tmp_path / "stages.json").write_text(json.dumps(stages))
    resumed = demo(tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout, resumed.stdout
    # a stage record that is not JSON (a hand edit; the demo itself replaces it whole) fails naming it
    (tmp_path / "stages.json").write_text('{"vision": {"seconds"')
    broken = demo(tmp_path)
    assert broken.returncode != 0 and "stages.json is not valid JSON" in broken.stderr, broken.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_background_stage_dies_with_the_demo(tmp_path):
    """The LM stage runs in a child process started by trainutil.start_command, whose preexec_fn is
    die_with_parent: if the demo is killed (SIGKILL: no `finally` runs), the child gets SIGTERM from the
    kernel instead of training on."""
    parent = (
        "import subprocess, sys, time\n"
        "from miniflamingo import trainutil\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        "preexec_fn=trainutil.die_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)
    child = int(proc.stdout.readline())
    proc.kill()
    proc.wait()

    def alive(pid: int) -> bool:  # a zombie (dead, not yet reaped by whoever adopted it) counts as gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the background stage outlived the killed demo"


def test_demo_seeds_summarises_runs_and_names_a_missing_eval(tmp_path, capsys):
    """benchmarks/demo_seeds.py: mean and range per cell over runs, cells missing everywhere skipped."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "demo_seeds", Path(__file__).resolve().parent.parent / "benchmarks" / "demo_seeds.py")
    demo_seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_seeds)
    for name, acc, blind in (("a", 0.5, 0.2), ("b", 0.7, 0.3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"tasks": {"vqa": {
            "metric": "VQA acc.", "shots": {"0": acc, "16": None}, "blind": {"0": blind, "16": None}}}}))
    assert demo_seeds.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("vqa")]
    assert rows == [["vqa", "0", "60.0", "50.0-70.0", "25.0"]]
    with pytest.raises(SystemExit, match="no eval.json"):
        demo_seeds.main([str(tmp_path)])


def test_when_lm_done_renders_once_the_lm_ends_then_raises_threads_and_hands_the_pixels_over(tmp_path):
    """The vision stage's hook (demo.WhenLMDone): nothing while the LM's process runs; once it has ended,
    Flamingo's data is rendered in a thread (the same as train.render_data), the thread count is raised
    only after that, and result() hands the pixels over without keeping them."""
    import threading

    import torch

    from miniflamingo import demo as demo_mod
    from miniflamingo import train as train_mod

    class Job:  # what start_in_background returns: (process, start time, log path)
        code = None

        def poll(self):
            return self.code

    proc = Job()
    argv = ["--run", str(tmp_path), "--docs", "6", "--pairs", "4", "--videos", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hook = demo_mod.WhenLMDone((proc, 0.0, None), argv, threads=2)
        hook(1)
        assert hook.thread is None and torch.get_num_threads() == 1, "acted while the LM still trains"
        proc.code = 0
        hook(2)
        assert isinstance(hook.thread, threading.Thread)
        hook.thread.join()
        hook(3)
        assert torch.get_num_threads() == 2 and hook.raised
        rendered = hook.result()
        assert hook.rendered is None, "the hook kept the pixels"
        expected = train_mod.render_data(argv)
        assert rendered["argv"] == expected["argv"] == argv
        for name, d in expected["data"].items():
            got = rendered["data"][name]
            assert got.texts == d.texts, name
            pairs = [(a, b) for ma, mb in zip(got.media, d.media) for a, b in zip(ma, mb)]
            same = [(a is None and b is None) or torch.equal(torch.as_tensor(a), torch.as_tensor(b))
                    for a, b in pairs]
            assert pairs and all(same), name
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("lm", ["still_training", "ended_late"])
def test_demo_encodes_flamingos_data_on_every_core_whichever_stage_ends_first(tmp_path, monkeypatch, lm):
    """The vision stage ends on one torch thread. If the LM is still training then, or ended so late that
    WhenLMDone's rendering outlasted the vision stage's last step (so the hook never raised the thread
    count), the demo still encodes Flamingo's data with the thread count it began with: the LM's core
    must not idle through the encoding (demo.main says why)."""
    import torch

    from miniflamingo import demo as demo_mod
    from miniflamingo import pretrain_vision
    from miniflamingo import train as train_mod

    class Job:  # the background LM stage
        def poll(self):
            return None if lm == "still_training" else 0

        def terminate(self):
            pass

    class Stop(Exception):
        pass

    seen = {}
    pixels = {"argv": None, "data": "pixels"}  # stands in for train.render_data's result

    def vision_stage(argv, on_step):
        torch.set_num_threads(1)  # as pretrain-vision does
        on_step(1)  # still training: nothing; ended: the rendering starts, and this was the last step
        return 0

    def prepare_data(argv, rendered):
        seen.update(threads=torch.get_num_threads(), rendered=rendered)
        raise Stop  # the rest of the demo is not this test's

    monkeypatch.setattr(demo_mod, "start_in_background", lambda name, argv, done, run: (Job(), 0.0, None))
    monkeypatch.setattr(pretrain_vision, "main", vision_stage)
    monkeypatch.setattr(train_mod, "render_data", lambda argv: pixels)
    monkeypatch.setattr(train_mod, "prepare_data", prepare_data)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(Stop):
            demo_mod.main(["--run", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert seen == {"threads": 2, "rendered": None if lm == "still_training" else pixels}


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc smaps_rollup")
def test_tree_memory_sums_the_command_and_its_children(tmp_path, capsys):
    """benchmarks/tree_memory.py, which README's memory figure comes from: a parent holding 400 MiB while
    its child holds 200 MiB must peak above 600 MiB in all (`time -v` would say about 400), and the
    child's process must appear in the peak's breakdown."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tree_memory", ROOT / "benchmarks" / "tree_memory.py")
    tree_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tree_memory)
    child = "import time; b = bytearray(200 * 2**20); time.sleep(1.5)"
    parent = (f"import subprocess, sys; a = bytearray(400 * 2**20); "
              f"subprocess.run([sys.executable, '-c', {child!r}], check=True)")
    out = tmp_path / "samples.jsonl"
    assert tree_memory.main(["--every", "0.1", "--out", str(out), "--", sys.executable, "-c", parent]) == 0
    err = capsys.readouterr().err
    peak = float(err.split("peak PSS of the process tree ")[1].split(" GiB")[0])
    assert 600 / 1024 < peak < 1.2, err
    breakdown = err.split("peak RSS of each process")[0]
    assert breakdown.count("GiB") == 3 and "bytearray(200" in breakdown, err  # total, parent, child
    assert len(out.read_text().splitlines()) > 5
    assert tree_memory.main(["--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
