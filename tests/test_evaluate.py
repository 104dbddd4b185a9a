"""The evaluation suite and its commands (issue 7): eval.json's schema, shot counts that do not fit the
context skipped as null, blind rows on the very same prompts with media zeroed, closed gates making the
blind row equal the seeing one, the table, loading runs (and naming a missing or corrupt checkpoint), and
`eval` / `ask` end to end on a saved untrained tiny model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import IMAGE_SIZE, tiny_model

from miniflamingo import ask, world_text
from miniflamingo import evaluate as ev
from miniflamingo import fewshot as fs
from miniflamingo.data import DataError
from miniflamingo.trainutil import CheckpointError
from miniflamingo.world_render import HELDOUT_COMBOS

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples" / "captions"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An untrained tiny model with open gates, saved as the training code saves it."""
    model = tiny_model()
    run = tmp_path_factory.mktemp("run")
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict(), "step": 0}, run / "flamingo.pt")
    return run


def check_schema(results: dict, tasks, shots, k_shots):
    assert list(results["tasks"]) == list(tasks)
    for name, row in results["tasks"].items():
        task = ev.TASKS[name]
        keys = [str(k) for k in (k_shots if task.per_class else shots)]
        assert row["metric"] == task.metric and row["unit"] in ("shots", "shots per class")
        assert list(row["shots"]) == keys and list(row["blind"]) == keys
        for values in (row["shots"], row["blind"]):
            for v in values.values():
                top = 10.0 if task.metric == "cider_d" else 1.0
                assert v is None or (isinstance(v, float) and 0.0 <= v <= top and not math.isnan(v))
        assert [v is None for v in row["shots"].values()] == [v is None for v in row["blind"].values()]
    json.dumps(results)  # plain JSON


def test_schema_and_skipped_shot_counts(tok, world):
    model = tiny_model()
    tasks, shots, k_shots = ["captioning", "ambiguous"], (0, 4, 16), (0, 1, 8)
    r = ev.evaluate(model, tok, world, tasks, shots, episodes=2, k_shots=k_shots, ensemble=2)
    check_schema(r, tasks, shots, k_shots)
    cap, amb = r["tasks"]["captioning"], r["tasks"]["ambiguous"]
    assert cap["shots"]["16"] is None and cap["blind"]["16"] is None  # 16 captions do not fit 256 tokens
    assert cap["shots"]["4"] is not None and amb["shots"]["1"] is not None
    assert amb["shots"]["8"] is None  # ambiguous episodes have at most 4 examples per word
    table = ev.format_table(r)
    print(table)
    lines = table.splitlines()
    assert lines[0].split()[-3:] == ["0", "4", "16"] and any("k per class" in line for line in lines)
    assert lines[1].startswith("captioning") and lines[1].split()[-1] == "-" and "blind" in lines[2]
    assert f"{100 * amb['shots']['1']:.1f}" in table
    samples = r["samples"]["captioning"]
    assert len(samples["4"]) == 2 and all(isinstance(p, str) and a.startswith("a ") for p, a in samples["4"])
    assert samples["16"] == [] and "ambiguous" not in r["samples"]


def test_blind_rows_run_the_same_prompts_with_media_zeroed(tok, world, monkeypatch):
    calls = []
    real = fs.encode_prompt_media

    def spy(model, prompts, blind=False):
        calls.append(([p.ids for p in prompts], [len(p.media) for p in prompts], blind))
        return real(model, prompts, blind)

    monkeypatch.setattr(fs, "encode_prompt_media", spy)
    ev.evaluate(tiny_model(), tok, world, ["vqa", "binding_2way"], (0, 2), episodes=2, k_shots=(0, 1),
                ensemble=1)
    seeing = [c[:2] for c in calls if not c[2]]
    blind = [c[:2] for c in calls if c[2]]
    assert len(seeing) == len(blind) == 4 and seeing == blind  # every cell, the same ids and media counts
    # zero-shot VQA: two text-only examples, one image (the query); binding k=0: just the query
    assert seeing[0][1] == [1, 1] and seeing[2][1] == [1, 1]
    assert all(ids.count(tok.image_id) == 1 for ids in seeing[0][0])
    assert seeing[1][1] == [3, 3] and seeing[3][1] == [3, 3]  # 2 shots + query; 2-way k=1 + query


