"""Tests for prepare_data.py: the converters (VQA-v2, A-OKVQA, Flickr30k) read back by data.py's readers,
mixing, `check`, and the command line (one config dataclass per command: unknown keys rejected, --help)."""
import json
import os
import subprocess
import sys

import pytest

import data
import prepare_data
from data import DataError, Skips, Tokenizer, tokenize_conversation, tokenize_prompt
from PIL import Image

from test_data import (GOOD_PREF, MULTI, N_IMG, ROOT, SINGLE, TEXT_ONLY, T, _draw, _latin1, _long_conv,  # noqa: F401
                       _strict_utf8, _write, tok, tok_dir)


# ----------------------------------------------------------------------------------------------------
# converters and mixing

def _vqa_files(tmp_path):
    q = {"questions": [{"image_id": 9, "question": "What color is the cat?", "question_id": 90},
                       {"image_id": 5, "question": "Is there a dog?", "question_id": 50},
                       {"image_id": 9, "question": "How many cats?", "question_id": 91}]}
    a = {"annotations": [{"question_id": 90, "multiple_choice_answer": "red", "answers": [{"answer": "red"}]},
                         {"question_id": 50, "multiple_choice_answer": "yes", "answers": [{"answer": "yes"}]},
                         {"question_id": 91, "multiple_choice_answer": "2", "answers": [{"answer": "2"}]}]}
    return _write(tmp_path / "q.json", q), _write(tmp_path / "a.json", a)


