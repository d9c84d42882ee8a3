"""Tests for the tiny world: generator, data files, claim checker, rule judge, annotator, tokenizer."""
import dataclasses
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import model  # noqa: E402
import sft  # noqa: E402
import tinyworld as tw  # noqa: E402

SMALL = ["--n_sft_images", "40", "--n_sft", "300", "--n_ppo_images", "30", "--n_ppo", "90",
         "--n_pref_images", "20", "--n_pref", "40", "--n_read", "60"]
TEMPLATE_FIELDS = ["question_type", "question_topic", "image_id", "image_src", "image_content", "question",
                   "gt_answer", "model_answer"]
TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mmhal", "response_template.json")


def _make(out, *extra):
    tw.main(["make", "--out", str(out), *SMALL, *extra])
    return str(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("tiny") / "data")


def _load(d, name):
    with open(os.path.join(d, name)) as f:
        return json.load(f)


# A fixed scene for hand-written cases: large red circle top left, small blue square bottom right, grass.
SCENE = {"background": "grass", "seed": 1, "shapes": [
    {"kind": "circle", "color": "red", "size": "large", "quadrant": "top left", "box": [2, 2, 25, 25]},
    {"kind": "square", "color": "blue", "size": "small", "quadrant": "bottom right", "box": [40, 40, 52, 52]}]}


def _rating(reply):
    """MMHal's parse (SPEC 6): exactly one 'rating: N' in the lower-cased reply, else 0."""
    hits = [n for n in range(7) if f"rating: {n}" in reply.lower()]
    return hits[0] if len(hits) == 1 else 0


# Every way to change one world word in an answer into another of its class.
_CLASSES = [list(tw.COLORS), tw.KINDS, tw.SIZES, ["one", "two", "three", "no"], ["top", "bottom"],
            ["left", "right"], list(tw.BACKGROUNDS), ["Yes", "No"], ["larger", "smaller"], ["above", "below"]]


def perturbations(answer):
    for cls in _CLASSES:
        for w in cls:
            for m in re.finditer(rf"\b{w}\b", answer):
                for alt in cls:
                    if alt != w:
                        yield answer[:m.start()] + alt + answer[m.end():]


# ----------------------------------------------------------------------------------------------------
# The world

def test_scene_generation_is_seeded_and_valid():
    a = [tw.sample_scene(random.Random(f"s{i}")) for i in range(200)]
    b = [tw.sample_scene(random.Random(f"s{i}")) for i in range(200)]
    assert a == b
    for s in a:
        kinds = [x["kind"] for x in s["shapes"]]
        quads = [x["quadrant"] for x in s["shapes"]]
        assert 1 <= len(kinds) <= 3 and len(set(kinds)) == len(kinds) and len(set(quads)) == len(quads)
        assert s["background"] in tw.BACKGROUNDS
        json.dumps(s)  # plain JSON
        for x in s["shapes"]:
            col, row = tw.QUADS[x["quadrant"]]
            x0, y0, x1, y1 = x["box"]
            assert col * 32 <= x0 and x1 < col * 32 + 32 and row * 32 <= y0 and y1 < row * 32 + 32


def test_render_is_deterministic_and_draws_the_colours():
    img = np.asarray(tw.render(SCENE))
    assert img.shape == (64, 64, 3)
    assert np.array_equal(img, np.asarray(tw.render(SCENE)))
    red = img[13, 13].astype(int)  # centre of the circle
    assert red[0] > 150 and red[1] < 100 and red[2] < 100
    blue = img[46, 46].astype(int)
    assert blue[2] > 150 and blue[0] < 100


def test_every_generated_answer_is_true_of_its_scene():
    for i in range(400):
        rng = random.Random(i)
        scene = tw.sample_scene(rng)
        for qtype in tw.GENERATORS:
            qa = tw.ask(scene, qtype, rng)
            if qa is None:
                continue
            v = tw.verify(scene, qa["answer"], qa["question"])
            assert v.n_false == 0 and v.n_true > 0, (qa, v)
            assert tw.verify(scene, qa["answer"]).n_false == 0  # also without the question
        for cap in tw.make_captions(scene, rng):
            assert tw.check_claims(scene, cap)[1] == 0 and tw.check_claims(scene, cap)[0] > 0, cap


