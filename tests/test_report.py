"""report.py on a small synthetic pipeline folder (no training): what it finds, what the HTML holds (the
config, the curves, the PPO rollouts with their reward parts, the answers side by side with ratings and
each claim checked against the scene), that it needs nothing outside the file, and what headless Chromium
shows of it (skipped without Chromium)."""
import base64
import io
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from PIL import Image

import common
import report
import tinyworld

# a scene made by hand: a small yellow circle top right on grass
SCENE = {"background": "grass", "shapes": [{"kind": "circle", "color": "yellow", "size": "small",
                                             "quadrant": "top right", "box": [45, 14, 57, 26]}], "seed": 1}
SCENE2 = {"background": "snow", "shapes": [{"kind": "square", "color": "blue", "size": "large",
                                            "quadrant": "bottom left", "box": [4, 36, 26, 58]}], "seed": 2}


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _eval_result(path, image_folder, answers, ratings, judge="rule"):
    items = [{"question_type": "attribute", "question_topic": "outdoor", "image_id": "tiny000", "image_src": "tiny000.png",
              "question": "What color is the circle?", "gt_answer": "The circle is yellow.", "scene": SCENE},
             {"question_type": "counting", "question_topic": "animal", "image_id": "tiny001", "image_src": "tiny001.png",
              "question": "How many squares are there?", "gt_answer": "There is one square.", "scene": SCENE2}]
    recs = [{**it, "model_answer": a, "judge": judge, "judge_reply": f"Explanation: stand-in.\nRating: {r}", "rating": r}
            for it, a, r in zip(items, answers, ratings)]
    summary = {"count": 2, "average": sum(ratings) / 2, "hallucination_rate": sum(r < 3 for r in ratings) / 2,
               "per_type": {"attribute": float(ratings[0]), "counting": float(ratings[1])}}
    doc = {"summary": summary, "judge": judge, "config": {"image_folder": image_folder, "template": ""}, "items": recs}
    with open(path, "w") as f:
        json.dump(doc, f)


@pytest.fixture
def pipeline_dir(tmp_path):
    """The shape of `tinyworld.py pipeline --out DIR`, small and made by hand, with a second seed nested."""
    root = tmp_path / "out"
    images, eval_images = root / "data" / "images", root / "data" / "eval" / "images"
    images.mkdir(parents=True)
    eval_images.mkdir(parents=True)
    tinyworld.render(SCENE).save(images / "000000.png")
    tinyworld.render(SCENE2).save(images / "000001.png")
    tinyworld.render(SCENE).save(eval_images / "tiny000.png")
    tinyworld.render(SCENE2).save(eval_images / "tiny001.png")
    with open(root / "data" / "scenes.json", "w") as f:
        json.dump({"000000.png": SCENE, "000001.png": SCENE2}, f)
    ppo = root / "runs" / "ppo_fact"
    _write_jsonl(str(ppo / "metrics.jsonl"), [{"step": s, "reward": 0.1 * s, "rm_score": 0.2 * s, "sym_length": -0.01 * s,
                                               "kl": 0.05 * s, "pg_loss": -0.1, "vf_loss": 1.0 / s, "skipped": 0.0}
                                              for s in range(1, 6)])
    _write_jsonl(str(ppo / "samples.jsonl"),
                 [{"step": 1, "id": "p0", "image": "000000.png", "question": "What color is the circle?",
                   "response": "The circle is red.", "reward": -0.25, "rm_score": 0.125, "sym_no_eos": -4.0},
                  {"step": 5, "id": "p1", "image": "000001.png", "question": "What is in the image?",
                   "response": "There is a blue square.", "reward": 0.75, "rm_score": 0.5, "sym_no_eos": 0.0}])
    torch.save({"config": {"image_folder": str(images), "rollout_batch": 64, "lr": 3e-4}, "step": 5},
               ppo / "ckpt_0000005.pt")
    _write_jsonl(str(root / "seed1" / "runs" / "sft" / "metrics.jsonl"),
                 [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "eval_loss": 2.0 / s} for s in (10, 20)])
    _eval_result(root / "mmhal_sft.json", str(eval_images), ["The circle is red.", "There are two squares."], [1, 0])
    _eval_result(root / "mmhal_rlhf.json", str(eval_images), ["The circle is yellow.", "There is one square."], [4, 5])
    (root / "pipeline_table.txt").write_text("MMHal-style (rule judge)   SFT  RLHF\naverage score   0.50  4.50\n")
    return root


def test_it_finds_runs_and_evaluations_by_their_files(pipeline_dir):
    found = report.discover(str(pipeline_dir))
    rel = lambda ps: [os.path.relpath(p, pipeline_dir) for p in ps]   # noqa: E731
    assert rel(found["runs"]) == ["runs/ppo_fact", "seed1/runs/sft"]
    assert sorted(rel(found["evals"])) == ["mmhal_rlhf.json", "mmhal_sft.json"]   # not data/scenes.json
    assert rel(found["tables"]) == ["pipeline_table.txt"]
    assert found["pictures"] == []                                              # the data's images are no pictures