def test_convert_vqav2_cli_and_formats(tmp_path):
    qf, af = _vqa_files(tmp_path)
    out = str(tmp_path / "vqa_sft.json")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "convert", "vqav2", "--questions", qf,
                        "--annotations", af, "--out", out], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    recs = data.read_sft(out)  # the output is valid SFT data: by default one conversation per image
    assert [x["id"] for x in recs] == ["vqav2_90", "vqav2_50"]
    assert [x["image"] for x in recs] == ["000000000009.jpg", "000000000005.jpg"]  # COCO train2017 names
    assert recs[0]["conversations"] == [
        {"from": "human", "value": f"<image>\nWhat color is the cat?\n{prepare_data.VQA_INSTRUCTION}"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": f"How many cats?\n{prepare_data.VQA_INSTRUCTION}"},  # the image once
        {"from": "gpt", "value": "2"}]
    per_q = prepare_data.convert_vqav2(qf, af, per_image=False)
    assert [x["id"] for x in per_q] == ["vqav2_90", "vqav2_50", "vqav2_91"]
    assert [len(x["conversations"]) for x in per_q] == [2, 2, 2]
    # PPO prompts: the released file's shape, only the yes/no questions by default
    ppo = prepare_data.convert_vqav2(qf, af, fmt="ppo")
    assert [(p["id"], p["caption_type"]) for p in ppo] == [("vqav2_50", 7)]
    every = prepare_data.convert_vqav2(qf, af, fmt="ppo", yes_no_only=False)
    assert [p["caption_type"] for p in every] == [1, 7, 1]
    ppo_path = _write(tmp_path / "vqa_ppo.jsonl", every)
    assert [(p["answer_type"], p["answer"]) for p in data.read_ppo_prompts(ppo_path)] == [
        ("general", None), ("yes_no", "yes"), ("general", None)]
    # the flags through the command line, and a JSONL output
    out2 = str(tmp_path / "vqa_per_q.jsonl")
    assert prepare_data.main(["convert", "vqav2", "--questions", qf, "--annotations", af, "--out", out2,
                              "--per_image", "false"]) == 0
    assert [len(r["conversations"]) for r in data.read_sft(out2)] == [2, 2, 2]
    out3 = str(tmp_path / "vqa_ppo.json")
    assert prepare_data.main(["convert", "vqav2", "--questions", qf, "--annotations", af, "--out", out3,
                              "--format", "ppo", "--yes_no_only", "false"]) == 0
    assert len(data.read_ppo_prompts(out3)) == 3


def test_convert_vqav2_missing_annotation(tmp_path):
    qf, af = _vqa_files(tmp_path)
    a = json.load(open(af))
    a["annotations"] = a["annotations"][:2]
    af2 = _write(tmp_path / "a2.json", a)
    with pytest.raises(DataError, match="record 2.*no annotation"):
        prepare_data.convert_vqav2(qf, af2)
    skips = Skips()
    assert len(prepare_data.convert_vqav2(qf, af2, on_error="skip", skips=skips)) == 2 and skips.count == 1


AOK_ITEMS = [{"question_id": "k1", "image_id": 123456, "question": "What is the cat doing?",
              "choices": ["sleeping", "eating", "running", "jumping"], "correct_choice_idx": 1,
              "direct_answers": ["eating"] * 10, "rationales": ["It has food in front of it.", "Bowl."]},
             {"question_id": "k2", "image_id": 4, "question": "Weather?", "choices": ["sun", "rain", "snow", "fog"],
              "correct_choice_idx": 3, "direct_answers": [], "rationales": ["It is hazy."]},
             {"question_id": "k3", "image_id": 123456, "question": "Where is the cat?",
              "choices": ["bed", "roof", "car", "tree"], "correct_choice_idx": 0, "direct_answers": [],
              "rationales": ["It lies on a blanket.", "Bowl."]}]


def _official_bonus_letter(response):
    """The letter the official trainer's correctness bonus would credit (ppo_trainer.py): a response starting
    "X." or holding "correct option is X."."""
    return next((x for x in "ABCD" if response.strip().startswith(x + ".") or f"correct option is {x}." in response),
                None)


def test_convert_aokvqa(tmp_path):
    path = _write(tmp_path / "aok.json", AOK_ITEMS)
    recs = prepare_data.convert_aokvqa(path)
    q = recs[0]["conversations"][0]["value"]
    assert q == ("<image>\nWhat is the cat doing?\nA. sleeping\nB. eating\nC. running\nD. jumping\n"
                 + prepare_data.MC_INSTRUCTION)
    assert recs[0]["image"] == "000000123456.jpg"
    assert recs[0]["conversations"][1]["value"] == "B. eating\nIt has food in front of it."
    cot = prepare_data.convert_aokvqa(path, style="rationale_first")  # the chain-of-thought form
    assert cot[1]["conversations"][1]["value"] == "It is hazy. So the correct option is D."
    assert cot[1]["conversations"][0]["value"].endswith("\n" + prepare_data.COT_INSTRUCTION)
    for item, a, b in zip(AOK_ITEMS, recs, cot):  # both forms earn the official bonus for the right letter
        right = "ABCD"[item["correct_choice_idx"]]
        assert _official_bonus_letter(a["conversations"][1]["value"]) == right
        assert _official_bonus_letter(b["conversations"][1]["value"]) == right
    items = [dict(AOK_ITEMS[0]), dict(AOK_ITEMS[1], correct_choice_idx=7)]
    with pytest.raises(DataError, match="record 1.*out of range"):
        prepare_data.convert_aokvqa(_write(tmp_path / "aok2.json", items))


def test_convert_aokvqa_ppo_released_shape_and_facts(tmp_path):
    path = _write(tmp_path / "aok.json", AOK_ITEMS + [dict(AOK_ITEMS[1], question_id="k4", rationales=[])])
    ppo = prepare_data.convert_aokvqa(path, fmt="ppo")
    assert [p["caption_type"] for p in ppo] == [3, 5, 2, 5]  # B, D, A, D (AnswerType B/D/A_IN_ABCD)
    assert ppo[0]["conversations"][1]["value"].endswith("So the correct option is B.")  # CoT by default
    assert ppo[3]["conversations"][1]["value"] == "D. fog"  # no rationale: the answer alone
    assert ppo[0]["facts"] == ["The answer is eating.", "It has food in front of it.", "Bowl."]
    back = data.read_ppo_prompts(_write(tmp_path / "aok_ppo.json", ppo))
    assert [(p["answer_type"], p["answer"]) for p in back] == [("multiple_choice", x) for x in "BDAD"]
    assert back[0]["facts"] == ppo[0]["facts"]
    # the facts file: keyed as the official trainer looks A-OKVQA facts up, several questions of an image merged
    facts = str(tmp_path / "aok_facts.json")
    assert prepare_data.main(["convert", "aokvqa", "--input", path, "--out", str(tmp_path / "p.json"),
                              "--format", "ppo", "--facts_out", facts]) == 0
    fmap = data.load_captions(facts)
    assert fmap == {"aok_000000123456.jpg": ["The answer is eating.", "It has food in front of it.", "Bowl.",
                                             "The answer is bed.", "It lies on a blanket."],
                    "aok_000000000004.jpg": ["The answer is fog.", "It is hazy."]}
    no_inline = [{k: v for k, v in p.items() if k != "facts"} for p in ppo]
    back = data.read_ppo_prompts(_write(tmp_path / "bare.json", no_inline), captions=facts)
    assert back[2]["facts"] == fmap["aok_000000123456.jpg"]
    assert prepare_data.main(["convert", "aokvqa", "--input", path, "--out", str(tmp_path / "s.json"),
                              "--facts_out", facts]) == 2
    assert prepare_data.main(["convert", "aokvqa", "--input", path, "--out", str(tmp_path / "s.json"),
                              "--style", "cot"]) == 2


def test_convert_flickr30k(tmp_path):
    token = tmp_path / "results.token"
    lines = [f"{img}.jpg#{k}\t{img} caption number {k} ." for img in ("100", "200") for k in range(3)]
    token.write_text("\n".join(lines) + "\n")
    a = prepare_data.convert_flickr30k(str(token), seed=1)
    assert len(a) == 2 and a == prepare_data.convert_flickr30k(str(token), seed=1)
    assert a[0]["image"] == "flickr30k/100.jpg" and a[0]["conversations"][0]["value"].startswith("<image>\n")
    assert a[0]["conversations"][1]["value"] in [f"100 caption number {k} ." for k in range(3)]
    assert a[0]["conversations"][0]["value"][len("<image>\n"):] in prepare_data.CAPTION_INSTRUCTIONS
    assert len(prepare_data.convert_flickr30k(str(token), all_captions=True)) == 6
    karpathy = {"images": [{"filename": "100.jpg", "split": "train", "sentences": [{"raw": "A cat."}]},
                           {"filename": "300.jpg", "split": "test", "sentences": [{"raw": "A dog."}]}]}
    kp = _write(tmp_path / "dataset_flickr30k.json", karpathy)
    k = prepare_data.convert_flickr30k(kp, split="train")
    assert [r["conversations"][1]["value"] for r in k] == ["A cat."]
    out, caps = str(tmp_path / "f.json"), str(tmp_path / "caps.json")
    assert prepare_data.main(["convert", "flickr30k", "--input", str(token), "--out", out, "--captions_out", caps]) == 0
    assert len(data.read_sft(out)) == 2 and json.load(open(caps))["200.jpg"][2] == "200 caption number 2 ."
    assert data.load_captions(caps)["100.jpg"][0] == "100 caption number 0 ."  # the reward model's facts file


def test_non_utf8_inputs_name_the_file_and_byte(tmp_path, capsys):
    text = "1.jpg#0\tA dog.\n2.jpg#0\tA café.\n"
    token = _latin1(tmp_path / "results.token", text)
    msg = f"{token}: not UTF-8 text (byte 0xe9 at offset {text.index('é')}, line 2); save it as UTF-8"
    with pytest.raises(DataError) as e:
        prepare_data.read_flickr30k_captions(token)
    assert str(e.value) == msg
    aok = _latin1(tmp_path / "aok.json", '[{"question": "Café?"}]')
    with pytest.raises(DataError, match="aok.json: not UTF-8 text .byte 0xe9 at offset 18, line 1"):
        prepare_data.convert_aokvqa(aok)
    # the command line: one line naming the file, exit code 2
    assert prepare_data.main(["convert", "flickr30k", "--input", token, "--out", str(tmp_path / "f.json")]) == 2
    assert capsys.readouterr().err == f"error: {msg}\n"
    assert prepare_data.main(["check", "--file", _latin1(tmp_path / "s.json", '[{"id": "é"}]')]) == 2
    assert "s.json: not UTF-8 text (byte 0xe9 at offset 9, line 1)" in capsys.readouterr().err


def test_undecodable_names_in_check_and_written_files(tmp_path):
    # an image b"caf\xe9.png" and a data file b"d\xe9ta.json": names os.listdir / sys.argv give surrogate-escaped
    folder = os.fsencode(tmp_path)
    for name, payload in ((b"caf\xe9.png", b"not an image"),
                          (b"d\xe9ta.json", b'[{"id": "0", "image": "caf\\udce9.png", "conversations": '
                                            + json.dumps(SINGLE).encode() + b"}]")):
        fd = os.open(folder + b"/" + name, os.O_WRONLY | os.O_CREAT)
        os.write(fd, payload)
        os.close(fd)
    path = os.fsdecode(folder + b"/d\xe9ta.json")
    out = _strict_utf8()
    res = prepare_data.check_dataset(path, str(tmp_path), out=out)  # a UTF-8 stdout: no UnicodeEncodeError
    out.flush()
    report = out.buffer.getvalue().decode()
    shown = f"{tmp_path}/d\\xe9ta.json"
    assert report.startswith(f"file: {shown}\n") and res["images_bad"] == 1
    assert res["problems"] == [f"{shown}: record 0: cannot read image: cannot identify image file "
                               f"'{tmp_path}/caf\\udce9.png' (image {tmp_path}/caf\\xe9.png)"]
    assert f"  {res['problems'][0]}\n" in report
    # json-dumping such a name (here given by --image_format) writes the JSON escape: it reads back the same
    recs = [{"id": "0", "image": "caf\udce9.png", "conversations": SINGLE}]
    for ext in (".json", ".jsonl"):
        prepare_data.write_records(recs, str(tmp_path / f"w{ext}"))
        back = data.read_sft(str(tmp_path / f"w{ext}"), image_folder=str(tmp_path))
        assert back[0]["image"] == "caf\udce9.png"
        assert os.path.isfile(data.image_file(str(tmp_path), back[0]["image"]))  # the file on disk


def test_mix(tmp_path):
    a = _write(tmp_path / "a.json", [{"id": f"a{i}", "conversations": TEXT_ONLY} for i in range(6)])
    b = _write(tmp_path / "b.jsonl", [{"id": f"b{i}", "image": "x.png", "conversations": SINGLE} for i in range(4)])
    m1 = prepare_data.mix_sft([a, b], seed=0)
    assert sorted(r["id"] for r in m1) == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(4)])
    assert m1 == prepare_data.mix_sft([a, b], seed=0) and m1 != prepare_data.mix_sft([a, b], seed=1)
    assert all("source" not in r and "index" not in r for r in m1)
    out = str(tmp_path / "m.json")
    assert prepare_data.main(["mix", "--inputs", f"{a},{b}", "--out", out, "--seed", "0", "--counts", "2,3"]) == 0
    ids = [r["id"] for r in data.read_sft(out)]
    assert len(ids) == 5 and sum(i.startswith("a") for i in ids) == 2


