"""eval_mmhal.py under the official MMHal-Bench protocol (issue #19): the judge prompt filled byte for byte
as the official Eval/eval_gpt_mmhal.py fills its template, the request it sends, llava_v1 answering, the
settings recorded in the answers meta and the result file, and compare's refusal of results made
differently. The judge template here has the official one's structure in our own words."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

import data
import eval_mmhal
import model
from test_eval_mmhal import (FakeAnswerer, ReversibleTokenizer, _no_proxy, api_args, cli_error,  # noqa: F401
                             fake_rule_judge, make_images, make_items, server_factory, write_json)

# The official template's shape: an opening paragraph, worked examples as "### ..." blocks of "- Field: ..."
# lines, the rating options, then four "### heading" sections each followed by one {} slot on its own line;
# no leading whitespace, one newline after the last slot. Ours adds non-ASCII punctuation and literal braces
# (doubled, as str.format needs them).
OWN_TEMPLATE = """\
You are a careful, even-handed grader. A vision–language assistant was shown a picture and asked about it; \
you see only a list of what the picture holds, the question, a person’s reference answer and the assistant’s \
reply. Judge how much the reply tells and whether it invents anything — an invented object, count, colour or \
action that the list and the reference do not support.

Two cases to calibrate on:

### Case 1:
- Objects in the picture: Heron, Bird, Water
- Asked: What is the bird doing?
- Person’s answer: A heron stands in shallow water.
- Reply to grade: The heron is flying over a field.
- Reasoning: The reply moves the bird into the air and onto a field; neither is in the picture.
- Invented: Yes.

### Case 2:
- Objects in the picture: Bicycle, Wall
- Asked: Where is the bicycle?
- Person’s answer: It leans against a brick wall.
- Reply to grade: The bicycle is parked by a wall; I cannot tell the street from the image.
- Reasoning: Nothing in it contradicts the picture; saying what cannot be seen is fine.
- Invented: No.

Sets are written with braces, e.g. {{red, blue}}; an empty one is {{}}. Explain briefly, then pick one line:
- Rating: 6, tells a lot and reasons well, invents nothing
- Rating: 5, tells a lot, invents nothing
- Rating: 4, tells something, invents nothing
- Rating: 3, tells little, invents nothing
- Rating: 2, tells a lot, invents something
- Rating: 1, tells something, invents something
- Rating: 0, tells little, invents something

### Objects in the picture
{}

### Asked
{}

### Person’s answer
{}

