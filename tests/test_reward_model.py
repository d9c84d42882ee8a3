"""reward_model.py: the loss, score placement, facts, training to above chance, resume, bad records."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import data
import model as M
import reward_model as RM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("pref", [1, 2])
def test_bradley_terry_matches_direct(pref):
    torch.manual_seed(pref)
    r1, r2 = torch.randn(6), torch.randn(6)
    p = torch.full((6,), pref)
    loss, st = RM.bradley_terry_loss(r1, r2, p, center_coef=1e-3)
    r_pref, r_other = (r1, r2) if pref == 1 else (r2, r1)
    direct = (-torch.log(torch.sigmoid(r_pref - r_other))).mean() + 1e-3 * abs(float((r1 + r2).mean()))
    assert abs(float(loss) - float(direct)) < 1e-6
    assert torch.equal(st["correct"], (r_pref > r_other).float())
    # mixed preferences in one batch
    p = torch.tensor([1, 2, 1, 2, 2, 1])
    loss, _ = RM.bradley_terry_loss(r1, r2, p, center_coef=0.0)
    d = torch.where(p == 1, r1 - r2, r2 - r1)
    assert abs(float(loss) - float(-F.logsigmoid(d).mean())) < 1e-6


def _rm(w, seed=0):
    torch.manual_seed(seed)
    m = M.LLaVA.from_pretrained(str(w["model"])).eval()
    m.add_adapter("reward", r=4, alpha=8)
    with torch.no_grad():
        for p in m.adapter_parameters("reward"):
            p.normal_(0, 0.2)
    head = M.ScalarHead(m.config.hidden)
    return m, head


def test_score_read_at_last_real_token_any_padding(tiny_world):
    m, head = _rm(tiny_world)
    rm = RM.RewardModel(m, "reward", head)
    tok = data.Tokenizer(str(tiny_world["tokenizer"]))
    conv = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}]
    seqs = [RM.build_rm_ids(conv, resp, RM.RatingRequest.read().fill(["a red circle"]), tok, data.Template(),
                            m.num_image_tokens, 512) for resp in ("The circle is red.", "Red.", "It is a big blue circle on sand.")]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([s]), images[i:i + 1], torch.ones(1, len(s), dtype=torch.long))[0]
                             for i, s in enumerate(seqs)])
        li, lm = data.left_pad(seqs, 0)
        ri, rmask = data.right_pad(seqs, 0)
        left, right = rm(li, images, lm), rm(ri, images, rmask)
    assert len({len(s) for s in seqs}) == 3
    assert (left - alone).abs().max() < 1e-5 and (right - alone).abs().max() < 1e-5
    assert (alone[0] - alone[1]).abs() > 1e-6


def test_facts_insertion(tiny_world):
    facts = [f"caption number {i}" for i in range(6)]
    req = RM.RatingRequest.read()
    texts = {req.fill(RM.facts_order(facts, s, "x")) for s in range(8)}
    assert len(texts) > 1                                  # the order varies with the seed
    for t in texts:
        assert all(f"  - {f}\n" in t for f in facts)       # every fact, one line each
        assert RM.DEFAULT_FACTS_INTRO + "  - caption number" in t
    assert RM.facts_order(facts, 3, "x") == RM.facts_order(facts, 3, "x")
    assert RM.facts_order(facts, 3, "x", "none") == facts
    assert req.fill([]) == req.text.replace(RM.FACTS_SLOT, "")   # no facts: an empty slot
    # through the data path: captions map -> prompt text; --facts none leaves the slot empty
    tok = data.Tokenizer(str(tiny_world["tokenizer"]))
    rec = {"id": "p", "image": None, "conversations": [{"from": "human", "value": "Describe it."}],
           "output_1": {"value": "A red circle."}, "output_2": {"value": "A blue square."}, "preference": 1}
    for mode, expect in (("captions", True), ("none", False)):
        pd = RM.PairData([dict(rec, facts=["the circle is red", "the sky is grey"])], tok, data.Template(),
                         RM.RatingRequest.read(), {}, mode, "use", "", 32, 4, 512, seed=0)
        text = tok.decode(pd[0]["ids"][0])
        assert ("the circle is red" in text and "the sky is grey" in text) == expect
        assert ("captions of the image" in text) == expect


def test_inline_facts_from_the_file_win_over_captions(tiny_world, tmp_path):
    # read through data.read_preferences, as training does: a record's own facts replace its image's captions
    tok = data.Tokenizer(str(tiny_world["tokenizer"]))
    rec = {"id": "p", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe it."}],
           "output_1": {"value": "A red circle."}, "output_2": {"value": "A blue square."}, "preference": 1}
    path = tmp_path / "p.json"
    json.dump([dict(rec, facts=["the circle is red"]), dict(rec, id="q")], open(path, "w"))
    recs = data.read_preferences(str(path))
    caps = {"a.png": ["the sky is grey"]}
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    pd = RM.PairData(recs, tok, data.Template(), RM.RatingRequest.read(), caps, "captions", "use", str(tmp_path), 32, 4, 512,
                     seed=0)
    texts = [tok.decode([t for t in pd[i]["ids"][0] if t >= 0]) for i in range(2)]
    assert "the circle is red" in texts[0] and "the sky is grey" not in texts[0]
    assert "the sky is grey" in texts[1] and "the circle is red" not in texts[1]


def _separable_prefs(w, path, n=160, seed=0):
    """The preferred response says the answer is right; the other says it is wrong (random order)."""
    prompts = json.load(open(w["data"] / "preference_prompts.json"))
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        good, bad = p["gt_answer"], "There is no shape. " + p["gt_answer"].replace("red", "green")
        pref = rng.choice([1, 2])
        o1, o2 = (good, bad) if pref == 1 else (bad, good)
        recs.append({"id": f"s{i}", "image": p["image"], "conversations": p["conversations"],
                     "output_1": {"value": o1}, "output_2": {"value": o2}, "preference": pref})
    json.dump(recs, open(path, "w"))
    return path


def _args(w, out, prefs, **kw):
    a = {"data_path": prefs, "image_folder": w["data"] / "images", "captions": w["data"] / "captions.json",
         "model_path": w["model"], "out_dir": out, "lora_r": 8, "lora_alpha": 16, "lr": 3e-3, "warmup_ratio": 0.0,
         "global_batch": 8, "micro_batch": 4, "max_len": 512, "eval_size": 40, "eval_every": 10, "save_every": 1000,
         "progress": "false", "max_steps": 6, "grad_clip": 1.0}
    a.update(kw)
    return sum(([f"--{k}", str(v)] for k, v in a.items()), [])


def test_training_beats_chance_and_scores(tiny_world, tmp_path):
    prefs = _separable_prefs(tiny_world, tmp_path / "prefs.json")
    r = RM.main(_args(tiny_world, tmp_path / "rm", prefs, max_steps=40, eval_every=10))
    assert r["best_accuracy"] >= 0.8, r
    best = tmp_path / "rm" / "best"
    assert json.load(open(best / "rm_config.json"))["eval_accuracy"] == r["best_accuracy"]
    scorer = RM.RewardScorer.load(str(best))
    recs = json.load(open(prefs))[:6]
    items = [{"image": str(tiny_world["data"] / "images" / rec["image"]), "conversations": rec["conversations"],
              "response": rec[f"output_{k}"]["value"], "facts": ["a fact"]} for rec in recs for k in (1, 2)]
    s = scorer.score(items)
    wins = [(s[2 * i] > s[2 * i + 1]) == (rec["preference"] == 1) for i, rec in enumerate(recs)]
    assert sum(wins) >= 5
    # the evaluation command prints accuracy with and without facts
    out = subprocess.run([sys.executable, "reward_model.py", "eval", "--rm_dir", str(best), "--data_path", str(prefs),
                          "--image_folder", str(tiny_world["data"] / "images"), "--captions",
                          str(tiny_world["data"] / "captions.json"), "--out", str(tmp_path / "t.json")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "with" in out.stdout and "without" in out.stdout
    table = json.load(open(tmp_path / "t.json"))
    assert table["captions"]["accuracy"] >= 0.8 and table["captions"]["n"] == 160
    # per-pair outcomes (for paired tests between reward models): in file order, agreeing with the scorer
    for mode in ("captions", "none"):
        c = table[mode]["correct"]
        assert len(c) == 160 and abs(sum(c) / 160 - table[mode]["accuracy"]) < 1e-9
    bare = scorer.score([{**it, "facts": []} for it in items])
    assert table["none"]["correct"][:6] == [int((bare[2 * i] > bare[2 * i + 1]) == (rec["preference"] == 1))
                                            for i, rec in enumerate(recs)]


def test_exact_resume(tiny_world, tmp_path):
    prefs = _separable_prefs(tiny_world, tmp_path / "prefs.json", n=80)
    RM.main(_args(tiny_world, tmp_path / "full", prefs))
    r = RM.main(_args(tiny_world, tmp_path / "part", prefs, stop_at_step=3))
    assert r["stopped"]
    RM.main(_args(tiny_world, tmp_path / "part", prefs, resume="true"))
    a = common.load_checkpoint(common.latest_checkpoint(str(tmp_path / "full")))
    b = common.load_checkpoint(common.latest_checkpoint(str(tmp_path / "part")))
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_malformed_preferences(tiny_world, tmp_path):
    prefs = json.load(open(_separable_prefs(tiny_world, tmp_path / "p.json", n=60)))
    prefs[7]["preference"] = 3
    del prefs[9]["output_2"]
    json.dump(prefs, open(tmp_path / "bad.json", "w"))
    with pytest.raises(data.DataError, match=r"bad.json: record 7"):
        RM.main(_args(tiny_world, tmp_path / "x", tmp_path / "bad.json"))
    skips = data.Skips()
    kept = data.read_preferences(str(tmp_path / "bad.json"), on_error="skip", skips=skips)
    assert len(kept) == 58 and skips.count == 2


def _response_of(tok, n):
    """A response text that encodes to exactly n ids."""
    words = ("the red circle is on the left of a big blue square . " * (n // 4 + 10)).split()
    for k in range(len(words)):
        text = " ".join(words[:k])
        if len(tok.encode(text)) == n:
            return text
    raise AssertionError(f"no response of {n} ids")


def _wide_image_model(w, image_size, patch_size=14):
    """A tiny-width LLaVA with the paper's vision geometry (336/14: 576 image tokens); nothing runs."""
    cfg = M.ModelConfig.preset("tiny", image_size=image_size, patch_size=patch_size, vision_hidden=32, vision_layers=1,
                               vision_heads=2, vision_intermediate=64, hidden=32, layers=2, heads=2, kv_heads=2,
                               intermediate=64, vocab_size=w["vocab"])
    return M.LLaVA(cfg)