# ----------------------------------------------------------------------------------------------------
# the paper's mixes: RL-init and the disjoint split

def _released_pref_records():
    conv = lambda q, a: [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]  # noqa: E731
    return [{"id": "000000000011", "image": "000000000011.jpg", "conversations": conv("What is it?", "A cat."),
             "output_1": {"from": "llava", "value": "A red cat."}, "output_2": {"from": "llava", "value": "A dog."},
             "preference": 1, "hallucination": False},
            {"id": "000000000011", "image": "000000000011.jpg", "conversations": conv("Is it big?", "No."),
             "output_1": {"from": "llava", "value": "Yes, huge."}, "output_2": {"from": "llava", "value": "No."},
             "preference": 2, "hallucination": True},
            {"id": "aokvqa_k1", "image": "000000000012.jpg", "conversations": conv("Why?", "Because."),
             "output_1": {"from": "llava", "value": "No idea."}, "output_2": {"from": "llava", "value": "Rain."},
             "preference": 2, "hallucination": False}]


def test_rlinit(tmp_path):
    prefs = _write(tmp_path / "llava_7b_v1_preference.json", _released_pref_records())
    aok = _write(tmp_path / "aok.json", AOK_ITEMS)
    out = prepare_data.build_rlinit(prefs, aok, seed=3)
    assert len(out) == 6 and out == prepare_data.build_rlinit(prefs, aok, seed=3)
    assert [r["id"] for r in out] != [r["id"] for r in prepare_data.build_rlinit(prefs, aok, seed=4)]
    ids = [r["id"] for r in out]
    assert len(set(ids)) == 6  # the repeated image id and the clash with A-OKVQA's id renamed
    assert sorted(ids) == sorted(["000000000011", "000000000011_2", "aokvqa_k1", "aokvqa_k1_2", "aokvqa_k2",
                                  "aokvqa_k3"])
    by_id = {r["id"]: r for r in out}
    # a preference prompt answered with output_{preference}
    assert by_id["000000000011"]["conversations"] == [{"from": "human", "value": "<image>\nWhat is it?"},
                                                      {"from": "gpt", "value": "A red cat."}]
    assert by_id["000000000011_2"]["conversations"][1]["value"] == "No."
    assert by_id["aokvqa_k1"]["conversations"][1]["value"] == "Rain."  # the preference record keeps its id
    # A-OKVQA in chain-of-thought form
    assert by_id["aokvqa_k1_2"]["conversations"][1]["value"] == \
        "It has food in front of it. So the correct option is B."
    assert by_id["aokvqa_k2"]["image"] == "000000000004.jpg"
    path = str(tmp_path / "rlinit.json")
    assert prepare_data.main(["rlinit", "--preferences", prefs, "--aokvqa", aok, "--aokvqa_count", "2",
                              "--out", path]) == 0
    back = data.read_sft(path)
    assert len(back) == 5 and sum(r["id"].startswith("aokvqa_k") and "So the correct option is" in
                                  r["conversations"][1]["value"] for r in back) == 2
    assert prepare_data.main(["rlinit", "--preferences", prefs, "--aokvqa", aok, "--aokvqa_count", "4",
                              "--out", path]) == 2
    assert len(prepare_data.build_rlinit(prefs)) == 3


