"""The tiny-world pipeline end to end, at smoke size: every stage runs through the real scripts."""
import json
import os

import data
import eval_pope
import tinyworld


def test_pipeline_smoke(tmp_path):
    s = tinyworld.pipeline(str(tmp_path / "p"), size="smoke")
    for key in ("rm_accuracy_facts", "rm_accuracy_plain", "sft", "rlhf", "ppo_history", "annotation",
                "facts_diagnostic"):
        assert key in s
    assert s["annotation"]["pairs"] > 0 and len(s["ppo_history"]) == 2
    for name in ("sft", "rlhf"):
        assert 0 <= s[name]["average"] <= 6 and 0 <= s[name]["hallucination_rate"] <= 1
        assert set(s[name]["per_type"]) <= set(data.MMHAL_TYPES)
    table = open(tmp_path / "p" / "pipeline_table.txt").read()
    assert "with facts" in table and "hallucination rate" in table and "another image's" in table
    assert set(s["facts_diagnostic"]) == {"right", "other_image", "none", "n"} and s["facts_diagnostic"]["n"] == 32
    for name in ("sft", "rlhf"):   # the false-claim rate on the held-out open questions, with its error bar
        h = s[name]["heldout"]
        assert h["n"] == 32 and 0 <= h["rate"] <= 1
        assert abs(h["stderr"] - (h["rate"] * (1 - h["rate"]) / 32) ** 0.5) < 1e-12
    assert "false-claim rate, 32 held-out open questions" in table
    assert json.load(open(tmp_path / "p" / "pipeline_summary.json"))["total_seconds"] > 0
    assert os.path.exists(tmp_path / "p" / "runs" / "ppo" / "final" / "model.safetensors")
    # POPE of both models over the same held-out questions; the pictures and the report with no matplotlib
    assert "POPE (tiny world)" in table and "adversarial f1" in table
    for split in eval_pope.SPLITS:
        n = sum(1 for _ in open(tmp_path / "p" / "data" / "eval" / f"pope_{split}.jsonl"))
        assert s["sft"]["pope"][split]["n"] == s["rlhf"]["pope"][split]["n"] == n > 0
    assert os.path.exists(tmp_path / "p" / "ppo_curves.png")
    html = open(tmp_path / "p" / "report.html").read()
    assert "<img" in html and "http://" not in html.replace("http://www.w3.org", "")