def test_rm_never_cuts_the_response_at_576_image_tokens(tiny_world):
    # SPEC §9: the official RM sees the whole response; its limit (2048) counts text ids, the image as one
    tok = data.Tokenizer(str(tiny_world["tokenizer"]))
    conv = [{"from": "human", "value": "<image>\nDescribe the image in detail."}]
    resp = _response_of(tok, 900)
    resp_ids = tok.encode(resp)
    facts = RM.RatingRequest.read().fill(["a red circle", "a blue square"])

    def contains(ids, sub):
        return any(ids[i:i + len(sub)] == sub for i in range(len(ids) - len(sub) + 1))

    ids = RM.build_rm_ids(conv, resp, facts, tok, data.Template(), 576, 2048)
    n = data.text_len(ids)
    assert contains(ids, resp_ids) and ids.count(M.IMAGE_TOKEN_INDEX) == 576 and len(ids) == n + 575
    assert RM.build_rm_ids(conv, resp, facts, tok, data.Template(), 576, n) == ids  # exact fit
    with pytest.raises(data.DataError, match=r"id 'long'.*is %d ids.*max_len %d.*never cut" % (n, n - 1)):
        RM.build_rm_ids(conv, resp, facts, tok, data.Template(), 576, n - 1, record_id="long")
    # the scorer's default max_len is the official 2048, the image of a 336 px / patch 14 tower counted as one
    m = _wide_image_model(tiny_world, 336)
    assert m.num_image_tokens == 576
    scorer = RM.RewardScorer(m, "reward", M.ScalarHead(32), tok)
    assert scorer.max_len == 2048 and RM.Config().max_len == 2048
    assert RM.PRESETS["llava-rlhf-7b"]["max_len"] == RM.PRESETS["llava-rlhf-13b"]["max_len"] == 2048
    item = {"id": "r1", "image": None, "conversations": conv, "response": resp, "facts": ["a red circle"]}
    assert contains(scorer.encode(item), resp_ids)
    with pytest.raises(data.DataError, match="id 'r2'.*never cut"):
        scorer.encode(dict(item, id="r2", response=resp + " " + _response_of(tok, 1200)))