def _instructions(n_images=12, per_image=(1, 2, 3)):
    """LLaVA-Instruct-like records: several records per image sharing the image's id, plus text-only ones."""
    recs = []
    for i in range(n_images):
        for k in range(per_image[i % len(per_image)]):
            recs.append({"id": f"{i:012d}", "image": f"{i:012d}.jpg", "conversations": [
                {"from": "human", "value": f"<image>\nQuestion {k} about image {i}?"},
                {"from": "gpt", "value": f"Answer {k}."},
                {"from": "human", "value": "And more?"}, {"from": "gpt", "value": "More."}]})
    recs += [{"id": f"t{j}", "conversations": TEXT_ONLY} for j in range(2)]
    return recs


def test_split_disjoint_by_image(tmp_path):
    src = _instructions()  # 24 image records on 12 images + 2 text-only
    path = _write(tmp_path / "llava_instruct.json", src)
    parts, left_out = prepare_data.split_instructions(path, {"preference": 5, "ppo": 6, "sft": -1}, seed=1)
    assert (len(parts["preference"]), len(parts["ppo"])) == (5, 6)
    assert len(parts["sft"]) + 11 + left_out == len(src)
    images = {p: {r["image"] for r in recs if "image" in r} for p, recs in parts.items()}
    assert not (images["sft"] & images["preference"] or images["sft"] & images["ppo"]
                or images["preference"] & images["ppo"])
    ids = [r["id"] for recs in parts.values() for r in recs]
    assert len(ids) == len(set(ids))
    # every record is one of the file's, unchanged but for its id (the ppo part: the first exchange)
    originals = [(r.get("image"), json.dumps(r["conversations"])) for r in data.read_sft(path)]
    for part, recs in parts.items():
        for r in recs:
            conv = r["conversations"]
            assert any(img == r.get("image") and json.loads(c)[:len(conv)] == conv for img, c in originals)
    assert all(len(r["conversations"]) == 2 and r["caption_type"] == 1 for r in parts["ppo"])
    assert parts == prepare_data.split_instructions(path, {"preference": 5, "ppo": 6, "sft": -1}, seed=1)[0]
    assert parts != prepare_data.split_instructions(path, {"preference": 5, "ppo": 6, "sft": -1}, seed=2)[0]
    # fractions and an sft count
    parts, _ = prepare_data.split_instructions(path, {"preference": 0.25, "ppo": 0.25, "sft": 4}, seed=0)
    assert [len(parts[p]) for p in ("preference", "ppo", "sft")] == [6, 6, 4]  # int(0.25 * 26) = 6