def test_answer_forms_for_ppo_rewards():
    rng = random.Random(0)
    for i in range(300):
        scene = tw.sample_scene(rng)
        mc = tw.ask(scene, "multiple_choice", rng)
        assert mc["answer"].startswith(mc["key"] + ". ") and f"\n{mc['key']}. " in mc["question"]
        assert len(re.findall(r"\n[A-D]\. ", mc["question"])) == 4
        # the bare letter resolves to a true claim; any other letter to a false one
        assert tw.check_claims(scene, mc["key"] + ".", mc["question"]) == (1, 0)
        wrong = next(L for L in "ABCD" if L != mc["key"])
        assert tw.check_claims(scene, wrong + ".", mc["question"]) == (0, 1)
        yn = tw.ask(scene, "yes_no", rng)
        assert yn["key"] in ("yes", "no") and yn["answer"].lower().startswith(yn["key"])
        assert tw.check_claims(scene, yn["key"].capitalize() + ".", yn["question"]) == (1, 0)
        flipped = "No." if yn["key"] == "yes" else "Yes."
        assert tw.check_claims(scene, flipped, yn["question"]) == (0, 1)


# ----------------------------------------------------------------------------------------------------
# Claims

@pytest.mark.parametrize("question,answer,expected", [
    ("What color is the circle?", "The circle is red.", (1, 0)),
    ("What color is the circle?", "The circle is blue.", (0, 1)),          # colour changed
    ("How many shapes are there?", "There are two shapes.", (1, 0)),
    ("How many shapes are there?", "There are three shapes.", (0, 1)),     # count changed
    ("How many red shapes are there?", "There is one red shape.", (1, 0)),
    ("What color is the triangle?", "There is no triangle.", (1, 0)),
    ("What color is the triangle?", "The triangle is red.", (0, 1)),       # absent shape asserted
    ("Is there a triangle in the image?", "Yes, there is a triangle.", (0, 1)),  # same claim twice counts once
    ("Is there a triangle in the image?", "No, there is no triangle.", (2, 0)),  # "not (a triangle)", "0 triangles"
    ("Where is the yellow square?", "The yellow square is in the bottom right.", (0, 1)),
    ("Where is the yellow square?", "There is no yellow square. The square is blue.", (2, 0)),
    ("Where is the red circle relative to the blue square?",
     "The red circle is to the left of the blue square. The red circle is above the blue square.", (2, 0)),
    ("Where is the red circle relative to the blue square?", "The red circle is below the blue square.", (0, 1)),
    ("Which is larger, the red circle or the blue square?", "The red circle is larger than the blue square.", (1, 0)),
    ("Which is larger, the red circle or the blue square?", "The blue square is larger than the red circle.", (0, 1)),
    ("What is the background of the image?", "The background is grass.", (1, 0)),
    ("What is the background of the image?", "The background is snow.", (0, 1)),
    ("What is in the top right of the image?", "There is nothing in the top right.", (1, 0)),
    ("What is in the top right of the image?", "There is a red circle in the top right.", (0, 1)),
    ("What color is the circle?", "red", (1, 0)),                          # bare answer via the question
    ("What color is the circle?", "I think it might be a nice picture.", (0, 0)),  # unparseable: no claim
    (None, "", (0, 0)),
])
def test_check_claims_cases(question, answer, expected):
    assert tw.check_claims(SCENE, answer, question) == expected


def test_extract_claims_shapes():
    claims = tw.extract_claims(tw.describe(SCENE))
    assert ("count", (None, None, None), 2, True) in claims
    assert ("background", "grass") in claims
    assert ("at", ("large", "red", "circle"), "top left") in claims
    assert tw.extract_claims("There is no triangle.") == tw.extract_claims("There are no triangles.")
    assert tw.extract_claims("No, there is no blue triangle.", "Is there a blue triangle in the image?") == [
        ("not", ("count", (None, "blue", "triangle"), 1, False)), ("count", (None, "blue", "triangle"), 0, True)]