def test_deterministic(tok, world):
    runs = [ev.evaluate(tiny_model(), tok, world, ["heldout_combos", "novel_2way"], (1,), episodes=2,
                        k_shots=(1,), ensemble=2, seed=3) for _ in range(2)]
    assert runs[0] == runs[1]


def test_closed_gates_make_blind_equal_seeing(tok, world):
    """An untrained Flamingo is its frozen LM (gates at 0): media cannot matter, so blind == seeing."""
    r = ev.evaluate(tiny_model(open_gates=False), tok, world, ["vqa", "binding_5way"], (0, 2), episodes=2,
                    k_shots=(0, 1), ensemble=1)
    for row in r["tasks"].values():
        assert row["shots"] == row["blind"]


def test_rices_support_is_the_most_similar(tok, world, monkeypatch):
    chosen = []
    real = fs.rices_support

    def spy(query, pool, n):
        out = real(query, pool, n)
        sims = torch.nn.functional.cosine_similarity(pool, query[None], dim=1)
        assert sims[out].tolist() == sorted(sims[out].tolist())  # most similar last
        assert sims[out[0]] >= sims.sort(descending=True).values[n - 1] - 1e-6  # the top n
        chosen.append(out)
        return out

    monkeypatch.setattr(fs, "rices_support", spy)
    r = ev.evaluate(tiny_model(), tok, world, ["vqa"], (0, 3), episodes=2, rices=True)
    assert len(chosen) == 2 and all(len(c) == 3 for c in chosen) and r["settings"]["rices"] is True


def test_blind_rows_never_see_the_query_through_rices(tok, world, monkeypatch):
    """With --rices the examples are chosen by the query's image; the blind row must not be (a blind
    model copying the most similar example's answer would read the image through them). Its prompts are
    exactly those of the random-support run; the seeing row's are the retrieved ones."""
    real, calls = fs.generate_answers, []

    def spy(model, tok, prompts, *a, blind=False, **kw):
        calls.append((blind, [tuple(p.ids) for p in prompts]))
        return real(model, tok, prompts, *a, blind=blind, **kw)

    monkeypatch.setattr(fs, "generate_answers", spy)
    model = tiny_model()
    runs = {}
    for rices in (False, True):
        calls.clear()
        ev.evaluate(model, tok, world, ["vqa"], (0, 3), episodes=3, rices=rices)
        runs[rices] = {blind: [c for b, c in calls if b == blind] for blind in (False, True)}
    assert runs[True][True] == runs[False][True] == runs[False][False], "blind: the random-support prompts"
    assert runs[True][False][0] == runs[False][False][0], "zero-shot prompts have no examples to retrieve"
    assert runs[True][False][1] != runs[False][False][1], "3 shots: RICES chose other examples"


# ----------------------------------------------------------------------------- runs and commands