def test_split_refuses_what_is_not_there(tmp_path):
    path = _write(tmp_path / "i.json", _instructions())
    with pytest.raises(DataError, match="the parts ask for 27 records .* but the file has 26"):
        prepare_data.split_instructions(path, {"preference": 20, "ppo": 7, "sft": -1})
    with pytest.raises(DataError, match="--ppo 2.5 should be a count"):
        prepare_data.split_instructions(path, {"preference": 1, "ppo": 2.5, "sft": -1})
    with pytest.raises(DataError, match="--preference -1 should be a count"):
        prepare_data.split_instructions(path, {"preference": -1, "ppo": 2, "sft": -1})
    # 26 records, but images of 3 records cut at the boundary lose their rest: the sft count cannot be met
    with pytest.raises(DataError, match="the sft part needs 24 records but only"):
        prepare_data.split_instructions(path, {"preference": 1, "ppo": 1, "sft": 24}, seed=0)


def test_split_command(tmp_path, capsys):
    path = _write(tmp_path / "i.json", _instructions())
    outs = {p: str(tmp_path / f"{p}.json") for p in ("sft", "preference", "ppo")}
    argv = ["split", "--input", path, "--out_sft", outs["sft"], "--out_preference", outs["preference"],
            "--out_ppo", outs["ppo"], "--preference", "4", "--ppo", "0.25"]
    assert prepare_data.main(argv) == 0
    out = capsys.readouterr().out
    assert "preference: 4 records" in out and "ppo: 6 records" in out and "left out:" in out
    sft, pref = data.read_sft(outs["sft"]), data.read_sft(outs["preference"])
    ppo = data.read_ppo_prompts(outs["ppo"])
    assert (len(pref), len(ppo)) == (4, 6) and {r["answer_type"] for r in ppo} == {"general"}
    assert prepare_data.detect_kind(outs["ppo"]) == "ppo"
    assert not ({r["image"] for r in sft} & {r["image"] for r in ppo})
    assert prepare_data.main(argv[:-4] + ["--preference", "30"]) == 2
    assert "the parts ask for" in capsys.readouterr().err
    assert prepare_data.main(argv[:5] + ["--out_preference", outs["sft"], "--out_ppo", outs["ppo"]]) == 2
    assert "three different files" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# check