def test_perturbed_answers_become_false():
    """Changing one word of a true answer (colour, count, kind, place, yes/no ...) can always produce a
    claim the scene contradicts, and a colour swap on 'The K is C.' always does."""
    items = tw.build_eval(0)
    for r in items:
        scene = r["scene"]
        outs = [tw.verify(scene, p, r["question"]) for p in perturbations(r["gt_answer"])]
        assert any(v.n_false > 0 for v in outs), r["gt_answer"]
    rng = random.Random(1)
    for _ in range(100):
        scene = tw.sample_scene(rng)
        s = rng.choice(scene["shapes"])
        other = next(c for c in tw.COLORS if c != s["color"])
        assert tw.check_claims(scene, f"The {s['kind']} is {other}.") == (0, 1)
        n = len(scene["shapes"])
        assert tw.check_claims(scene, f"There are {tw.NUM_WORDS[n % 3 + 1]} shapes.")[1] == (n % 3 + 1 != n)


# ----------------------------------------------------------------------------------------------------
# Rule judge and annotator

def test_rule_judge_rubric():
    items = tw.build_eval(0)
    for r in items:
        reply, score = tw.rule_judge(r, r["gt_answer"])
        assert score >= 3 and score == 5 and _rating(reply) == score
        assert reply.rstrip().splitlines()[-1] == f"Rating: {score}"
        for p in perturbations(r["gt_answer"]):
            if tw.verify(r["scene"], p, r["question"]).n_false:
                reply, score = tw.rule_judge(r, p)
                assert score < 3 and _rating(reply) == score
                break
        assert tw.rule_judge(r, "")[1] == 0  # empty: a failed answer, documented in rule_judge
        assert tw.rule_judge(r, "Hello there, nice weather.")[1] == 3  # no checkable claim


def test_rule_judge_levels():
    rec = {"question": "Where is the yellow square?", "scene": SCENE,
           "gt_answer": "There is no yellow square. The square is blue."}
    assert tw.rule_judge(rec, "There is no yellow square. The square is blue.")[1] == 5
    assert tw.rule_judge(rec, "There is no yellow square. The square is blue. The circle is red.")[1] == 6
    assert tw.rule_judge(rec, "There is no yellow square.")[1] == 4
    assert tw.rule_judge(rec, "There is no yellow square. The square is blue. The circle is purple.")[1] == 2
    assert tw.rule_judge(rec, "There is no yellow square. The circle is purple.")[1] == 1
    assert tw.rule_judge(rec, "The yellow square is in the bottom right.")[1] == 0


def test_eval_command_rates_with_the_rule_judge(tmp_path):
    """tinyworld.py eval is eval_mmhal.py's evaluation with rule_judge passed in (answers given here, so no
    model is needed): the reference answers rate 5 (test_rule_judge_rubric), a colour swap rates below 3."""
    items = tw.build_eval(0)[:16]
    for k, r in enumerate(items):
        r["model_answer"] = r["gt_answer"]
        if k % 4 == 0:   # a wrong colour for the item's first shape: a claim its scene contradicts
            s = r["scene"]["shapes"][0]
            r["model_answer"] = f"The {s['kind']} is {next(c for c in tw.COLORS if c != s['color'])}."
    template = tmp_path / "tpl.json"
    template.write_text(json.dumps(items))
    out = tmp_path / "res.json"
    summary = tw.main(["eval", "--template", str(template), "--out", str(out), "--plot", "false"])
    doc = json.loads(out.read_text())
    assert doc["judge"] == "rule"
    assert [r["rating"] for r in doc["items"]] == [tw.rule_judge(r, r["model_answer"])[1] for r in items]
    assert [r["rating"] < 3 for r in doc["items"]] == [k % 4 == 0 for k in range(16)]
    assert all(r["rating"] == 5 for k, r in enumerate(doc["items"]) if k % 4)
    assert summary["hallucination_rate"] == 0.25 and summary == doc["summary"]