### Reply to grade
{}
"""


def official_fill(template: str, rec: dict) -> str:
    """The official script's filling, as read in Eval/eval_gpt_mmhal.py: the object list joined by ", ",
    then its module-level template's str.format with four positional values in the order image contents,
    question, standard human answer, model answer; nothing stripped, no other processing."""
    return template.format(", ".join(rec["image_content"]), rec["question"], rec["gt_answer"], rec["model_answer"])


def records() -> list[dict]:
    """Benchmark-shaped items whose fields stress the filling: several objects, one, none; unicode; braces of
    every kind in an answer (a second format pass would eat or fill them); whitespace that must survive."""
    recs = make_items(5)
    recs[0].update(image_content=["Fire hydrant", "Car", "Traffic light"],
                   model_answer="A red hydrant {} stands by {0} the {question} car {{x}} }{ .")
    recs[1].update(image_content=["Café table"], question="Qu’est-ce que c’est — item-1 ?",
                   gt_answer="Une table de café… “ronde”.", model_answer="Ein runder Tisch — ja. 日本語 ✓")
    recs[2].update(image_content=[], gt_answer="  padded answer \n", model_answer="\n leading and trailing \n")
    recs[3].update(model_answer="{image_content} {response} {}")
    recs[4].update(image_content=["Dog", "Ball"], model_answer="\tTwo things: a dog and a ball.  ")
    return recs


def write_template(path, text: str, newline: str = "\n") -> str:
    with open(path, "w", encoding="utf-8", newline=newline) as f:
        f.write(text)
    return str(path)


# ----------------------------------------------------------------------------------------------------
# The filling, byte for byte.

def test_official_filling_matches_the_official_rules(tmp_path):
    recs = records()
    variants = {"plain": OWN_TEMPLATE, "whitespace": "\n\n   " + OWN_TEMPLATE + "  \n\n\t"}
    for name, text in variants.items():
        path = write_template(tmp_path / f"{name}.txt", text)
        loaded = eval_mmhal.load_judge_prompt(path, "official")
        for rec in recs:
            got = eval_mmhal.fill_prompt(loaded, rec, "official")
            assert got.encode("utf-8") == official_fill(text, rec).encode("utf-8"), (name, rec["image_id"])
    # A file saved with Windows line ends reads as Python reads the official source: "\r\n" -> "\n".
    crlf = write_template(tmp_path / "crlf.txt", OWN_TEMPLATE, newline="\r\n")
    assert eval_mmhal.fill_prompt(eval_mmhal.load_judge_prompt(crlf, "official"), recs[1], "official") == \
        official_fill(OWN_TEMPLATE, recs[1])

    # Closed form on a small template: doubled braces become single, values (braces, spaces) stay as given.
    small = write_template(tmp_path / "small.txt", "Grade {{this}} — ’\n{}\n{}\n{}\n{}\n")
    rec = {"image_content": ["Dog", "Ball"], "question": "Q ?", "gt_answer": " G ", "model_answer": "M {0} {{}}"}
    assert eval_mmhal.fill_prompt(eval_mmhal.load_judge_prompt(small, "official"), rec, "official") == \
        "Grade {this} — ’\nDog, Ball\nQ ?\n G \nM {0} {{}}\n"


def test_official_request_is_the_official_scripts(tmp_path, server_factory, capsys):
    recs = records()
    template = write_json(recs, tmp_path / "tpl.json")
    prompt_file = write_template(tmp_path / "official_prompt.txt", OWN_TEMPLATE)
    srv = server_factory()
    eval_mmhal.main(api_args(tmp_path, template, srv, "--judge_protocol", "official", "--judge_prompt_file", prompt_file))
    assert srv.count() == len(recs)
    for r in srv.requests:
        body = r["body"]
        # openai.ChatCompletion.create(model=..., messages=[{"role": "user", ...}], temperature=0.0): nothing else
        assert set(body) == {"model", "messages", "temperature"}
        assert body["model"] == "judge-model"
        assert body["temperature"] == 0.0 and type(body["temperature"]) is float
        assert body["messages"] == [{"role": "user", "content": official_fill(OWN_TEMPLATE, recs[r["item"]])}]

    doc = json.loads((tmp_path / "out" / "res.json").read_text())
    assert doc["judge"] == "api:judge-model:official"   # its own cache key: another request than the project's
    judge = doc["settings"]["judge"]
    assert judge["kind"] == "api" and judge["model"] == "judge-model" and judge["protocol"] == "official"
    assert judge["prompt_sha256"] == hashlib.sha256(OWN_TEMPLATE.encode("utf-8")).hexdigest()
    assert judge["temperature"] == 0.0 and judge["max_tokens"] is None and judge["system"] is None
    assert judge["prompt_file"] == prompt_file
    # Our own words are not the official text: said once, before anything is sent.
    err = capsys.readouterr().err
    assert err.count("is not the official template byte for byte") == 1

    # The project protocol: the same message shape, with max_tokens.
    named = write_template(tmp_path / "named.txt", "{image_content}|{question}|{gt_answer}|{response}")
    srv2 = server_factory()
    eval_mmhal.main(api_args(tmp_path / "p", template, srv2, "--judge_prompt_file", named, "--api_max_tokens", "77"))
    body = srv2.requests[0]["body"]
    assert set(body) == {"model", "messages", "temperature", "max_tokens"} and body["max_tokens"] == 77
    rec = recs[srv2.requests[0]["item"]]
    assert body["messages"] == [{"role": "user", "content": "|".join(
        [", ".join(rec["image_content"]), rec["question"], rec["gt_answer"], rec["model_answer"]])}]
    settings = json.loads((tmp_path / "p" / "out" / "res.json").read_text())["settings"]["judge"]
    assert settings["protocol"] == "project" and settings["max_tokens"] == 77
    assert "not the official template" not in capsys.readouterr().err


def test_official_template_hash_is_not_the_text():
    # The shipped constant is a sha256 (64 hex digits), and our default prompt is not the official one.
    assert len(eval_mmhal.OFFICIAL_TEMPLATE_SHA256) == 64 and int(eval_mmhal.OFFICIAL_TEMPLATE_SHA256, 16) >= 0
    assert hashlib.sha256(eval_mmhal.DEFAULT_JUDGE_PROMPT.encode()).hexdigest() != eval_mmhal.OFFICIAL_TEMPLATE_SHA256


# ----------------------------------------------------------------------------------------------------
# Answering with llava_v1, and what is recorded.

LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions.")
VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def expected_prompt_ids(system: str, question: str, tok, n_image: int) -> list[int]:
    """LLaVA's sep_style TWO prompt for one image question: BOS, system, " USER: ", the image's tokens in
    place of "<image>", "\\n" + question, " ASSISTANT:" (nothing after it: generation starts there)."""
    return ([tok.bos_id] + tok.encode(system + " USER: ") + [model.IMAGE_TOKEN_INDEX] * n_image
            + tok.encode("\n" + question + " ASSISTANT:"))


@pytest.fixture
def tiny_answering(tmp_path, monkeypatch):
    """A random tiny checkpoint loaded by the real build_answerer; the tokenizer is one id per character and
    generate records the ids and mask it is given."""
    torch.manual_seed(0)
    cfg = model.ModelConfig.preset("tiny", image_size=32, patch_size=16, vision_layers=1, layers=2, vocab_size=256)
    ckpt = str(tmp_path / "ckpt")
    model.LLaVA(cfg).eval().save_pretrained(ckpt)
    tok = ReversibleTokenizer()
    monkeypatch.setattr(data, "Tokenizer", lambda path: tok)
    seen: list[tuple[list[int], int]] = []
    real_generate = model.LLaVA.generate

    def generate(self, input_ids, images, attention_mask=None, **kw):
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            seen.append(([i for i, m in zip(row, mask) if m], self.num_image_tokens))
        return real_generate(self, input_ids, images, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(model.LLaVA, "generate", generate)
    items = [{**r, "scene": "s"} for r in make_items(3, answered=False)]
    template = write_json(items, tmp_path / "tpl.json")
    make_images(tmp_path / "imgs", items)
    return ckpt, tok, seen, items, template, str(tmp_path / "imgs")


def test_llava_v1_answers_with_its_system_sentence_and_records_it(tmp_path, tiny_answering):
    ckpt, tok, seen, items, template, imgs = tiny_answering
    out = str(tmp_path / "llava.json")
    args = ["--template", template, "--out", out, "--model_path", ckpt, "--image_folder", imgs,
            "--batch_size", "2", "--max_new_tokens", "3", "--conv_mode", "llava_v1", "--plot", "false"]
    eval_mmhal.main([*args, "--judge", "rule"], rule_judge=fake_rule_judge)
    assert len(seen) == 3
    for (ids, n_image), rec in zip(seen, items):
        assert ids == expected_prompt_ids(LLAVA_V1, rec["question"], tok, n_image)

    want = {"model_path": ckpt, "adapter_path": "", "conv_mode": "llava_v1", "system": LLAVA_V1,
            "max_new_tokens": 3, "decoding": "greedy"}
    meta = json.loads(open(out[:-5] + ".answers.json.meta.json").read())
    assert {k: meta[k] for k in want} == want and meta["answered"] == [0, 1, 2]
    doc = json.loads(open(out).read())
    assert doc["settings"]["answer"] == want
    assert doc["settings"]["judge"]["kind"] == "rule" and doc["settings"]["judge"]["model"] == "fake_rule_judge"

    # Judging later without the model: the settings come from the answers meta.
    eval_mmhal.main(["--template", template, "--out", out, "--judge", "rule", "--plot", "false"], rule_judge=fake_rule_judge)
    assert json.loads(open(out).read())["settings"]["answer"] == want
    # These answers are not judged as if another conversation mode had made them.
    with pytest.raises(eval_mmhal.common.ConfigError, match="started with conv_mode 'llava_v1', this run has 'vicuna_v1'"):
        eval_mmhal.main([a if a != "llava_v1" else "vicuna_v1" for a in args] + ["--judge", "rule"], rule_judge=fake_rule_judge)


def test_default_and_explicit_system(tmp_path, tiny_answering):
    ckpt, tok, seen, items, template, imgs = tiny_answering
    base = ["--template", template, "--model_path", ckpt, "--image_folder", imgs, "--max_new_tokens", "2",
            "--judge", "none"]
    eval_mmhal.main([*base, "--out", str(tmp_path / "vicuna.json")])
    assert [ids for ids, _ in seen] == [expected_prompt_ids(VICUNA_V1, r["question"], tok, n) for r, (_, n) in zip(items, seen)]
    meta = json.loads((tmp_path / "vicuna.answers.json.meta.json").read_text())
    assert meta["conv_mode"] == "vicuna_v1" and meta["system"] == VICUNA_V1

    seen.clear()   # a non-empty --system wins over --conv_mode's sentence
    eval_mmhal.main([*base, "--out", str(tmp_path / "own.json"), "--conv_mode", "llava_v1", "--system", "Be brief."])
    assert [ids for ids, _ in seen] == [expected_prompt_ids("Be brief.", r["question"], tok, n) for r, (_, n) in zip(items, seen)]
    meta = json.loads((tmp_path / "own.answers.json.meta.json").read_text())
    assert meta["conv_mode"] == "llava_v1" and meta["system"] == "Be brief."


# ----------------------------------------------------------------------------------------------------
# compare: refused unless answered and judged the same way.

def rule_result(tmp_path, monkeypatch, name: str, *extra: str) -> str:
    """A result file made the whole way (fake answerer, rule judge) with the given answering flags."""
    items = [{**r, "scene": "s"} for r in make_items(8, answered=False)]
    template = write_json(items, tmp_path / f"{name}_tpl.json")
    make_images(tmp_path / "imgs", items)
    monkeypatch.setattr(eval_mmhal, "build_answerer", lambda cfg: FakeAnswerer())
    out = str(tmp_path / f"{name}.json")
    eval_mmhal.main(["--template", template, "--out", out, "--model_path", f"models/{name}", "--image_folder",
                     str(tmp_path / "imgs"), "--judge", "rule", "--plot", "false", *extra], rule_judge=fake_rule_judge)
    return out


def edited(path: str, new_path: str, edit) -> str:
    doc = json.loads(open(path).read())
    edit(doc)
    return write_json(doc, new_path)


def test_compare_refuses_results_made_differently(tmp_path, monkeypatch, capsys):
    sft = rule_result(tmp_path, monkeypatch, "sft")
    rlhf = rule_result(tmp_path, monkeypatch, "rlhf")   # another model, the same settings: comparable
    table = eval_mmhal.main(["compare", sft, rlhf])
    assert "warning" not in capsys.readouterr().err and len(table.splitlines()) == 4

    llava = rule_result(tmp_path, monkeypatch, "llava", "--conv_mode", "llava_v1")
    err = cli_error(capsys, ["compare", sft, llava])
    assert f"answer conv_mode differs: {llava} has 'llava_v1', {sft} has 'vicuna_v1'" in err
    assert "--allow_mismatch" in err
    table = eval_mmhal.main(["compare", sft, llava, "--allow_mismatch"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: compare: ")]
    assert len(warnings) == 2   # the mode and its sentence
    assert "answer conv_mode differs" in warnings[0] and f"answer system differs: {llava} has {LLAVA_V1!r}" in warnings[1]
    assert any(line.startswith("llava ") for line in table.splitlines())

    def judge(key, value):
        return lambda doc: doc["settings"]["judge"].__setitem__(key, value)

    def answer(key, value):
        return lambda doc: doc["settings"]["answer"].__setitem__(key, value)

    cases = [(judge("model", "gpt-4-0613"), "judge model differs: {p} has 'gpt-4-0613', {sft} has 'fake_rule_judge'"),
             (judge("prompt_sha256", "ab" * 32), f"judge prompt_sha256 differs: {{p}} has '{'ab' * 32}', {{sft}} has None"),
             (answer("max_new_tokens", 64), "answer max_new_tokens differs: {p} has 64, {sft} has 1024"),
             (answer("decoding", "sample"), "answer decoding differs: {p} has 'sample', {sft} has 'greedy'"),
             (lambda doc: doc["settings"]["answer"].pop("decoding"), "answer decoding is unknown (not recorded) in {p}")]
    for k, (edit, message) in enumerate(cases):
        p = edited(rlhf, str(tmp_path / f"edit{k}.json"), edit)
        assert message.format(p=p, sft=sft) in cli_error(capsys, ["compare", sft, p])
        eval_mmhal.main(["compare", sft, p, "--allow_mismatch"])
        assert message.format(p=p, sft=sft) in capsys.readouterr().err

    # A result file from before the settings were recorded: unknown, refused, and said so.
    old = edited(rlhf, str(tmp_path / "old.json"), lambda doc: doc.pop("settings"))
    err = cli_error(capsys, ["compare", sft, old])
    assert f"{old} records no answer settings" in err and "unknown" in err
    eval_mmhal.main(["compare", old, sft, "--allow_mismatch"])
    err = capsys.readouterr().err
    assert f"{old} records no answer settings" in err and f"{old} records no judge settings" in err
    assert eval_mmhal.main(["compare", old]).startswith("result")   # one file is compared with nothing
    assert "usage" in cli_error(capsys, ["compare", sft, "--allow_mismatches"])