def test_check_command(tok_dir, tmp_path, capsys):
    for name in ("a.png", "b.png"):
        _draw(str(tmp_path / name))
    (tmp_path / "bad.png").write_bytes(b"nope")
    recs = [{"id": "0", "image": "a.png", "conversations": SINGLE},
            {"id": "1", "image": "b.png", "conversations": MULTI},
            {"id": "2", "conversations": TEXT_ONLY},
            {"id": "3", "image": "bad.png", "conversations": SINGLE},
            {"id": "4", "conversations": [TEXT_ONLY[0], {"from": "gpt", "value": ""}]}]
    path = _write(tmp_path / "sft.json", recs)
    rc = prepare_data.main(["check", "--file", path, "--image_folder", str(tmp_path), "--tokenizer", tok_dir,
                            "--num_image_tokens", str(N_IMG), "--max_len", "60"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "kind: sft" in out and "records: 5  valid: 3  problems: 2" in out
    assert "record 3: cannot read image" in out and "record 4: turn 1 is an empty answer" in out
    assert out.index("record 3:") < out.index("record 4:")  # problems listed in record order
    assert "images: 3 referenced, 2 ok, 1 missing or unreadable" in out
    assert "histogram:" in out and "tokens (image = 4)" in out
    tok = Tokenizer(tok_dir)
    lengths = [len(tokenize_conversation(r["conversations"], tok, T, N_IMG)[0])
               for r in data.read_sft(path, on_error="skip", skips=Skips())[:3]]
    res = prepare_data.check_dataset(path, str(tmp_path), tok, num_image_tokens=N_IMG, out=open(os.devnull, "w"))
    assert res["lengths"] == lengths and res["valid"] == 3
    # a clean preference file, kind detected, exit code 0
    pref = _write(tmp_path / "pref.json", [GOOD_PREF, dict(GOOD_PREF, preference=2)])
    assert prepare_data.main(["check", "--file", pref, "--tokenizer", tok_dir]) == 0
    out = capsys.readouterr().out
    assert "kind: preference" in out and "preference: 1 -> 1, 2 -> 1" in out


def test_check_reports_images_too_large_once_padded(tmp_path, capsys):
    Image.new("L", (10_000, 1), 9).save(tmp_path / "wide.png")  # 10^4 pixels, 10^8 padded to a square
    _draw(str(tmp_path / "ok.png"))
    path = _write(tmp_path / "s.json", [{"id": "0", "image": "wide.png", "conversations": SINGLE},
                                        {"id": "1", "image": "ok.png", "conversations": SINGLE}])
    assert prepare_data.main(["check", "--file", path, "--image_folder", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "images: 2 referenced, 1 ok, 1 missing or unreadable" in out
    assert (f"  {path}: record 0: refusing a 10000x1 image: padded to a 10000x10000 square it has more than "
            f"MAX_IMAGE_PIXELS=89478485 pixels (longest side at most 9459); shrink it (image {tmp_path}/wide.png)\n"
            in out)


def test_check_reports_repeated_ids(tmp_path, capsys):
    a = {"id": "a", "conversations": TEXT_ONLY}
    a2 = {"id": "a", "conversations": [TEXT_ONLY[0], {"from": "gpt", "value": "Hi!"}]}  # the same id, other text
    no_id = {"conversations": TEXT_ONLY}
    recs = [a, a2, {"id": 5, "conversations": TEXT_ONLY}, a, no_id, no_id, {"id": "5", "conversations": TEXT_ONLY}]
    path = _write(tmp_path / "s.json", recs)
    assert prepare_data.main(["check", "--file", path]) == 1
    out = capsys.readouterr().out
    assert ("repeated ids: 2 id(s) name more than one record (3 beyond the first): 'a' (records 0, 1, 3), "
            "'5' (records 2, 6); exact copies are problems (training refuses them), records that only share "
            "an id are kept\n") in out
    assert "records: 7  valid: 5  problems: 2" in out
    res = prepare_data.check_dataset(path, out=open(os.devnull, "w"))
    assert res["repeated_ids"] == {"a": [0, 1, 3], "5": [2, 6]}
    assert res["problems"] == [
        f"{path}: record 3: duplicate of record 0 (id 'a', same content); delete one copy or give it its own id",
        f"{path}: record 6: duplicate of record 2 (id '5', same content); delete one copy or give it its own id"]
    # no repeated id: no line, an empty map
    res = prepare_data.check_dataset(_write(tmp_path / "u.json", [a, no_id, no_id]), out=open(os.devnull, "w"))
    assert res["repeated_ids"] == {} and res["problems"] == []


@pytest.mark.parametrize("n_img", [256, 576])
def test_check_max_len_counts_the_image_as_one_id(tok, n_img, tmp_path):
    # `check --max_len` counts as SFTDataset does (SPEC §9: 1280 text ids, the image as one)
    fits, long = _long_conv(1000), _long_conv(1400)
    full, lfull = (tokenize_conversation(c, tok, T, n_img)[0] for c in (fits, long))
    assert data.text_len(full) <= 1280 < len(full) and data.text_len(lfull) > 1280
    path = _write(tmp_path / "sft.json", [{"id": "fits", "image": "a.png", "conversations": fits},
                                          {"id": "long", "image": "a.png", "conversations": long}])
    res = prepare_data.check_dataset(path, None, tok, num_image_tokens=n_img, max_len=1280, check_images=False,
                                     out=open(os.devnull, "w"))
    assert res["too_long"] == 1 and res["lengths"] == [len(full), len(lfull)]
    # a max_len that leaves no answer: still counted, not an error
    prompt = tokenize_prompt("Describe the picture.", tok, T, n_img)
    res = prepare_data.check_dataset(path, None, tok, num_image_tokens=n_img, max_len=data.text_len(prompt),
                                     check_images=False, out=open(os.devnull, "w"))
    assert res["too_long"] == 2 and res["valid"] == 2


# ----------------------------------------------------------------------------------------------------
# the command line

def test_cli_rejects_unknown_keys_and_prints_help(tmp_path, capsys):
    path = _write(tmp_path / "sft.json", [{"id": "0", "conversations": TEXT_ONLY}])
    assert prepare_data.main(["check", "--file", path, "--max_lenght", "9"]) == 2
    assert "unknown config key --max_lenght (did you mean max_len?)" in capsys.readouterr().err
    # the old positional / space-separated forms name what is wrong instead of guessing
    assert prepare_data.main(["mix", "--inputs", path, path, "--out", str(tmp_path / "m.json")]) == 2
    assert "unexpected argument" in capsys.readouterr().err
    assert prepare_data.main(["convert", "vqav2", "--out", str(tmp_path / "o.json")]) == 2
    assert "--questions is required" in capsys.readouterr().err
    assert prepare_data.main(["convert", "vqav2", "--questions", "q", "--annotations", "a", "--out", "o",
                              "--format", "csv"]) == 2
    assert "--format must be one of sft, ppo" in capsys.readouterr().err
    # --help: every key of the command with its default and what it does
    assert prepare_data.main(["convert", "aokvqa", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python prepare_data.py convert aokvqa [--key value")
    assert "--style str = ''" in out and "rationale_first (CoT)" in out and "--skip bool = False" in out
    assert prepare_data.main(["split", "--help"]) == 0 and "--preference float = 10000" in capsys.readouterr().out
    assert prepare_data.main(["rlinit", "--help"]) == 0 and "--aokvqa_count int = -1" in capsys.readouterr().out
    assert prepare_data.main(["--help"]) == 0 and "python prepare_data.py mix" in capsys.readouterr().out
    assert prepare_data.main(["convert", "coco"]) == 2
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "check", "--file", path, "--bogus", "1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown config key --bogus"