def test_label_pair_prefers_the_less_hallucinated():
    q = "What color is the circle?"
    good, bad = "The circle is red.", "The circle is blue."
    assert tw.label_pair(SCENE, q, good, bad)["preference"] == 1
    lab = tw.label_pair(SCENE, q, bad, good)
    assert lab["preference"] == 2 and lab["hallucination"] == 1
    # tie on hallucination: more informative wins
    assert tw.label_pair(SCENE, q, "Nice.", "The circle is red.")["preference"] == 2
    assert tw.label_pair(SCENE, q, good, bad, noise=1.0)["preference"] == 2
    assert tw.label_pair(SCENE, q, good, good)["hallucination"] == 0


def test_annotate_cli(data, tmp_path):
    prompts = _load(data, "preference_prompts.json")[:10]
    scenes = _load(data, "scenes.json")
    recs = []
    for p in prompts:
        s = scenes[p["image"]]["shapes"][0]
        wrong = next(c for c in tw.COLORS if c != s["color"])
        recs.append({**p, "output_1": {"value": f"The {s['kind']} is {wrong}."}, "output_2": {"value": p["gt_answer"]}})
    src, out = tmp_path / "resp.json", tmp_path / "pref.json"
    src.write_text(json.dumps(recs))
    subprocess.run([sys.executable, tw.__file__, "annotate", "--data", data, "--responses", str(src),
                    "--out", str(out)], check=True, capture_output=True)
    labelled = json.loads(out.read_text())
    assert [r["preference"] for r in labelled] == [2] * 10
    for r in labelled:
        assert set(r) >= {"id", "image", "conversations", "output_1", "output_2", "preference", "hallucination"}


# ----------------------------------------------------------------------------------------------------
# Files written by `make`

def test_make_is_deterministic(data, tmp_path):
    again = _make(tmp_path / "again")
    for name in ["sft.json", "ppo_prompts.json", "preference_prompts.json", "captions.json", "scenes.json",
                 "eval/mmhal_tiny.json", "tokenizer.model", "images/000007.png", "eval/images/tiny042.png"]:
        with open(os.path.join(data, name), "rb") as f1, open(os.path.join(again, name), "rb") as f2:
            assert f1.read() == f2.read(), name
    other = _make(tmp_path / "other", "--seed", "1")
    assert _load(other, "sft.json") != _load(data, "sft.json")
    assert _load(other, "eval/mmhal_tiny.json") == _load(data, "eval/mmhal_tiny.json")  # eval_seed fixed