def test_load_run_round_trip_and_errors(run_dir, tmp_path, capsys):
    model, cfg = ev.load_run(run_dir)
    assert cfg == tiny_model().cfg and not model.training
    saved = torch.load(run_dir / "flamingo.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="flamingo.pt"):
        ev.load_run(tmp_path / "nowhere")
    (tmp_path / "flamingo.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="flamingo.pt"):
        ev.load_run(tmp_path)
    torch.save({"weights": {}}, tmp_path / "flamingo.pt")
    with pytest.raises(CheckpointError, match="'model' and 'config'"):
        ev.load_run(tmp_path)
    assert ev.main(["--run", str(tmp_path / "nowhere")]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_eval_command_end_to_end(run_dir, capsys):
    assert ev.main(["--run", str(run_dir), "--shots", "0,2", "--k", "0,1", "--episodes", "1",
                    "--ensemble", "2", "--binding-episodes", "2"]) == 0
    out = capsys.readouterr().out
    results = json.loads((run_dir / "eval.json").read_text())
    check_schema(results, list(ev.TASKS), (0, 2), (0, 1))
    assert all(name in out for name in ev.TASKS) and out.count("blind") == len(ev.TASKS)
    assert results["settings"]["episodes"] == 1 and results["settings"]["binding_episodes"] == 2


def test_binding_tasks_take_their_own_episode_count(tok, world, monkeypatch):
    """--binding-episodes: the binding cells rank that many episodes each, the open-ended ones answer
    --episodes queries; without it both take --episodes."""
    drawn = []
    real = ev.binding_episode
    monkeypatch.setattr(ev, "binding_episode", lambda *a: drawn.append(a) or real(*a))
    r = ev.evaluate(tiny_model(), tok, world, ["vqa", "binding_2way"], (0,), episodes=1, k_shots=(0, 1),
                    ensemble=1, binding_episodes=3)
    assert [(name, k) for _, name, k, _ in drawn] == [("binding_2way", 0)] * 3 + [("binding_2way", 1)] * 3
    assert len({seed for *_, seed in drawn}) == 3  # three different episodes, the same three for each k
    assert len(r["samples"]["vqa"]["0"]) == 1 and r["settings"]["binding_episodes"] == 3
    drawn.clear()
    r = ev.evaluate(tiny_model(), tok, world, ["binding_2way"], (0,), episodes=2, k_shots=(1,), ensemble=1)
    assert len(drawn) == 2 and r["settings"]["binding_episodes"] == 2
    with pytest.raises(SystemExit):
        ev.main(["--run", "nowhere", "--binding-episodes", "0"])


def test_ask_on_sample_photos(run_dir, tmp_path, capsys):
    args = ["--run", str(run_dir), "--image", str(SAMPLES / "chelsea.jpg")]
    assert ask.main(args + ["--examples", str(SAMPLES / "captions.jsonl"), "--shots", "3"]) == 0
    out = capsys.readouterr().out
    prompt = next(line for line in out.splitlines() if line.startswith("prompt: "))
    assert prompt.count("<image>") == 4 and prompt.endswith("<image>Output:") and "answer: " in out
    # the photo itself is among the examples: RICES finds it (cosine 1) and puts it last, next to the query
    assert prompt.endswith("<image>Output: A close-up of a tabby cat with green eyes looking to the side."
                           "<|endofchunk|><image>Output:")
    assert ask.main(args + ["--question", "What animal is this?", "--shots", "2"]) == 0
    out = capsys.readouterr().out
    assert "synthetic world" in out and "Short answer:" in out
    assert out.split("prompt: ")[1].count("<image>") == 3
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"image": str(SAMPLES / "chelsea.jpg"), "caption": "a cat"})
    bad.write_text(good + '\n{"image": 3}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        ask.read_examples(bad, IMAGE_SIZE)
    bad.write_text(good + '\n["chelsea.jpg", "a cat"]\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        ask.read_examples(bad, IMAGE_SIZE)
    assert ask.main(args + ["--examples", str(bad)]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_ask_reads_examples_as_the_readers_do_and_fails_clearly(run_dir, tmp_path, capsys, tok):
    """`ask --examples`: the captions folder itself will do; JSON's raw U+2028 inside a string is not a
    line break; a file that is not UTF-8, a negative --shots and a question longer than the context each
    end with a one-line error (exit 1 or 2), not a traceback."""
    args = ["--run", str(run_dir), "--image", str(SAMPLES / "chelsea.jpg")]
    assert ask.main(args + ["--examples", str(SAMPLES), "--shots", "1"]) == 0  # the folder
    assert capsys.readouterr().out.split("prompt: ")[1].count("<image>") == 2
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"image": str(SAMPLES / "chelsea.jpg"), "caption": "a cat\u2028twice"},
                              ensure_ascii=False) + "\n", encoding="utf-8")
    assert ask.read_examples(odd, IMAGE_SIZE)[0]["caption"] == "a cat\u2028twice"
    odd.write_bytes(b'{"image": "chelsea.jpg", "caption": "caf\xe9"}\n')  # Latin-1, not UTF-8
    assert ask.main(args + ["--examples", str(odd)]) == 1
    assert "odd.jsonl: not UTF-8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ask.main(args + ["--shots", "-1"])
    assert e.value.code == 2 and "--shots must be >= 0" in capsys.readouterr().err
    assert ask.main(args + ["--question", "why " * 300]) == 1
    assert "ask a shorter question" in capsys.readouterr().err
    # an example too long for the context: dropped, then its text-only form too; the bare query still goes
    model, image = tiny_model(), np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    long = {"image": image, "caption": "word " * model.cfg.lm.context_length}
    _, prompt = ask.ask(model, tok, image, None, [long], shots=1)
    assert len(prompt.media) == 1 and "word" not in tok.decode(prompt.ids)
    assert "using 0 of 1 examples" in capsys.readouterr().out


def test_split_tasks_partitions_the_suite_in_order():
    tasks = list(ev.TASKS)
    for jobs in range(1, 12):
        groups = ev.split_tasks(tasks, jobs)
        assert sorted(t for g in groups for t in g) == sorted(tasks) and len(groups) == min(jobs, len(tasks))
        assert all(g == [t for t in tasks if t in g] for g in groups), "each group in the suite's order"
    two = ev.split_tasks(tasks, 2)
    loads = [sum(ev.TASK_SECONDS[t] for t in g) for g in two]
    assert max(loads) - min(loads) <= max(ev.TASK_SECONDS.values()) / 2, loads


def test_jobs_split_gives_the_one_process_results(run_dir, tmp_path, capsys):
    """`eval --jobs 2` (the demo's): the tasks split over two processes, merged into the same eval.json
    as one process writes, cell for cell and in the same order; the table printed once, whole."""
    common = ["--run", str(run_dir), "--episodes", "2", "--binding-episodes", "3", "--shots", "0,1",
              "--k", "0,1", "--tasks", "vqa,binding_2way,captioning,novel_5way"]  # not the suite's order
    assert ev.main([*common, "--out", str(tmp_path / "one.json")]) == 0
    assert ev.main([*common, "--jobs", "2", "--out", str(tmp_path / "two.json")]) == 0
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["tasks"] == one["tasks"] and list(two["tasks"]) == list(one["tasks"]) == [
        "vqa", "binding_2way", "captioning", "novel_5way"]
    assert two["samples"] == one["samples"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "two.json"], "no part file left"
    table = capsys.readouterr().out.split("wrote")[-2]  # the second run's table
    assert all(t in table for t in ("captioning", "vqa", "binding_2way", "novel_5way"))


def test_jobs_a_failed_child_stops_the_eval_naming_its_tasks(run_dir, tmp_path, monkeypatch):
    import subprocess
    import sys

    real = subprocess.Popen
    monkeypatch.setattr(ev.subprocess, "Popen", lambda cmd, **kw: real(
        [sys.executable, "-c", "import sys; sys.exit(3)"], **kw))  # the child dies at once
    with pytest.raises(SystemExit, match=r"evaluating vqa failed \(exit 3"):
        ev.main(["--run", str(run_dir), "--episodes", "1", "--binding-episodes", "1", "--shots", "0",
                 "--k", "1", "--tasks", "vqa,binding_2way", "--jobs", "2", "--out", str(tmp_path / "e.json")])
    assert list(tmp_path.iterdir()) == [], "no eval.json, no part file"


def test_kinds_split_the_total(tok, world):
    """Per-kind VQA accuracy: every question kind the set holds, each the mean over its own questions
    (recomputed here from the samples' definition), and the kinds' size-weighted mean is the total."""
    model = tiny_model()
    r = ev.evaluate(model, tok, world, ["vqa", "video_qa", "captioning"], (0,), episodes=12, k_shots=())
    for name, expected in (("vqa", set(world_text.QUESTION_KINDS)), ("video_qa", {"move", "colour",
                                                                                  "grows", "shrinks"})):
        row = r["tasks"][name]
        kinds = row["kinds"]["0"]
        items = ev.open_items(world, name, 12, "test", 0)
        counts = {k: sum(x["kind"] == k for x in items) for k in kinds}
        assert set(kinds) <= expected and sum(counts.values()) == 12
        if name == "vqa":
            assert set(kinds) == expected  # 12 questions cycle through the six kinds
        total = sum(counts[k] * v for k, v in kinds.items()) / 12
        assert total == pytest.approx(row["shots"]["0"])
    assert "kinds" not in r["tasks"]["captioning"]
    text = ev.format_kinds(r)
    assert text.splitlines()[0].startswith("vqa by kind, 0 shots: colour ") and "video_qa by kind" in text


def test_heldout_combos_support_never_shows_a_heldout_combination(world):
    """The held-out combinations' queries each ask about one; their support pool ("val", where the world
    allows them) holds colour and shape questions about images with none of them, so no example can give
    a query's answer away (a quarter of "val" images show one: the pool drawn without the filter had 17
    of 64)."""
    held_out = set(HELDOUT_COMBOS)
    shown = lambda x: {(o["colour"], o["shape"]) for o in x["attrs"]["objects"]}  # noqa: E731
    queries = ev.open_items(world, "heldout_combos", 16, "test", 0)
    assert all(shown(x) & held_out for x in queries)
    pool = ev.open_items(world, "heldout_combos", 64, "val", 0)
    assert len(pool) == 64 and {x["kind"] for x in pool} == {"colour", "shape"}
    assert not any(shown(x) & held_out for x in pool)
    unfiltered = [x for x in world.vqa_set(192, "val", 0) if x["kind"] in ("colour", "shape")]
    assert any(shown(x) & held_out for x in unfiltered)  # so the filter is what keeps them out


def test_caption_shots_benchmark_agrees_with_the_eval(run_dir, tok, world, capsys):
    """benchmarks/caption_shots.py captions the eval's own queries with the eval's own prompts: its cells are
    `evaluate`'s captioning cells, caption for caption, and its paired change is the per-query difference."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "caption_shots", Path(__file__).resolve().parent.parent / "benchmarks" / "caption_shots.py")
    cs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cs)
    mean, se = cs.paired_change([1.0, 2.0, 3.0], [2.0, 2.0, 5.0])
    assert mean == pytest.approx(1.0) and se == pytest.approx(1.0 / math.sqrt(3))
    assert cs.attribute_words("a small red circle, a large red square") == {
        "small": 1, "red": 2, "circle": 1, "large": 1, "square": 1}
    assert cs.main(["--run", str(run_dir), "--queries", "3", "--shots", "0,1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["0", "1"] and len(rows[0]) == len(rows[1]) - 1  # 1 shot adds the change
    model, cfg = ev.load_run(run_dir)
    assert cfg.vision.image_size == world.image_size  # the world the script builds makes the same images
    results = ev.evaluate(model, tok, world, ["captioning"], shots=(0, 1), episodes=3)
    _, cells = cs.caption_cells(model, tok, world, 3, [0, 1])
    for k in ("0", "1"):
        assert [p for p, _ in results["samples"]["captioning"][k]] == cells[int(k)][2]
        assert cells[int(k)][0] == pytest.approx(results["tasks"]["captioning"]["shots"][k])
        assert np.mean(cells[int(k)][3]) == pytest.approx(cells[int(k)][0])  # corpus score: the mean
