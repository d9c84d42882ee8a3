"""The reward model's input against the official LLaVA-RLHF formatting (SPEC §9), reimplemented here from
its loaders (RLHF/data_utils/common_utils.py preprocess_v1, data_utils_rm.py, llava's conversation and
tokenizer_image_token, transformers 4.31's slow LLaMA tokenizer), on prompt files of the official files'
structure written in our own words. Also the RM's published schedule and held-out split."""
import json
import math
import os
import re

import pytest
import sentencepiece as spm
import torch

import common
import data
import reward_model as RM
from test_reward_model import _separable_prefs

# ---- the official rules, reimplemented ---------------------------------------------------------------

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def official_conversation(turns: list[dict], system: str = VICUNA_SYSTEM) -> str:
    """llava's conv_vicuna_v1.get_prompt (SeparatorStyle.TWO: seps " " and "</s>"), after
    preprocess_multimodal moved "<image>" to the front of its turn and stripped it."""
    seps = (" ", "</s>")
    out = system + seps[0]
    for i, t in enumerate(turns):
        value = t["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        role = "USER" if t["from"] == "human" else "ASSISTANT"
        out += role + ": " + value + seps[i % 2]
    return out


def official_request(prompt_file_text: str, fact_sentence: str, captions: list[str] | None) -> str:
    """BinaryRewardModelingDataset reads " " + f.read().strip(); preprocess_v1 fills {factual_prompt}
    with str.format when the slot is there, the sentence then "  - caption\\n" per caption."""
    prompt = " " + prompt_file_text.strip()
    if r"{factual_prompt}" in prompt:
        if captions is None:
            # the official code has no such case (a record without captions fails there); the project's
            # rule, SPEC §4: no facts, an empty slot
            return prompt.format(factual_prompt="")
        fp = fact_sentence
        for c in captions:
            fp = fp + f"  - {c}\n"
        prompt = prompt.format(factual_prompt=fp)
    return prompt


def official_slow_tokenize(text: str, sp: spm.SentencePieceProcessor) -> list[int]:
    """transformers 4.31 LlamaTokenizer (legacy): BOS, then the text split at its special tokens (kept
    whole, no stripping around them) and every other piece encoded by sentencepiece on its own."""
    special = {"<s>": sp.bos_id(), "</s>": sp.eos_id(), "<unk>": sp.unk_id()}
    ids = [sp.bos_id()]
    for piece in re.split("(<s>|</s>|<unk>)", text):
        if piece in special:
            ids.append(special[piece])
        elif piece:
            ids.extend(sp.encode(piece))
    return ids


def official_tokenizer_image_token(prompt: str, sp) -> list[int]:
    """llava.mm_utils.tokenizer_image_token: chunks around "<image>" tokenised alone, one -200 between,
    the chunks' BOS dropped after the first."""
    chunks = [official_slow_tokenize(c, sp) for c in prompt.split("<image>")]
    seps = [[-200] * 2] * len(chunks)
    joined = [e for pair in zip(chunks, seps) for e in pair][:-1]
    ids = [chunks[0][0]]
    for x in joined:
        ids.extend(x[1:])
    return ids


def official_rm_input(rec: dict, key: str, prompt_file_text: str, fact_sentence: str, captions, sp) -> tuple[str, list[int]]:
    """data_utils_rm._get_text + preprocess_v1 with a reward prompt: the conversation whose last gpt turn
    is the candidate, + request + "</s>", tokenised, the last id (that "</s>") dropped: the score is read
    at the request's last token."""
    turns = [dict(t) for t in rec["conversations"]]
    turns[-1]["value"] = rec[key]["value"]
    text = official_conversation(turns) + official_request(prompt_file_text, fact_sentence, captions) + "</s>"
    ids = official_tokenizer_image_token(text, sp) if "image" in rec else official_slow_tokenize(text, sp)
    return text[:-len("</s>")], ids[:-1]


# ---- files of the official structure, in our own words -------------------------------------------------

PROMPT_FILE = (
    "\n\n  USER: Kindly grade the reply you just gave. Weigh it on the points below:\n\n"
    "1. Faithful: the AI’s reply must describe only what the picture shows — nothing invented, nothing "
    "contradicting it. {factual_prompt}\n"
    "2. Useful: it should serve what the person asked for, grounded in the picture.\n"
    "3. Fluent: the wording should read smoothly.\n"
    "4. Brief: it should say what is needed {{and no more}}.\n\n"
    "A strong reply is faithful, useful, fluent and brief. ASSISTANT: Going by these points, the grade of my "
    "previous reply is\n\n")
FACT_SENTENCE = "In particular, the reply must agree with every one of the captions below:\n"
PLAIN_FILE = "  USER: Grade your reply {as before}; no facts here. ASSISTANT: My grade is  \n"
CAPTIONS = {"000000000042.jpg": ["A man rides a red bike.", "Two people near a café.", "A street — wet after rain.",
                                 "A bicycle leaning on a wall."]}


def _records() -> list[dict]:
    base = {"conversations": [{"from": "human", "value": "What is happening here?\n<image>"},
                              {"from": "gpt", "value": "to be replaced"}],
            "output_1": {"value": "A man is riding a red bicycle down a wet street."},
            "output_2": {"value": " Two men  stand beside a blue car.\nIt is sunny."}, "preference": 1}
    return [
        dict(base, id="img-1", image="000000000042.jpg"),
        # multi-turn: an earlier exchange before the one being rated, braces in an answer
        dict(base, id="img-2", image="000000000042.jpg", preference=2,
             conversations=[{"from": "human", "value": "<image>\nDescribe the photo."},
                            {"from": "gpt", "value": "A street with {curly} braces."},
                            {"from": "human", "value": "And the colours?"}, {"from": "gpt", "value": "x"}]),
        # text only (no image): tokenised without tokenizer_image_token
        dict(base, id="txt-3", conversations=[{"from": "human", "value": "Say something kind."},
                                              {"from": "gpt", "value": "x"}]),
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    corpus = d / "corpus.txt"
    lines = [VICUNA_SYSTEM, PROMPT_FILE, FACT_SENTENCE, PLAIN_FILE] + sum(CAPTIONS.values(), []) + [
        json.dumps(r) for r in _records()]
    corpus.write_text("\n".join(ln for text in lines for ln in text.split("\n") if ln.strip()) * 1 + "\n")
    # a LLaMA-like sentencepiece model: BPE, byte fallback, no whitespace normalisation, dummy prefix
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tok"), vocab_size=420, model_type="bpe", hard_vocab_limit=False,
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (d / "prompt.txt").write_text(PROMPT_FILE, encoding="utf-8")
    (d / "plain.txt").write_text(PLAIN_FILE, encoding="utf-8")
    (d / "facts.txt").write_bytes(FACT_SENTENCE.encode("utf-8"))
    (d / "captions.json").write_text(json.dumps(CAPTIONS, ensure_ascii=False), encoding="utf-8")
    (d / "prefs.json").write_text(json.dumps(_records(), ensure_ascii=False), encoding="utf-8")
    return d


def _render(files, index, *extra, request="prompt.txt"):
    rows = RM.main(["render", "--data_path", str(files / "prefs.json"), "--index", str(index), "--tokenizer",
                    str(files / "tok.model"), "--request_file", str(files / request), "--facts_intro_file",
                    str(files / "facts.txt"), "--captions", str(files / "captions.json"), "--json", "true", *extra])
    return rows


@pytest.mark.parametrize("index", [0, 1, 2])
def test_render_equals_the_official_formatting_byte_for_byte_and_token_for_token(files, index, capsys):
    sp = spm.SentencePieceProcessor(model_file=str(files / "tok.model"))
    rec = _records()[index]
    rows = _render(files, index, "--use", "7")
    printed = json.loads(capsys.readouterr().out)
    assert printed["responses"] == rows
    for row, key in zip(rows, ("output_1", "output_2")):
        caps = CAPTIONS.get(rec.get("image"))
        if caps is not None:                      # the same captions, in the order this use drew
            assert sorted(row["facts"]) == sorted(caps)
        text, ids = official_rm_input(rec, key, PROMPT_FILE, FACT_SENTENCE, row["facts"] if caps else None, sp)
        assert row["text"] == text
        assert row["ids"] == ids
        assert row["read_at"] == len(ids) - 1 and row["read_id"] == ids[-1]
        assert sp.id_to_piece(ids[-1]) == row["read_piece"] == "▁is"
    if "image" in rec:
        # the structure the official file gives: the sentence's own newline, one "  - c\n" line each, "{{" -> "{"
        t = rows[0]["text"]
        assert "</s> USER: Kindly grade" in t and "contradicting it. In particular" in t
        assert "below:\n  - " in t and t.count("\n  - ") == 4 and ".\n\n2. Useful" in t
        assert "{and no more}" in t and "reply is\n" not in t and t.endswith("previous reply is")


def test_facts_reshuffled_per_use_and_response_resumably(files):
    orders = {tuple(_render(files, 0, "--use", str(u))[k]["facts"]) for u in range(6) for k in (0, 1)}
    assert len(orders) > 3                                   # a fresh order per use and per response
    again = _render(files, 0, "--use", "4")
    assert [r["facts"] for r in again] == [r["facts"] for r in _render(files, 0, "--use", "4")]   # seeded
    per_epoch = _render(files, 0, "--use", "4", "--facts_order", "epoch")
    assert per_epoch[0]["facts"] == per_epoch[1]["facts"] == _render(files, 0, "--use", "9", "--facts_order",
                                                                      "epoch")[0]["facts"]
    assert _render(files, 0, "--facts_order", "none")[0]["facts"] == CAPTIONS["000000000042.jpg"]


def test_a_request_without_the_slot_is_used_literally_and_needs_facts_none(files):
    sp = spm.SentencePieceProcessor(model_file=str(files / "tok.model"))
    rows = _render(files, 0, "--facts", "none", request="plain.txt")
    text, ids = official_rm_input(_records()[0], "output_1", PLAIN_FILE, FACT_SENTENCE, None, sp)
    assert rows[0]["text"] == text and rows[0]["ids"] == ids and "{as before}" in text
    cfg = ["--data_path", str(files / "prefs.json"), "--model_path", str(files), "--request_file", str(files / "plain.txt")]
    with pytest.raises(common.ConfigError, match=r"no \{factual_prompt\} slot.*--facts none"):
        RM.validate(common.parse_config(RM.Config, cfg + ["--tokenizer", str(files / "tok.model")]))


def test_a_request_str_format_cannot_fill_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("USER: rate {factual_prompt} and {score} ASSISTANT: it is")
    with pytest.raises(common.ConfigError, match=r"bad.txt: the rating request cannot be filled.*KeyError"):
        RM.RatingRequest.read(str(bad))
    assert RM.RatingRequest.read().text == " " + RM.DEFAULT_REQUEST.strip()   # the default follows rule 1 too


def test_training_reads_what_render_prints(tiny_world, tmp_path, capsys):
    """PairData's ids at a step are render's for that use (the image expanded), and a trained RM's saved
    request rebuilds the same input through --rm_dir."""
    w = tiny_world
    prompt, facts = tmp_path / "prompt.txt", tmp_path / "facts.txt"
    prompt.write_text(PROMPT_FILE, encoding="utf-8")
    facts.write_text(FACT_SENTENCE, encoding="utf-8")
    _separable_prefs(w, tmp_path / "p.json", n=40)
    tok = data.Tokenizer(str(w["tokenizer"]))
    recs = data.read_preferences(str(tmp_path / "p.json"))
    caps = data.load_captions(str(w["data"] / "captions.json"))
    req = RM.RatingRequest.read(str(prompt), str(facts))
    pd = RM.PairData(recs, tok, data.Template(), req, caps, "captions", "use", str(w["data"] / "images"), 32, 4,
                     4096, seed=3)
    pd.use = 5
    for i in (0, 7):
        got = pd[i]["ids"]
        want = RM.render_record(recs[i], tok, data.Template(), req, caps, "captions", "use", 3, 5)
        for g, r in zip(got, want):
            assert [t for j, t in enumerate(g) if t != -200 or g[j - 1] != -200] == r["ids"]
            assert g.count(-200) == (4 if recs[i].get("image") else 0)
    out = tmp_path / "rm"
    RM.main(["--preset", "tiny", "--model_path", str(w["model"]), "--data_path", str(tmp_path / "p.json"),
             "--image_folder", str(w["data"] / "images"), "--captions", str(w["data"] / "captions.json"),
             "--request_file", str(prompt), "--facts_intro_file", str(facts), "--out_dir", str(out), "--max_len", "4096",
             "--max_steps", "1", "--eval_size", "8", "--global_batch", "8", "--micro_batch", "8", "--seed", "3",
             "--progress", "false"])
    meta = json.load(open(out / "final" / "rm_config.json"))
    assert meta["rm_request"] == " " + PROMPT_FILE.strip() and meta["facts_intro"] == FACT_SENTENCE
    capsys.readouterr()
    via_dir = RM.main(["render", "--data_path", str(tmp_path / "p.json"), "--index", "7", "--rm_dir",
                       str(out / "final"), "--captions", str(w["data"] / "captions.json"), "--use", "5"])
    shown = capsys.readouterr().out
    assert via_dir == RM.render_record(recs[7], tok, data.Template(), req, caps, "captions", "use", 3, 5)
    assert "the score is read at position" in shown and repr(via_dir[0]["text"]) in shown
    with pytest.raises(common.ConfigError, match="--rm_dir decides --request_file"):
        RM.main(["render", "--data_path", str(tmp_path / "p.json"), "--rm_dir", str(out / "final"),
                 "--request_file", str(prompt)])


def test_an_rm_config_of_the_old_template_format_is_refused(tmp_path):
    (tmp_path / "rm_config.json").write_text(json.dumps({"model_path": "m", "tokenizer": "t", "system": "s",
                                                         "rm_template": "USER: {facts}", "max_len": 9}))
    with pytest.raises(RM.ModelError, match="earlier reward_model.py.*retrain"):
        RM.read_rm_config(str(tmp_path))


# ---- schedule and split as published ---------------------------------------------------------------

@pytest.mark.parametrize("n, eval_size, seed", [(10_000, 500, 42), (37, 5, 0), (9, 8, 1)])
def test_heldout_split_is_torch_random_split(n, eval_size, seed):
    train, held = torch.utils.data.random_split(range(n), [n - eval_size, eval_size],
                                                generator=torch.Generator().manual_seed(seed))
    assert RM.heldout_split(n, eval_size, "random", seed) == (list(train.indices), list(held.indices))
    assert RM.heldout_split(n, eval_size, "first", seed) == (list(range(eval_size, n)), list(range(eval_size)))
    with pytest.raises(data.DataError, match="holds out every one"):
        RM.heldout_split(n, n, "random", seed)


@pytest.mark.parametrize("total", [1, 33, 296])
def test_constant_schedule_is_transformers_constant_with_warmup(total):
    from transformers import TrainingArguments, get_constant_schedule_with_warmup
    from types import SimpleNamespace   # the Trainer's own rule, without building its arguments (needs accelerate)
    warmup = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=0.03), total)
    assert warmup == math.ceil(0.03 * total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    sched = get_constant_schedule_with_warmup(opt, warmup)
    for step in range(total):
        assert RM.common.constant_lr(step, warmup, 2e-5) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=0)
        opt.step()
        sched.step()