def test_eval_file(data):
    items = _load(data, "eval/mmhal_tiny.json")
    assert len(items) == 96
    fields = TEMPLATE_FIELDS
    if os.path.exists(TEMPLATE):
        with open(TEMPLATE) as f:
            tpl = json.load(f)
        fields = list(tpl[0])
        assert [r["question_topic"] for r in items] == [t["question_topic"] for t in tpl]
        assert [r["question_type"] for r in items] == [t["question_type"] for t in tpl]
    for i, r in enumerate(items):
        assert list(r)[:len(fields)] == fields and "scene" in r
        assert r["question_type"] == D.MMHAL_TYPES[i % 8] and r["question_topic"] == tw.MMHAL_TOPICS[i // 8]
        assert r["model_answer"] == "" and r["image_content"] and r["gt_answer"]
        assert os.path.exists(os.path.join(data, "eval", "images", r["image_src"]))
        assert r["image_src"] == r["image_id"] + ".png"
    assert len({r["image_id"] for r in items}) == 96
    for t in range(12):  # a topic is a world variation: one background per topic
        assert len({r["scene"]["background"] for r in items[t * 8:(t + 1) * 8]}) == 1


def test_sft_records(data):
    sft = _load(data, "sft.json")
    scenes = _load(data, "scenes.json")
    assert len(sft) == 360 and len({r["id"] for r in sft}) == 360
    reading = [r for r in sft if r["id"].startswith("read_")]
    assert len(reading) == 60 and all("image" not in r for r in reading)   # text only: see build_reading
    sft = [r for r in sft if not r["id"].startswith("read_")]
    assert any(len(r["conversations"]) > 2 for r in sft)
    for r in sft:
        assert set(r) == {"id", "image", "conversations"} and r["image"] in scenes
        conv = r["conversations"]
        assert len(conv) % 2 == 0
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert all("<image>" not in c["value"] for c in conv[1:])
        for h, g in zip(conv[::2], conv[1::2]):
            assert tw.check_claims(scenes[r["image"]], g["value"], h["value"].replace("<image>\n", ""))[1] == 0
    assert os.path.exists(os.path.join(data, "images", sft[0]["image"]))


def _direct_check(scene: dict, statement: str) -> bool | None:
    """An independent check of two statement forms against the scene dict (None: another form)."""
    m = re.fullmatch(r"The (\w+) (circle|square|triangle) is (small|large)\.", statement)
    if m:
        shapes = [s for s in scene["shapes"] if s["color"] == m[1] and s["kind"] == m[2]]
        return None if len(shapes) != 1 else shapes[0]["size"] == m[3]
    m = re.fullmatch(r"The (circle|square|triangle) is (red|blue|yellow|purple|black)\.", statement)
    if m:
        shapes = [s for s in scene["shapes"] if s["kind"] == m[1]]
        return None if len(shapes) != 1 else shapes[0]["color"] == m[2]
    m = re.fullmatch(r"There is no (circle|square|triangle)\.", statement)
    if m:
        return all(s["kind"] != m[1] for s in scene["shapes"])
    m = re.fullmatch(r"There are (two|three|four) shapes\.", statement)
    if m:
        return len(scene["shapes"]) == ["two", "three", "four"].index(m[1]) + 2
    m = re.fullmatch(r"The background is (\w+)\.", statement)
    return None if not m else scene["background"] == m[1]


def test_reading_conversations_are_labelled_right():
    pool = tw._pool(0, "sft", 40, 0)
    assert tw.build_reading(pool, 50, seed=3) == tw.build_reading(pool, 50, seed=3)
    seen = {True: 0, False: 0}
    for name, scene in pool:   # one scene per call, so every record is about a known scene
        for k, r in enumerate(tw.build_reading([(name, scene)], 20, seed=3)):
            assert "image" not in r
            user, reply = r["conversations"][0]["value"], r["conversations"][1]["value"]
            caps = [ln[4:] for ln in user.split("\n") if ln.startswith("  - ")]
            assert caps and all(tw.check_claims(scene, c)[1] == 0 for c in caps)
            if k % 2 == 0:   # answer from the captions: the reply is true of the scene
                assert tw.check_claims(scene, reply, user.split("\n")[-1])[1] == 0
                continue
            stmt = user.split("\n")[0].removeprefix("Statement: ")
            want = _direct_check(scene, stmt)
            if want is not None:
                seen[want] += 1
                assert reply == ("Yes, the captions agree with it." if want else "No, the captions contradict it."), stmt
    assert seen[True] >= 5 and seen[False] >= 5, seen


def test_prompt_records(data):
    ppo, pref = _load(data, "ppo_prompts.json"), _load(data, "preference_prompts.json")
    captions, scenes = _load(data, "captions.json"), _load(data, "scenes.json")
    assert set(captions) == set(scenes) == set(os.listdir(os.path.join(data, "images")))
    assert len(ppo) == 90 and len(pref) == 40
    for r in ppo + pref:
        assert {"id", "image", "conversations", "answer_type", "answer", "length_multiplier"} <= set(r)
        assert r["image"] in captions and r["length_multiplier"] == 1.0
        assert len(r["conversations"]) == 1 and r["conversations"][0]["from"] == "human"
        assert r["conversations"][0]["value"].startswith("<image>\n")
        if r["answer_type"] == "multiple_choice":
            assert r["answer"] in "ABCD" and len(r["answer"]) == 1
        elif r["answer_type"] == "yes_no":
            assert r["answer"] in ("yes", "no")
        else:
            assert r["answer_type"] == "general" and r["answer"]
    assert {r["answer_type"] for r in ppo} == {"general", "multiple_choice", "yes_no"}
    assert {r["answer_type"] for r in pref} <= {"general", "yes_no"}  # open MMHal-type questions only
    assert {r["question_type"] for r in pref} <= set(D.MMHAL_TYPES)
    assert not {r["image"] for r in pref} & {r["image"] for r in ppo}
    assert not {r["image"] for r in pref} & {r["image"] for r in _load(data, "sft.json") if "image" in r}
    held = _load(data, "heldout_prompts.json")
    assert len(held) == 400 and {r["question_type"] for r in held} <= set(D.MMHAL_TYPES)
    used = {r["image"] for r in ppo + pref + _load(data, "sft.json") if "image" in r}
    assert len({r["image"] for r in held}) == 400 and not {r["image"] for r in held} & used


def test_meta_records_the_model_sft_trains(data, tmp_path):
    meta = _load(data, "meta.json")
    assert meta["seed"] == 0 and meta["counts"]["sft"] == 360 and meta["counts"]["sft_reading"] == 60 and meta["counts"]["eval"] == 96
    # train it as the pipeline does (sft.py --preset tiny on this tokenizer), one step, and load what was saved
    out = tmp_path / "sft"
    sft.main(["--preset", "tiny", "--data_path", f"{data}/sft.json", "--image_folder", f"{data}/images",
              "--tokenizer", f"{data}/tokenizer.model", "--out_dir", str(out), "--max_steps", "1", "--eval_size", "8",
              "--global_batch", "8", "--micro_batch", "8", "--progress", "false"])
    saved = model.LLaVA.from_pretrained(str(out / "final")).config
    assert set(meta["model"]) == {f.name for f in dataclasses.fields(saved)}
    # image_token_index is the one field saving fills in (None: save_pretrained appends the image token's row)
    assert meta["model"]["image_token_index"] is None and saved.image_token_index == meta["vocab_size"]
    assert {k: v for k, v in meta["model"].items() if k != "image_token_index"} == \
        {k: getattr(saved, k) for k in meta["model"] if k != "image_token_index"}
    assert meta["model"]["vocab_size"] == meta["vocab_size"]
    # SPEC section 7's tiny geometry: 64 px, patch 8 (64 image tokens), LLM 128 x 4 layers, FFN 352
    assert (saved.image_size, saved.patch_size, saved.hidden, saved.layers, saved.intermediate) == (64, 8, 128, 4, 352)


def test_tokenizer_roundtrip(data):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(data, "tokenizer.model"))
    meta = _load(data, "meta.json")
    assert sp.vocab_size() == meta["vocab_size"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    texts = [D.VICUNA_V1_SYSTEM, "USER:", "ASSISTANT:", " ".join(tw._GENERIC_TEXT),
             "Odd text: naïve café 123 ☃ \t two  spaces\nnew line"]
    for r in _load(data, "sft.json")[:200]:
        texts += [c["value"] for c in r["conversations"]]
    texts += [r["question"] + "\n" + r["gt_answer"] for r in _load(data, "eval/mmhal_tiny.json")]
    for t in texts:
        ids = sp.encode(t)
        assert 0 not in ids, t  # byte fallback: nothing is unknown
        assert sp.decode(ids) == t
    # world words are single pieces (short sequences are what makes the tiny model fast)
    assert len(sp.encode("The circle is red.")) == 5


def _binomial_pmf_by_recursion(n: int) -> list[float]:
    """Pascal's triangle row n, divided by 2**n, built by repeated halving sums (no math.comb)."""
    row = [1.0]
    for _ in range(n):
        row = [0.5 * (a + b) for a, b in zip([0.0] + row, row + [0.0])]
    return row


def test_exact_binomial_p_against_a_direct_recursion():
    for n in (1, 5, 12, 40):
        pmf = _binomial_pmf_by_recursion(n)
        for k in range(n + 1):
            lo = min(k, n - k)
            want = min(1.0, 2 * sum(pmf[:lo + 1]))
            assert abs(tw.binomial_two_sided_p(k, n) - want) < 1e-12, (k, n)
    assert tw.binomial_two_sided_p(0, 0) == 1.0
    # the textbook case: 10 discordant pairs all one way -> 2 / 2**10
    assert abs(tw.binomial_two_sided_p(0, 10) - 2 / 1024) < 1e-15


def test_mcnemar_and_sign_test_count_only_discordant_questions():
    x = [1, 1, 1, 0, 0, 1, 0]         # e.g. SFT's false claims per question
    y = [0, 0, 1, 0, 1, 0, 0]         # the model's
    t = tw.mcnemar(x, y)
    assert (t["b"], t["c"]) == (3, 1) and abs(t["p"] - 2 * (1 + 4) / 16) < 1e-12
    s = tw.sign_test([5, 3, 3, 0, 6], [4, 3, 5, 0, 2])
    assert (s["b"], s["c"]) == (2, 1) and abs(s["p"] - 1.0) < 1e-12
    pooled = tw.pooled([{"b": 3, "c": 1, "p": 0.6}, {"b": 7, "c": 0, "p": 0.02}])
    assert (pooled["b"], pooled["c"]) == (10, 1) and abs(pooled["p"] - 2 * 12 / 2048) < 1e-12
    with pytest.raises(ValueError):
        tw.mcnemar([1, 0], [1])


def test_gold_judge_is_the_rule_judge_and_the_checker(data):
    prompts = _load(data, "heldout_prompts.json")
    scenes = _load(data, "scenes.json")
    recs = D.read_ppo_prompts(os.path.join(data, "heldout_prompts.json"))[:6]
    raw = {r["id"]: r for r in prompts}
    # the reference answer itself, a copy with one world word swapped, and nothing
    texts = [raw[r["id"]]["gt_answer"] for r in recs[:2]] + [tw._perturb(raw[r["id"]]["gt_answer"], random.Random(1))
                                                            for r in recs[2:4]] + ["", "Hello."]
    g = tw.gold_judge(data)(recs, texts)
    for r, t, rating, false in zip(recs, texts, g["rating"], g["false_claim"]):
        scene = scenes[r["image"]]
        want = tw.rule_judge({"scene": scene, "question": r["question"], "gt_answer": raw[r["id"]]["gt_answer"]}, t)[1]
        assert rating == want
        assert false == float(tw.check_claims(scene, t, r["question"])[1] > 0)
    assert g["false_claim"][:2] == [0.0, 0.0] and g["rating"][4] == 0.0


def test_rlinit_data_is_preferred_answers_and_chain_of_thought_choices(data):
    prompts = _load(data, "preference_prompts.json")[:3]
    prefs = [{"id": p["id"], "image": p["image"], "conversations": p["conversations"][:1],
              "output_1": {"value": f"first {i}"}, "output_2": {"value": f"second {i}"}, "preference": 1 + i % 2}
             for i, p in enumerate(prompts)]
    out = tw.build_rlinit(data, prefs, 20, seed=0)
    assert len(out) == 23
    answers = {r["id"]: r["conversations"][1]["value"] for r in out}
    assert [answers[f"rlinit_{p['id']}"] for p in prompts] == ["first 0", "second 1", "first 2"]
    scenes, images = _load(data, "scenes.json"), {p["image"] for p in _load(data, "preference_prompts.json")}
    mc = [r for r in out if r["id"].startswith("rlinit_mc_")]
    assert len(mc) == 20
    for r in mc:
        assert r["image"] in images
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        m = re.fullmatch(r"(.+) So the correct option is ([ABCD])\.", a)
        assert m, a
        option = dict(re.findall(r"\n([ABCD])\. ([^\n]+)", q))[m.group(2)]
        # the reasoning sentence is true of the scene, and the chosen option is the one it names
        assert tw.check_claims(scenes[r["image"]], m.group(1))[1] == 0
        assert option in m.group(1) or option == "zero" and " no " in m.group(1), (q, a)
    import ppo   # the form PPO's official correctness bonus reads
    recs = [{"answer_type": "multiple_choice", "answer": re.search(r"option is ([ABCD])", r["conversations"][1]["value"]).group(1)}
            for r in mc]
    st = ppo.symbolic_rewards([r["conversations"][1]["value"] for r in mc], [True] * 20, [1] * 20, recs)
    assert all(v > 0 for v in st["correct"].tolist())


def test_gold_vs_proxy_plot_writes_a_png_without_matplotlib(tmp_path):
    evals = [{"step": s, "eval_proxy_rm": 0.1 * s, "eval_gold_rating": 3 - 0.1 * s, "eval_gold_false_claim": 0.5}
             for s in (0, 5, 10)]
    per_seed = [{"ppo": {arm: {"evals": evals} for arm in tw.ARMS}}]
    path = tmp_path / "curves.png"
    assert tw.plot_gold_vs_proxy(per_seed, str(path)) == str(path)
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
        assert len(im.convert("RGB").getcolors(1 << 16) or []) > 3


def test_stages_reuse_a_finished_prefix_and_rerun_from_the_first_change(tmp_path):
    calls = []

    def stage(name):
        return lambda: calls.append(name) or {"from": name}
    st = tw.Stages(str(tmp_path), reuse=True)
    for n in ("a", "b", "c"):
        st.run(n, {"k": 1}, stage(n))
    assert calls == ["a", "b", "c"]
    calls.clear()
    st = tw.Stages(str(tmp_path), reuse=True)
    assert st.run("a", {"k": 1}, stage("a")) == {"from": "a"}
    st.run("b", {"k": 2}, stage("b"))        # changed: it and everything after it run again
    st.run("c", {"k": 1}, stage("c"))
    assert calls == ["b", "c"]
    calls.clear()
    st = tw.Stages(str(tmp_path), reuse=False)
    st.run("a", {"k": 1}, stage("a"))
    assert calls == ["a"]


def _whoami(name: str):
    def fn():
        print(f"hello from {name}")
        return {"name": name, "pid": os.getpid(), "threads": torch.get_num_threads()}
    return fn


def test_side_by_side_stages_run_in_their_own_processes_are_reused_and_fail_loudly(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        st = tw.Stages(str(tmp_path), reuse=True)
        res = st.run_side_by_side([("a", {"k": 1}, _whoami("a")), ("b", {"k": 1}, _whoami("b"))])
        assert [r["name"] for r in res] == ["a", "b"]
        assert len({r["pid"] for r in res} | {os.getpid()}) == 3          # two children, not this process
        assert [r["threads"] for r in res] == [1, 1]                        # the two threads split between them
        assert "hello from b" in (tmp_path / "stages" / "b.log").read_text()
        assert torch.get_num_threads() == 2                                 # the parent's own count is untouched
        # a rerun reuses both; a changed setting reruns only that (independent) stage, and every later stage
        st = tw.Stages(str(tmp_path), reuse=True)
        assert st.run_side_by_side([("a", {"k": 1}, _whoami("a")), ("b", {"k": 1}, _whoami("b"))]) == res
        st = tw.Stages(str(tmp_path), reuse=True)
        again = st.run_side_by_side([("a", {"k": 1}, _whoami("a")), ("b", {"k": 2}, _whoami("b"))])
        assert again[0] == res[0] and again[1]["pid"] == os.getpid()      # one to run: in this process
        assert st.run("c", {"k": 1}, _whoami("c"))["pid"] == os.getpid() and not st.reuse

        def boom():
            raise ValueError("the stage's own error")
        with pytest.raises(RuntimeError, match="stage 'd' failed in its own process"):
            tw.Stages(str(tmp_path), reuse=True).run_side_by_side([("d", {}, boom), ("e", {}, _whoami("e"))])
        assert "ValueError: the stage's own error" in (tmp_path / "stages" / "d.log").read_text()
        assert not (tmp_path / "stages" / "d.json").exists()
        # off: one after another, in this process
        res = tw.Stages(str(tmp_path), reuse=False, side_by_side=False).run_side_by_side(
            [("a", {"k": 1}, _whoami("a")), ("b", {"k": 1}, _whoami("b"))])
        assert [r["pid"] for r in res] == [os.getpid()] * 2
    finally:
        torch.set_num_threads(threads)