def test_too_long_pairs_go_through_on_error(tiny_world, tmp_path):
    """RM training: a pair that cannot fit max_len stops the run naming the record, or is skipped and counted."""
    prefs = json.load(open(_separable_prefs(tiny_world, tmp_path / "p.json", n=60)))
    tok = data.Tokenizer(str(tiny_world["tokenizer"]))
    prefs[7]["output_2"]["value"] = _response_of(tok, 600)
    json.dump(prefs, open(tmp_path / "long.json", "w"))
    with pytest.raises(data.DataError, match=r"long.json: record 7: id 's7'.*max_len 512.*never cut"):
        RM.main(_args(tiny_world, tmp_path / "x", tmp_path / "long.json"))
    recs = data.read_preferences(str(tmp_path / "long.json"))
    skips = data.Skips()
    pd = RM.PairData(recs, tok, data.Template(), RM.RatingRequest.read(), {}, "captions", "use",
                     str(tiny_world["data"] / "images"), 32, 4, 512, 0, on_error="skip", skips=skips)
    assert len(pd) == 59 and pd.skipped == 1 and skips.count == 1 and skips.indices == [7]
    assert [r["id"] for r in pd.records] == [r["id"] for r in recs if r["id"] != "s7"]
    assert all(len(pd[i]["ids"]) == 2 for i in range(3))


