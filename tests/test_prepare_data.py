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
from test_data import (GOOD_PREF, MULTI, N_IMG, ROOT, SINGLE, TEXT_ONLY, T, _draw, _long_conv,  # noqa: F401
                       _write, tok, tok_dir)


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
    recs = data.read_sft(out)  # the output is valid SFT data
    assert [x["id"] for x in recs] == ["vqav2_90", "vqav2_50", "vqav2_91"]
    assert recs[0]["image"] == "coco/train2017/000000000009.jpg"
    assert recs[0]["conversations"] == [
        {"from": "human", "value": f"<image>\nWhat color is the cat?\n{prepare_data.VQA_INSTRUCTION}"},
        {"from": "gpt", "value": "red"}]
    grouped = prepare_data.convert_vqav2(qf, af, per_image=True)
    assert len(grouped) == 2 and [t["value"] for t in grouped[0]["conversations"][2:]] == \
        [f"How many cats?\n{prepare_data.VQA_INSTRUCTION}", "2"]
    assert grouped[0]["conversations"][2]["value"].count("<image>") == 0
    ppo = prepare_data.convert_vqav2(qf, af, fmt="ppo")
    assert [(p["answer_type"], p["answer"]) for p in ppo] == [("general", "red"), ("yes_no", "yes"), ("general", "2")]
    ppo_path = _write(tmp_path / "vqa_ppo.jsonl", ppo)
    assert [p["answer_type"] for p in data.read_ppo_prompts(ppo_path)] == ["general", "yes_no", "general"]
    # the bare flag and a JSONL output through the command line
    out2 = str(tmp_path / "vqa_grouped.jsonl")
    assert prepare_data.main(["convert", "vqav2", "--questions", qf, "--annotations", af, "--out", out2,
                              "--per_image"]) == 0
    assert [len(r["conversations"]) for r in data.read_sft(out2)] == [4, 2]


def test_convert_vqav2_missing_annotation(tmp_path):
    qf, af = _vqa_files(tmp_path)
    a = json.load(open(af))
    a["annotations"] = a["annotations"][:2]
    af2 = _write(tmp_path / "a2.json", a)
    with pytest.raises(DataError, match="record 2.*no annotation"):
        prepare_data.convert_vqav2(qf, af2)
    skips = Skips()
    assert len(prepare_data.convert_vqav2(qf, af2, on_error="skip", skips=skips)) == 2 and skips.count == 1


def test_convert_aokvqa(tmp_path):
    items = [{"question_id": "k1", "image_id": 3, "question": "What is the cat doing?",
              "choices": ["sleeping", "eating", "running", "jumping"], "correct_choice_idx": 1,
              "direct_answers": ["eating"] * 10, "rationales": ["It has food in front of it.", "Bowl."]},
             {"question_id": "k2", "image_id": 4, "question": "Weather?", "choices": ["sun", "rain", "snow", "fog"],
              "correct_choice_idx": 3, "direct_answers": [], "rationales": ["It is hazy."]}]
    path = _write(tmp_path / "aok.json", items)
    recs = prepare_data.convert_aokvqa(path)
    q = recs[0]["conversations"][0]["value"]
    assert q == ("<image>\nWhat is the cat doing?\nA. sleeping\nB. eating\nC. running\nD. jumping\n"
                 + prepare_data.MC_INSTRUCTION)
    assert recs[0]["conversations"][1]["value"] == "B. eating\nIt has food in front of it."
    cot = prepare_data.convert_aokvqa(path, style="rationale_first")
    assert cot[1]["conversations"][1]["value"] == "It is hazy. So the correct option is D."
    ppo = data.read_ppo_prompts(_write(tmp_path / "aok_ppo.json", prepare_data.convert_aokvqa(path, fmt="ppo")))
    assert [(p["answer_type"], p["answer"]) for p in ppo] == [("multiple_choice", "B"), ("multiple_choice", "D")]
    assert ppo[0]["facts"] == ["The answer is eating.", "It has food in front of it.", "Bowl."]
    items[1]["correct_choice_idx"] = 7
    with pytest.raises(DataError, match="record 1.*out of range"):
        prepare_data.convert_aokvqa(_write(tmp_path / "aok2.json", items))


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
    assert "--style str = 'letter_first'" in out and "rationale_first" in out and "--skip bool = False" in out
    assert prepare_data.main(["--help"]) == 0 and "python prepare_data.py mix" in capsys.readouterr().out
    assert prepare_data.main(["convert", "coco"]) == 2
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "check", "--file", path, "--bogus", "1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown config key --bogus"