def _imgs(page: str) -> list[Image.Image]:
    out = []
    for m in re.finditer(r'src="data:image/(png|jpeg);base64,([^"]+)"', page):
        out.append(Image.open(io.BytesIO(base64.b64decode(m.group(2)))).convert("RGB"))
    return out


def test_the_page_shows_config_curves_rollouts_and_checked_answers(pipeline_dir):
    path = report.write_report(str(pipeline_dir))
    assert path == str(pipeline_dir / "report.html")
    page = open(path, encoding="utf-8").read()
    # nothing outside the file: every src and href is data: or an anchor on the page, and no script
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith(("data:", "#")) for r in refs)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # the config read from the checkpoint, the table, the runs by their paths
    assert "rollout_batch" in page and "ckpt_0000005.pt" in page and "average score   0.50  4.50" in page
    assert "runs/ppo_fact" in page and "seed1/runs/sft" in page
    # PPO rollouts with every numeric part logged
    for text in ("The circle is red.", "There is a blue square.", "sym_no_eos -4.000", "rm_score 0.125", "reward 0.750"):
        assert text in page, text
    # claims against the scene: the circle is yellow, so "red" is false and "yellow" true; two squares
    # where there is one is false, one square is true
    false = re.findall(r'<li class="false">&#10007; ([^<]*)</li>', page)
    true = re.findall(r'<li class="true">&#10003; ([^<]*)</li>', page)
    assert any("red" in c and "circle" in c for c in false) and any("yellow" in c and "circle" in c for c in true)
    assert any("2" in c and "square" in c for c in false) and any("1" in c and "square" in c for c in true)
    assert "rating 1" in page and "rating 5" in page and "Explanation: stand-in." in page
    # side by side: one table holds both models' answers to the same item, in the order they were evaluated
    table = page.split("answers side by side", 1)[1]
    row = table.split("What color is the circle?", 1)[1].split("</tr>", 1)[0]
    assert "The circle is red." in row and "The circle is yellow." in row
    # the scene images embedded pixel for pixel (64x64 is below the thumbnail size), and the pictures
    want = {tinyworld.render(s).tobytes() for s in (SCENE, SCENE2)}
    imgs = _imgs(page)
    scenes = [im for im in imgs if im.size == (64, 64)]
    assert len(scenes) == 2 + 2 * 1 and {im.tobytes() for im in scenes} == want   # 2 rollouts, 2 eval items
    assert sum(im.width > 400 for im in imgs) >= 3                                 # curves of 2 runs, per-type bars


def test_one_result_file_a_cli_and_errors(pipeline_dir, tmp_path, capsys):
    res = str(pipeline_dir / "mmhal_rlhf.json")
    out = report.main([res])
    assert out == str(pipeline_dir / "mmhal_rlhf.report.html") and "wrote" in capsys.readouterr().out
    page = open(out, encoding="utf-8").read()
    assert "The circle is yellow." in page and "The circle is red." not in page
    assert report.main([str(pipeline_dir / "runs" / "ppo_fact"), "--out", str(tmp_path / "r.html")]) == str(tmp_path / "r.html")
    with pytest.raises(common.UserError, match="no such folder or file"):
        report.main([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="nothing to report"):
        report.main([str(tmp_path / "empty")])
    with pytest.raises(common.ConfigError, match="unknown config key --outt"):
        report.main([res, "--outt", "x"])
    # a moved folder: the PPO run's image_folder no longer exists, the images are found under DIR/data
    moved = tmp_path / "moved"
    shutil.copytree(pipeline_dir, moved)
    shutil.rmtree(pipeline_dir)
    page = open(report.write_report(str(moved)), encoding="utf-8").read()
    assert len([im for im in _imgs(page) if im.size == (64, 64)]) == 4 and "not found" not in page


def _chromium() -> str | None:
    return shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium") or None


@pytest.mark.skipif(_chromium() is None, reason="no chromium installed")
def test_headless_chromium_shows_the_claims_and_the_images(pipeline_dir, tmp_path):
    page = report.write_report(str(pipeline_dir))
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = "file://" + os.path.abspath(page)
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "What color is the circle?" in dom and "✗" in dom and "✓" in dom and "rating 5" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2000", url], capture_output=True, timeout=120)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2000)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50                       # not a blank page
    counts = {c: n for n, c in colors}
    grass = tinyworld.BACKGROUNDS["grass"]
    # the first evaluation item's image, drawn at 128 px (2x, pixelated): its grass background is on screen
    assert sum(n for c, n in counts.items() if max(abs(a - b) for a, b in zip(c, grass)) <= 30) > 2000
