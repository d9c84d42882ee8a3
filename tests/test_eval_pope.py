"""eval_pope.py: the official summariser's parse and scores against a reimplementation of it and against
hand computations, question / answer matching and bad input, resumable answering through the shared
stage (faked model), the tiny world's POPE splits checked against the scene graphs, and one end-to-end
run with a tiny random model through model.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import data
import eval_common
import eval_pope
import tinyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def official_parse(text: str) -> str:
    """The official summariser's rule, written out step by step as its script reads."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


CASES = {   # answer text -> what the official rule makes of it (by hand)
    "Yes": "yes", "No": "no", "No.": "no", "no": "no", "Yes, there is a dog.": "yes",
    "No, there is no dog.": "no", "There is no dog in the image.": "no", "I do not see one": "no",
    "Yes. There is no cat.": "yes",          # only the first sentence counts
    "NO": "yes", "Nope": "yes", "Not really": "yes",   # exact words only, case as written
    "No,": "no", "no,there": "yes",          # the comma is dropped: "no,there" -> "nothere"
    "There is a cat, not a dog": "no", "cannot tell": "yes", "": "yes",
    "no\nthere": "yes",                      # split on single spaces only: "no\nthere" is one word
    "3.5 no": "yes",                         # text before the first "." is "3"
    "Yes  no": "no",                         # two spaces: an empty word between, "no" still a word
}


def test_parse_matches_the_official_rule_and_hand_labels():
    for text, want in CASES.items():
        assert eval_pope.pope_answer(text) == want == official_parse(text), text


def write_lines(path, rows) -> str:
    with open(path, "w") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def questions(n: int, labels: str | None = None) -> list[dict]:
    labels = labels or "yn" * n
    return [{"question_id": i + 1, "image": f"img{i % 3}.png", "text": f"Is there a thing-{i} in the image?",
             "label": "yes" if labels[i] == "y" else "no"} for i in range(n)]


def test_scores_equal_a_hand_computation(tmp_path, capsys):
    # 10 questions: labels y n y n y n y n y n; answers chosen to give TP 3, FN 2, FP 1, TN 4.
    qs = questions(10)
    texts = ["Yes, there is.", "No.", "Yes", "No, there is no thing.", "There is no thing.",   # TP TN TP TN FN
             "Yes.", "It is there", "I do not see it", "No", "No, not at all"]                 # FP TP TN FN TN
    qfile = write_lines(tmp_path / "q.jsonl", qs)
    # answers in another order than the questions: matched by question_id
    ans = [{"question_id": q["question_id"], "prompt": q["text"], "text": t, "model_id": "m"} for q, t in zip(qs, texts)]
    afile = write_lines(tmp_path / "a.jsonl", ans[::-1])
    scores = eval_pope.main(["score", "--answers_file", afile, "--question_file", qfile])
    tp, fp, fn = 3, 1, 2   # and TN 4
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    want = {"accuracy": 7 / 10, "precision": 3 / 4, "recall": 3 / 5,
            "f1": 2 * precision * recall / (precision + recall), "yes_ratio": 4 / 10, "n": 10}
    assert scores == pytest.approx(want) and set(scores) == set(want)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == pytest.approx(want)
    assert json.loads((tmp_path / "a.scores.json").read_text()) == pytest.approx(want)

    # Where the official script divides by zero (no "yes" at all): 0, not a crash.
    none_yes = write_lines(tmp_path / "none.jsonl", [{**a, "text": "No"} for a in ans])
    s = eval_pope.score_file(none_yes, qfile)
    assert s["precision"] == s["recall"] == s["f1"] == 0.0 and s["accuracy"] == 0.5 and s["yes_ratio"] == 0.0


