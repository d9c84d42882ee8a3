"""The tiny-world pipeline end to end, at smoke size: every stage runs through the real scripts."""
import copy
import json
import os
import time

import data
import eval_pope
import tinyworld


def test_pipeline_smoke(tmp_path):
    out = tmp_path / "p"
    s = tinyworld.pipeline(str(out), size="smoke")
    (r,) = s["seeds"]
    root = out / "seed0"
    assert r["annotation"]["pairs"] > 0
    # both PPO arms from the same RL-init, each with its held-out proxy and gold at step 0, 1 and 2
    for arm in tinyworld.ARMS:
        assert len(r["ppo"][arm]["history"]) == 2
        evs = r["ppo"][arm]["evals"]
        assert [e["step"] for e in evs] == [0, 1, 2]
        for e in evs:
            assert 0 <= e["eval_gold_rating"] <= 6 and 0 <= e["eval_gold_false_claim"] <= 1
    # the two arms start from the same policy: the same greedy answers, so the same gold at step 0
    a, b = (r["ppo"][arm]["evals"][0] for arm in tinyworld.ARMS)
    assert a["eval_gold_rating"] == b["eval_gold_rating"] and a["eval_length"] == b["eval_length"]
    for name in tinyworld.MODELS:
        ev = r["eval"][name]
        assert 0 <= ev["average"] <= 6 and 0 <= ev["hallucination_rate"] <= 1
        assert set(ev["per_type"]) <= set(data.MMHAL_TYPES)
        h = ev["heldout"]
        assert h["n"] == len(h["false_claim"]) == len(h["rating"]) == 32
        assert h["rate"] == sum(h["false_claim"]) / 32
        assert abs(h["stderr"] - (h["rate"] * (1 - h["rate"]) / 32) ** 0.5) < 1e-12
        for split in eval_pope.SPLITS:
            assert ev["pope"][split]["n"] == 24
    answers = json.load(open(root / "eval" / "RL-init_heldout.json"))
    assert [a["false_claim"] for a in answers] == r["eval"]["RL-init"]["heldout"]["false_claim"]
    # the reward models on the same held-out pairs, with the per-pair paired test
    rm = r["rm"]
    assert rm["n"] == 32 and {"facts", "plain", "right", "other_image", "none", "test"} <= set(rm)
    assert rm["test"]["b"] + rm["test"]["c"] <= 32
    assert set(r["tests"]) == {"RL-init vs SFT", "Fact-RLHF vs SFT", "RLHF vs SFT", "Fact-RLHF vs RLHF"}
    table = open(out / "pipeline_table.txt").read()
    for text in ("Fact-RM", "plain RM", "held-out false-claim rate (32)", "McNemar", "sign test", "RL-init",
                 "Fact-RLHF", "POPE mean F1", "mean length", "another image's"):
        assert text in table, text
    assert json.load(open(out / "pipeline_summary.json"))["total_seconds"] > 0
    for d in ("ppo_rm_facts", "ppo_rm_plain", "rlinit"):
        assert os.path.exists(root / "runs" / d / "final" / "model.safetensors"), d
    assert os.path.exists(out / "gold_vs_proxy.png")
    html = open(out / "report.html").read()
    assert "<img" in html and "http://" not in html.replace("http://www.w3.org", "")

    # a rerun with the same settings reuses every stage: nothing is trained again
    t = time.time()
    again = tinyworld.pipeline(str(out), size="smoke")
    assert time.time() - t < 30 and all(v == 0.0 for v in again["seeds"][0]["times"].values())
    assert again["seeds"][0]["eval"] == r["eval"]

    # several seeds: the table adds mean +- sd and the pooled tests (discordant counts added)
    r2 = copy.deepcopy(r)
    r2["seed"] = 1
    pool = tinyworld.pooled_summary([r, r2])
    t1 = r["tests"]["Fact-RLHF vs SFT"]["false_claim"]
    assert pool["Fact-RLHF vs SFT"]["false_claim"]["b"] == 2 * t1["b"]
    two = tinyworld.format_pipeline_table([r, r2])
    assert "2 seeds: mean +- sd" in two and "seed 1" in two