def test_training_logs_the_published_schedule_and_split(tiny_world, tmp_path):
    w = tiny_world
    _separable_prefs(w, tmp_path / "p.json", n=72)
    out = tmp_path / "rm"
    RM.main(["--model_path", str(w["model"]), "--data_path", str(tmp_path / "p.json"), "--image_folder",
             str(w["data"] / "images"), "--out_dir", str(out), "--max_len", "512", "--lora_r", "4",
             "--max_steps", "34", "--eval_size", "8", "--eval_every", "1000", "--global_batch", "2",
             "--micro_batch", "2", "--save_every", "0", "--progress", "false"])
    lrs = [json.loads(ln)["lr"] for ln in open(out / "metrics.jsonl") if '"lr"' in ln]
    assert len(lrs) == 34 and lrs[:2] == [0.0, 2e-5 / 2] and set(lrs[2:]) == {2e-5}   # ceil(0.03 x 34) = 2
    meta = json.load(open(out / "final" / "rm_config.json"))
    assert (meta["split"], meta["split_seed"], meta["n_eval"]) == ("random", 42, 8)
    assert RM.Config().lr_schedule == "constant" and RM.PRESETS["llava-rlhf-7b"].get("lr_schedule", "constant") == "constant"
    assert os.path.isdir(out / "best")