def test_mean_over_splits_is_the_papers_overall():
    per = {"random": {"accuracy": .9, "precision": .8, "recall": .7, "f1": .833, "yes_ratio": .4, "n": 10},
           "popular": {"accuracy": .8, "precision": .7, "recall": .6, "f1": .818, "yes_ratio": .5, "n": 20},
           "adversarial": {"accuracy": .7, "precision": .6, "recall": .5, "f1": .795, "yes_ratio": .6, "n": 30}}
    m = eval_pope.mean_scores(per)
    assert m["f1"] == pytest.approx((.833 + .818 + .795) / 3) and m["n"] == 60
    assert m["yes_ratio"] == pytest.approx(0.5) and m["accuracy"] == pytest.approx(0.8)
    # the paper's 7B row: 83.3 / 81.8 / 79.5 -> overall 81.5
    assert round(100 * (0.833 + 0.818 + 0.795) / 3, 1) == 81.5


def cli_error(argv: list[str]) -> str:
    r = subprocess.run([sys.executable, "eval_pope.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    return r.stderr


def test_bad_input_names_file_and_line(tmp_path):
    qs = questions(4)
    ans = [{"question_id": q["question_id"], "prompt": q["text"], "text": "Yes", "model_id": "m"} for q in qs]
    good_q = write_lines(tmp_path / "q.jsonl", qs)
    cases = [
        (write_lines(tmp_path / "label.jsonl", qs[:2] + [{**qs[2], "label": "Yes"}]), None, "label.jsonl: line 3: label should be 'yes' or 'no', got 'Yes'"),
        (write_lines(tmp_path / "shape.jsonl", qs[:1] + [{"question_id": 9, "image": "x.png", "label": "no"}]), None, "shape.jsonl: line 2: 'text' should be str, got missing"),
        (write_lines(tmp_path / "json.jsonl", qs[:1] + ["{not json"]), None, "json.jsonl: line 2: invalid JSON"),
        (write_lines(tmp_path / "dup.jsonl", qs[:2] + [qs[0]]), None, "dup.jsonl: line 3: duplicate question_id 1 (first on line 1)"),
        (good_q, write_lines(tmp_path / "missing.jsonl", ans[:3]), "missing.jsonl: no answer for question_id 4 (" + good_q + " line 4"),
        (good_q, write_lines(tmp_path / "twice.jsonl", ans + [ans[1]]), "twice.jsonl: line 5: question_id 2 answered twice"),
        (good_q, write_lines(tmp_path / "stray.jsonl", ans + [{**ans[0], "question_id": 77}]), "stray.jsonl: question_id 77 is not in"),
    ]
    for qfile, afile, want in cases:
        afile = afile or write_lines(tmp_path / "a.jsonl", ans)
        assert want in cli_error(["score", "--question_file", qfile, "--answers_file", afile])
    assert "usage" in cli_error(["scores"])


# ----------------------------------------------------------------------------------------------------
# Answering through the shared stage, with a fake model.

def make_images(folder, names) -> str:
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for k, n in enumerate(names):
        Image.new("RGB", (10 + k, 7), (40 * k % 256, 90, 30)).save(os.path.join(folder, n))
    return str(folder)


class FakeAnswerer:
    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    def __call__(self, records, paths):
        assert all(os.path.isfile(p) for p in paths)
        self.calls.append([r["question"] for r in records])
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt   # the run is killed mid-way
        # "thing-K": even K answered yes
        return ["Yes, there is." if int(r["question"].split("thing-")[1].split(" ")[0]) % 2 == 0 else "No, there is not."
                for r in records]


def test_run_resumes_and_scores_three_splits(tmp_path, monkeypatch):
    imgs = make_images(tmp_path / "imgs", ["img0.png", "img1.png", "img2.png"])
    files = {s: write_lines(tmp_path / f"{s}.jsonl", questions(6, labels)) for s, labels in
             (("random", "ynynyn"), ("popular", "yyynnn"), ("adversarial", "nnnyyy"))}
    out = tmp_path / "out"
    first = FakeAnswerer(fail_on_call=3)
    monkeypatch.setattr(eval_common, "build_answerer", lambda cfg: first)
    spec = ",".join(f"{s}={p}" for s, p in files.items())
    args = ["run", "--model_path", "some/model", "--question_files", spec, "--image_folder", imgs,
            "--out_dir", str(out), "--batch_size", "4", "--plot", "false"]
    with pytest.raises(KeyboardInterrupt):
        eval_pope.main(args)
    # random: 6 answered (batches of 4 and 2); popular: its first batch was being answered when killed
    assert len((out / "random.answers.jsonl").read_text().splitlines()) == 6
    assert not (out / "popular.answers.jsonl").exists()
    line = json.loads((out / "random.answers.jsonl").read_text().splitlines()[0])
    assert line == {"question_id": 1, "prompt": "Is there a thing-0 in the image?", "text": "Yes, there is.", "model_id": "model"}
    assert first.calls[0][0] == "Is there a thing-0 in the image?" + eval_pope.DEFAULT_INSTRUCTION

    # a torn last line (killed mid-write) is dropped and that question answered again
    with open(out / "random.answers.jsonl", "a") as f:
        f.write('{"question_id": 7, "te')
    second = FakeAnswerer()
    monkeypatch.setattr(eval_common, "build_answerer", lambda cfg: second)
    scores = eval_pope.main(args)
    assert [len(c) for c in second.calls] == [4, 2, 4, 2]   # popular and adversarial only; one model
    # the fake says yes to even K: questions K = 0..5 are yes, no, yes, no, yes, no
    pred = "ynynyn"
    for split, labels in (("random", "ynynyn"), ("popular", "yyynnn"), ("adversarial", "nnnyyy")):
        tp = sum(p == l == "y" for p, l in zip(pred, labels))
        fp = sum(p == "y" and l == "n" for p, l in zip(pred, labels))
        tn = sum(p == l == "n" for p, l in zip(pred, labels))
        fn = sum(p == "n" and l == "y" for p, l in zip(pred, labels))
        prec, rec = (tp / (tp + fp) if tp + fp else 0), (tp / (tp + fn) if tp + fn else 0)
        want = {"accuracy": (tp + tn) / 6, "precision": prec, "recall": rec,
                "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0, "yes_ratio": 0.5, "n": 6}
        assert scores[split] == pytest.approx(want), split
    assert scores["random"]["accuracy"] == 1.0 and scores["adversarial"]["accuracy"] == pytest.approx(2 / 6)
    assert scores["mean"]["f1"] == pytest.approx(sum(scores[s]["f1"] for s in files) / 3) and scores["mean"]["n"] == 18
    doc = json.loads((out / "pope.json").read_text())
    assert doc["benchmark"] == "pope" and doc["scores"] == scores   # JSON keeps floats exactly
    assert doc["settings"]["answer"]["prompt_suffix"] == eval_pope.DEFAULT_INSTRUCTION
    assert doc["settings"]["answer"]["decoding"] == "greedy"

    # complete: scored again without a model; another instruction may not continue these answers
    monkeypatch.setattr(eval_common, "build_answerer", lambda cfg: pytest.fail("model loaded again"))
    assert eval_pope.main([a for a in args if a not in ("--model_path", "some/model")]) == scores
    with pytest.raises(eval_pope.common.ConfigError, match="started with prompt_suffix"):
        eval_pope.main([*args, "--instruction", ""])

    # compare: two models' POPE side by side
    table = eval_pope.main(["compare", f"a={out / 'pope.json'}", f"b={out / 'pope.json'}"])
    header, _, row_a, row_b = table.splitlines()
    assert "POPE F1 ran" in header and "POPE F1 mean" in header
    assert f"{100 * scores['mean']['f1']:.2f}" in row_a and row_a[1:] == row_b[1:]


def test_missing_image_and_bad_question_fail_before_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_common, "build_answerer", lambda cfg: pytest.fail("model loaded before the check"))
    imgs = make_images(tmp_path / "imgs", ["img0.png", "img1.png"])   # img2.png is missing
    good = write_lines(tmp_path / "good.jsonl", questions(2))
    bad = write_lines(tmp_path / "bad.jsonl", questions(6))
    spec = f"random={good},popular={bad}"
    with pytest.raises(FileNotFoundError, match=r"bad.jsonl: line 3: image 'img2.png' not found"):
        eval_pope.main(["run", "--model_path", "m", "--question_files", spec, "--image_folder", imgs,
                        "--out_dir", str(tmp_path / "o")])
    nolabel = write_lines(tmp_path / "nolabel.jsonl", questions(2) + [{**questions(3)[2], "label": "maybe"}])
    with pytest.raises(data.DataError, match="nolabel.jsonl: line 3: label"):
        eval_pope.main(["run", "--model_path", "m", "--question_files", f"random={good},x={nolabel}",
                        "--image_folder", imgs, "--out_dir", str(tmp_path / "o")])


# ----------------------------------------------------------------------------------------------------
# The tiny world's POPE.

def test_tiny_pope_splits_follow_the_scene_graphs():
    pool = tinyworld._pool(0, "heldout", 60, 0)
    scenes = dict(pool)
    splits = tinyworld.build_pope(pool, 0, 100)
    assert list(splits) == ["random", "popular", "adversarial"]
    yes_questions = None
    for split, qs in splits.items():
        assert len(qs) == 100 and sum(q["label"] == "yes" for q in qs) == 50
        assert [q["question_id"] for q in qs] == list(range(1, 101))
        for q in qs:
            assert set(q) == {"question_id", "image", "text", "label"}
            words = q["text"].split()
            assert words[:3] == ["Is", "there", "a"] and words[5:] == ["in", "the", "image?"]
            color, kind = words[3], words[4]
            truth = any(s["color"] == color and s["kind"] == kind for s in scenes[q["image"]]["shapes"])
            assert q["label"] == ("yes" if truth else "no"), q
        yes = [(q["image"], q["text"]) for q in qs if q["label"] == "yes"]
        yes_questions = yes_questions or yes
        assert yes == yes_questions   # the same images and present objects in every split

    def parts(q):   # how many of the asked object's parts (colour, kind) the image holds
        color, kind = q["text"].split()[3:5]
        shapes = scenes[q["image"]]["shapes"]
        return (color in {s["color"] for s in shapes}) + (kind in {s["kind"] for s in shapes})

    share = {s: sum(parts(q) == 2 for q in qs if q["label"] == "no") / 50 for s, qs in splits.items()}
    assert share["adversarial"] > share["random"] + 0.3
    # popular asks about the most frequent absent objects: fewer distinct ones than random
    distinct = {s: len({q["text"] for q in qs if q["label"] == "no"}) for s, qs in splits.items()}
    assert distinct["popular"] <= distinct["random"]
    with pytest.raises(ValueError, match="even"):
        tinyworld.build_pope(pool, 0, 7)


def test_tiny_world_pope_end_to_end(tiny_world, tmp_path):
    # make wrote the three files over DATA/images; a few questions each through the real loader and model
    d = tiny_world["data"]
    files = {}
    for split in eval_pope.SPLITS:
        lines = (d / "eval" / f"pope_{split}.jsonl").read_text().splitlines()
        assert len(lines) >= 8
        files[split] = write_lines(tmp_path / f"{split}.jsonl", lines[:6])
    scores = eval_pope.evaluate_splits(str(tiny_world["model"]), files, str(d / "images"), str(tmp_path / "out"),
                                       batch_size=4, instruction="", max_new_tokens=4, plot=False)
    assert set(scores) == {"random", "popular", "adversarial", "mean"}
    for split in eval_pope.SPLITS:
        answers = eval_common.read_answers(str(tmp_path / "out" / f"{split}.answers.jsonl"))
        assert len(answers) == 6 and all(a["model_id"] == "model" for a in answers.values())
        # the scores are the official rule applied to what the model wrote
        labels = [json.loads(x)["label"] for x in open(files[split])]
        preds = [official_parse(answers[i + 1]["text"]) for i in range(6)]
        assert scores[split]["accuracy"] == pytest.approx(sum(p == lab for p, lab in zip(preds, labels)) / 6)
        assert scores[split]["yes_ratio"] == pytest.approx(preds.count("yes") / 6)
        assert set(scores[split]) == set(eval_pope.SCORE_KEYS) and scores[split]["n"] == 6