def test_scorer_load_keeps_the_trained_facts_mode(tiny_world, paper_model, tmp_path):
    """An RM trained with --facts none scores the same with or without facts in the items (PPO passes them).
    At 256 image tokens (224 px / patch 14)."""
    prefs = _separable_prefs(tiny_world, tmp_path / "prefs.json", n=48)
    RM.main(_args(tiny_world, tmp_path / "rm", prefs, model_path=paper_model, max_steps=2, eval_size=8, facts="none"))
    best = str(tmp_path / "rm" / "best")
    assert json.load(open(os.path.join(best, "rm_config.json")))["facts"] == "none"
    recs = json.load(open(prefs))[:4]
    items = [{"id": r["id"], "image": str(tiny_world["data"] / "images" / r["image"]), "conversations": r["conversations"],
              "response": r["output_1"]["value"]} for r in recs]
    with_facts = [dict(it, facts=["a tiny green triangle at the top", "the sky is grey"]) for it in items]
    plain = RM.RewardScorer.load(best)
    assert plain.facts == "none"
    assert plain.score(items) == plain.score(with_facts)
    forced = RM.RewardScorer.load(best, facts="captions")     # an explicit keyword still wins
    assert forced.facts == "captions" and forced.score(with_facts) != forced.score(items)


def test_scorer_load_names_a_bad_head_or_config(tiny_world, tmp_path):
    """A reward-model folder with a head of another width, a NaN head, or a config lacking fields:
    a ModelError naming the file, not a raw RuntimeError / KeyError."""
    import shutil
    from safetensors.torch import save_file
    from weights import ModelError
    prefs = _separable_prefs(tiny_world, tmp_path / "prefs.json", n=16)
    RM.main(_args(tiny_world, tmp_path / "rm", prefs, max_steps=1, eval_size=8))
    good = tmp_path / "rm" / "final"
    for name, change in (("wide", lambda d: save_file({"proj.weight": torch.zeros(1, 64), "proj.bias": torch.zeros(1)},
                                                          str(d / "head.safetensors"))),
                         ("nan", None), ("config", None)):
        d = tmp_path / name
        shutil.copytree(good, d)
        if name == "wide":
            change(d)
            want = r"head.safetensors: not the scalar head of a 32-wide model"
        elif name == "nan":
            from safetensors.torch import load_file
            sd = load_file(str(d / "head.safetensors"))
            k = sorted(sd)[0]
            sd[k] = torch.full_like(sd[k], float("nan"))
            save_file(sd, str(d / "head.safetensors"))
            want = rf"head.safetensors: tensor '{k}' holds \d+ NaN / 0 inf values"
        else:
            meta = json.load(open(d / "rm_config.json"))
            del meta["rm_request"]
            json.dump(meta, open(d / "rm_config.json", "w"))
            want = r"rm_config.json: not a reward model's config \(lacks \['rm_request'\]\)"
        with pytest.raises(ModelError, match=want):
            RM.RewardScorer.load(str(d))
