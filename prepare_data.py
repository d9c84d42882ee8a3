r"""Preparing data for LLaVA-RLHF: convert the public human-written sets (VQA-v2, A-OKVQA, Flickr30k) to SFT
conversations (or PPO prompts), mix SFT files into one shuffled set, build the paper's RL-init mix and a
disjoint SFT / preference / PPO split of an instruction file, and check a file before training. Outputs
are in the shapes of the released LLaVA-RLHF files (SPEC §9): COCO images by their train2017 file name.

    python prepare_data.py convert vqav2 --questions v2_OpenEnded_mscoco_train2014_questions.json \
        --annotations v2_mscoco_train2014_annotations.json --out vqav2_sft.json [--per_image false] \
        [--format ppo [--yes_no_only false]]
    python prepare_data.py convert aokvqa --input aokvqa_v1p0_train.json --out aokvqa_sft.json \
        [--style letter_first|rationale_first] [--format ppo [--facts_out aok_facts.json]]
    python prepare_data.py convert flickr30k --input results_20130124.token --out flickr_sft.json \
        [--captions_out flickr_captions.json] [--seed 0]
    python prepare_data.py mix --inputs a.json,b.json --out mix.json --seed 0 [--counts 1000,500]
    python prepare_data.py rlinit --preferences llava_7b_v1_preference.json --aokvqa aokvqa_v1p0_train.json \
        --aokvqa_count 5000 --out rlinit.json [--seed 0]
    python prepare_data.py split --input llava_instruct_150k.json --out_sft sft.json \
        --out_preference pref_prompts.json --out_ppo ppo_prompts.json [--preference 10000] [--ppo 50000] [--sft -1]
    python prepare_data.py check --file sft_mix.json --image_folder images --tokenizer /ckpt/vicuna-7b-v1.5 \
        [--kind sft|preference|ppo|mmhal] [--max_len 1280]

Every command takes `--key value` options (lists comma-separated), rejects unknown keys and prints its keys
with --help. Exit code 0; 1 when check found problems; 2 on a bad option or bad data (one line on stderr).
"""
from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import common
from data import (ANSWER_TYPES, CAPTION_TYPES, IMAGE_PLACEHOLDER, MMHAL_TYPES, DataError, Skips, Template,
                  Tokenizer, TruncationError, caption_type, facts_key, get_field, image_file, load_captions,
                  load_image, load_json, parse_each,
                  printable, read_mmhal, read_ppo_prompts, read_preferences, read_records, read_sft, read_text,
                  record_id, text_len, tokenize_conversation, tokenize_prompt, with_response)


def write_records(records: list[dict] | dict, path: str) -> None:
    """Indented JSON, or JSONL (one record a line) when the name ends in .jsonl. Atomic: a crash leaves
    the old file or the new one, never a half."""
    def write(tmp: str) -> None:
        # a lone surrogate in a string (an undecodable file name from os.listdir or argv, or a "\udXXX"
        # escape in the input) has no UTF-8 form: backslashreplace writes it as that same JSON escape,
        # so the file reads back to the same string
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
            if path.endswith(".jsonl"):
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            else:
                json.dump(records, f, ensure_ascii=False, indent=1)
    common.atomic_file(path, write)


# ----------------------------------------------------------------------------------------------------
# Converters to SFT conversations (and PPO prompts)

VQA_INSTRUCTION = "Answer the question using a single word or phrase."
MC_INSTRUCTION = "Answer with the letter of the correct option, then explain why."
COT_INSTRUCTION = "Think it through step by step, then give the letter of the correct option."
CAPTION_INSTRUCTIONS = (
    "Describe this image briefly.",
    "Write a short caption for this picture.",
    "Give a one-sentence description of the photo.",
    "What does this image show? Answer in one sentence.",
    "Summarize the visual content of the image in a sentence.",
    "Provide a brief description of what you see.",
    "Caption this image.",
    "Briefly describe the scene shown here.",
)
# COCO train2017's file name, as every released LLaVA / LLaVA-RLHF file names its images (with
# image_folder = the train2017 folder); VQA-v2's train2014 images have the same ids
COCO_IMAGE = "{image_id:012d}.jpg"
AOKVQA_STYLES = ("letter_first", "rationale_first")


def _convert_each(path: str, items: list, convert_one, on_error: str, skips: Skips | None) -> list[dict]:
    return [rec for _, rec in parse_each(path, list(enumerate(items)), convert_one, on_error, skips)]


def _nonempty(rec: dict, key: str) -> str:
    v = get_field(rec, key, str)
    if not v.strip():
        raise DataError(f"field '{key}' is empty")
    return v.strip()


def _exchange(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"}, {"from": "gpt", "value": answer}]


def convert_vqav2(questions: str, annotations: str, image_format: str = COCO_IMAGE, per_image: bool = True,
                  fmt: str = "sft", instruction: str = VQA_INSTRUCTION, yes_no_only: bool = True,
                  on_error: str = "raise", skips: Skips | None = None) -> list[dict]:
    """VQA-v2 -> short-answer conversations (the answer is multiple_choice_answer). per_image (the default,
    as the paper's SFT data) makes one multi-turn conversation of the questions about one image, in file
    order, with the id of its first question; per_image=False one conversation per question.
    fmt="ppo" writes PPO prompts in the released file's shape (one exchange per question, "caption_type"
    6 / 7 for a yes/no question answered no / yes, 1 otherwise); yes_no_only (the default, as the paper's
    10k PPO questions) keeps only the yes/no questions."""
    qdata, adata = load_json(questions), load_json(annotations)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise DataError("expected {'questions': [...]}", path=questions)
    if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
        raise DataError("expected {'annotations': [...]}", path=annotations)
    answers = {a.get("question_id"): a for a in adata["annotations"] if isinstance(a, dict)}

    def one(q: dict) -> dict:
        qid, image_id = get_field(q, "question_id", int), get_field(q, "image_id", int)
        question = _nonempty(q, "question")
        if qid not in answers:
            raise DataError(f"question_id {qid} has no annotation in {annotations}")
        answer = _nonempty(answers[qid], "multiple_choice_answer")
        rec = {"id": f"vqav2_{qid}", "image": image_format.format(image_id=image_id), "image_id": image_id,
               "conversations": _exchange(f"{question}\n{instruction}", answer)}
        if fmt == "ppo":
            yes_no = answer.lower() in ("yes", "no")
            rec["caption_type"] = caption_type("yes_no", answer.lower()) if yes_no else caption_type("general", None)
        return rec
    recs = _convert_each(questions, qdata["questions"], one, on_error, skips)
    if fmt == "ppo" and yes_no_only:
        recs = [r for r in recs if r["caption_type"] != 1]
    if fmt == "sft" and per_image:
        grouped: dict[int, dict] = {}
        for r in recs:
            g = grouped.setdefault(r["image_id"], r)
            if g is not r:  # later questions on the same image: plain turns, the image stays in the first
                q = r["conversations"][0]["value"].replace(IMAGE_PLACEHOLDER + "\n", "")
                g["conversations"] += [{"from": "human", "value": q}, r["conversations"][1]]
        recs = list(grouped.values())
    for r in recs:
        r.pop("image_id", None)
    return recs


def aokvqa_facts(choices: list[str], k: int, rationales: list[str]) -> list[str]:
    """An A-OKVQA question's own facts for the reward model: its correct answer, then its rationales."""
    return [f"The answer is {choices[k].strip()}."] + rationales


def convert_aokvqa(path: str, image_format: str = COCO_IMAGE, style: str = "", fmt: str = "sft",
                   on_error: str = "raise", skips: Skips | None = None) -> list[dict]:
    """A-OKVQA -> multiple choice (options lettered A-D) answered with the first rationale.
    style="letter_first" (the default for fmt="sft"): "B. choice\nrationale", asked with MC_INSTRUCTION;
    "rationale_first", the chain-of-thought form of the paper's RL-init and PPO data (the default for
    fmt="ppo"): "rationale So the correct option is B.", asked with COT_INSTRUCTION. Both end forms are the
    ones the official correctness bonus recognises (a response starting "B." or holding "correct option
    is B."). fmt="ppo" writes PPO prompts in the released file's shape ("caption_type" 2-5 for the letter
    A-D) with the question's own facts inline (aokvqa_facts; facts_map writes them keyed for a captions
    file). A question without a rationale is an error for fmt="sft" and written without one for "ppo"."""
    items = load_json(path)
    if not isinstance(items, list):
        raise DataError("expected a JSON list of A-OKVQA records", path=path)
    style = style or ("rationale_first" if fmt == "ppo" else "letter_first")
    if style not in AOKVQA_STYLES:
        raise ValueError(f"unknown style {style!r}")

    def one(r: dict) -> dict:
        qid, image_id = get_field(r, "question_id", (str, int)), get_field(r, "image_id", int)
        question = _nonempty(r, "question")
        choices = get_field(r, "choices", list)
        if not 2 <= len(choices) <= 4 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataError("'choices' should be 2-4 non-empty strings")
        k = get_field(r, "correct_choice_idx", int)
        if not 0 <= k < len(choices):
            raise DataError(f"'correct_choice_idx' {k} is out of range for {len(choices)} choices")
        rationales = [x.strip() for x in get_field(r, "rationales", list, required=False, default=[])
                      if isinstance(x, str) and x.strip()]
        if not rationales and fmt == "sft":
            raise DataError("no rationale to answer with")
        letter = "ABCD"[k]
        options = "\n".join(f"{'ABCD'[i]}. {c.strip()}" for i, c in enumerate(choices))
        instruction = MC_INSTRUCTION if style == "letter_first" else COT_INSTRUCTION
        if not rationales:
            answer = f"{letter}. {choices[k].strip()}"
        elif style == "letter_first":
            answer = f"{letter}. {choices[k].strip()}\n{rationales[0]}"
        else:
            answer = f"{rationales[0]} So the correct option is {letter}."
        rec = {"id": f"aokvqa_{qid}", "image": image_format.format(image_id=image_id),
               "conversations": _exchange(f"{question}\n{options}\n{instruction}", answer)}
        if fmt == "ppo":
            rec.update(caption_type=caption_type("multiple_choice", letter), facts=aokvqa_facts(choices, k, rationales))
        return rec
    return _convert_each(path, items, one, on_error, skips)


def facts_map(prompts: list[dict]) -> dict[str, list[str]]:
    """{facts_key: facts} for PPO prompts carrying inline facts, keyed as the official trainer looks them up
    in image_to_caption.json ("aok_000000123456.jpg" for an A-OKVQA prompt); the facts of several questions
    on one image are merged in order, each once."""
    out: dict[str, list[str]] = {}
    for p in prompts:
        if p.get("facts") and p.get("image"):
            at = CAPTION_TYPES[p["caption_type"]][0] if "caption_type" in p else p.get("answer_type", "general")
            facts = out.setdefault(facts_key(p["image"], at), [])
            facts += [f for f in p["facts"] if f not in facts]
    return out


def read_flickr30k_captions(path: str, split: str | None = None) -> dict[str, list[str]]:
    """Flickr30k captions as {file name: [captions]} from any of: results_20130124.token
    ("name.jpg#0<TAB>caption"), results.csv ("name.jpg| 0| caption"), Karpathy's dataset_flickr30k.json
    ({"images": [{"filename", "sentences": [{"raw"}], "split"}]}) or a plain {name: [captions]} map."""
    caps: dict[str, list[str]] = {}
    if path.endswith(".json"):
        data = load_json(path)
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            for i, im in enumerate(data["images"]):
                try:
                    if split is not None and im.get("split") != split:
                        continue
                    name = get_field(im, "filename", str)
                    caps[name] = [_nonempty(s, "raw") for s in get_field(im, "sentences", list)]
                except (DataError, AttributeError) as e:
                    raise (e if isinstance(e, DataError) else DataError(str(e))).at(path, i) from None
            return caps
        return load_captions(data)
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip() or line.lower().startswith("image_name"):
            continue
        if "\t" in line:
            key, cap = line.split("\t", 1)
            name = key.split("#")[0]
        elif line.count("|") >= 2:
            name, _, cap = (x.strip() for x in line.split("|", 2))
        else:
            raise DataError(f"line {lineno}: expected 'name.jpg#k<TAB>caption' or 'name.jpg| k| caption'", path=path)
        if cap.strip():
            caps.setdefault(name.strip(), []).append(cap.strip())
    return caps


def convert_flickr30k(path: str, image_format: str = "flickr30k/{name}", seed: int = 0, all_captions: bool = False,
                      split: str | None = None) -> list[dict]:
    """Flickr30k -> captioning conversations: per image one caption (or every one with all_captions),
    each asked with an instruction drawn from CAPTION_INSTRUCTIONS by a seeded RNG."""
    caps = read_flickr30k_captions(path, split)
    rng = random.Random(seed)
    recs = []
    for name, cs in caps.items():
        chosen = cs if all_captions else [rng.choice(cs)]
        for k, cap in enumerate(chosen):
            stem = os.path.splitext(name)[0]
            recs.append({"id": f"flickr30k_{stem}" + (f"_{k}" if all_captions else ""),
                         "image": image_format.format(name=name),
                         "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{rng.choice(CAPTION_INSTRUCTIONS)}"},
                                           {"from": "gpt", "value": cap}]})
    return recs


def mix_sft(inputs: list[str], seed: int = 0, counts: list[int] | None = None, on_error: str = "raise",
            skips: Skips | None = None) -> list[dict]:
    """Validate several SFT files, optionally sample counts[i] records from input i (without replacement),
    and shuffle everything with one seeded RNG."""
    if counts is not None and len(counts) != len(inputs):
        raise ValueError("--counts needs one number per input")
    rng = random.Random(seed)
    out = []
    for i, path in enumerate(inputs):
        recs = read_sft(path, on_error=on_error, skips=skips)
        recs = [{"id": r["id"], **({"image": r["image"]} if r["image"] is not None else {}),
                 "conversations": r["conversations"]} for r in recs]
        if counts is not None:
            if counts[i] > len(recs):
                raise ValueError(f"{path}: asked for {counts[i]} records but it has {len(recs)}")
            recs = rng.sample(recs, counts[i])
        out.extend(recs)
    rng.shuffle(out)
    dup = sum(c - 1 for c in Counter(r["id"] for r in out).values() if c > 1)
    if dup:
        print(f"mix: warning: {dup} duplicate id(s) across the inputs", file=sys.stderr)
    return out


def _sft_record(rid: str, image: str | None, conversations: list[dict]) -> dict:
    return {"id": rid, **({"image": image} if image is not None else {}), "conversations": conversations}


def unique_ids(records: list[dict]) -> int:
    """Give every record its own id, in place and in order: a repeat of an earlier id (LLaVA gives all the
    records of an image the image's id) becomes "<id>_2", "<id>_3", ... (skipping any id a record already
    has). Returns how many were renamed."""
    taken = {r["id"] for r in records}
    used: set[str] = set()
    renamed = 0
    for r in records:
        rid = r["id"]
        if rid in used:
            k = 2
            while f"{rid}_{k}" in taken or f"{rid}_{k}" in used:
                k += 1
            r["id"], renamed = f"{rid}_{k}", renamed + 1
        used.add(r["id"])
    return renamed


def build_rlinit(preferences: str, aokvqa: str | None = None, aokvqa_count: int | None = None, seed: int = 0,
                 image_format: str = COCO_IMAGE) -> list[dict]:
    """The RL-init mix (SPEC §3, the released llava_reward10k-aokvqa5k.json): every preference prompt
    answered with its preferred response (output_{preference}) as an SFT conversation, plus aokvqa_count
    A-OKVQA questions (None: all) drawn from the A-OKVQA file in chain-of-thought form (convert_aokvqa
    style "rationale_first"); shuffled with one seeded RNG, every id made unique (unique_ids)."""
    rng = random.Random(seed)
    out = [_sft_record(r["id"], r["image"], r["conversations"] + [
        {"from": "gpt", "value": r[f"output_{r['preference']}"]["value"]}]) for r in read_preferences(preferences)]
    if aokvqa:
        cot = convert_aokvqa(aokvqa, image_format, style="rationale_first")
        if aokvqa_count is not None:
            if not 0 <= aokvqa_count <= len(cot):
                raise DataError(f"asked for {aokvqa_count} A-OKVQA records but it has {len(cot)}", path=aokvqa)
            cot = rng.sample(cot, aokvqa_count)
        out += cot
    elif aokvqa_count:
        raise DataError("an A-OKVQA count without an A-OKVQA file")
    renamed = unique_ids(out)
    n_pref = len(out) - (len(cot) if aokvqa else 0)
    print(f"rlinit: {n_pref} preference prompts + {len(out) - n_pref} A-OKVQA (chain of thought)"
          + (f"; {renamed} repeated id(s) renamed <id>_k" if renamed else ""), file=sys.stderr)
    rng.shuffle(out)
    return out


SPLIT_PARTS = ("preference", "ppo", "sft")  # the order parts are filled: the held-out prompts first


def split_counts(spec: dict[str, float], total: int) -> dict[str, int | None]:
    """Record counts of the split's parts from counts (whole numbers) or fractions of `total` (0 < x < 1,
    rounded down); -1 for "sft": every record left (None). Refuses negative or fractional counts and a sum
    above `total`."""
    out: dict[str, int | None] = {}
    for part in SPLIT_PARTS:
        v = spec[part]
        if part == "sft" and v == -1:
            out[part] = None
        elif 0 < v < 1:
            out[part] = int(v * total)
        elif v >= 0 and float(v).is_integer():
            out[part] = int(v)
        else:
            raise DataError(f"--{part} {v} should be a count (a whole number), a fraction between 0 and 1"
                            + (", or -1 for every record left" if part == "sft" else ""))
    asked = sum(n for n in out.values() if n is not None)
    if asked > total:
        which = ", ".join(f"{k} {v}" for k, v in out.items() if v is not None)
        raise DataError(f"the parts ask for {asked} records ({which}) but the file has {total}")
    return out


def split_instructions(path: str, counts: dict[str, float], seed: int = 0) -> tuple[dict[str, list[dict]], int]:
    """A disjoint split of an SFT-format instruction file (e.g. LLaVA-Instruct) into the SFT, preference-prompt
    and PPO-prompt parts (SPEC §3: the reward model's and PPO's prompts are held out from SFT), by counts or
    fractions (split_counts). Disjoint by image: records are grouped by image (a record without one is its
    own group), the groups shuffled with a seeded RNG and dealt out in order, preference then ppo then sft;
    when a part is full in the middle of an image, that image's other records are left out of every part, so
    no image is in two parts. Ids are made unique over the file first (unique_ids). The sft and preference
    parts are SFT records; the ppo part is each record's first exchange in the released PPO file's shape
    ("caption_type" 1), as the official loader keeps only that. Returns ({part: records}, records left out);
    DataError when a part cannot be filled."""
    recs = [_sft_record(r["id"], r["image"], r["conversations"]) for r in read_sft(path)]
    renamed = unique_ids(recs)
    if renamed:
        print(f"split: {renamed} repeated id(s) renamed <id>_k", file=sys.stderr)
    need = split_counts(counts, len(recs))
    groups: dict[object, list[dict]] = {}
    for i, r in enumerate(recs):
        groups.setdefault(r.get("image") or ("no image", i), []).append(r)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    parts: dict[str, list[dict]] = {p: [] for p in SPLIT_PARTS}
    left_out, g = 0, 0
    for part in SPLIT_PARTS:
        n = need[part]
        while g < len(order) and (n is None or len(parts[part]) < n):
            group = order[g]
            g += 1
            room = len(group) if n is None else n - len(parts[part])
            parts[part] += group[:room]
            left_out += max(0, len(group) - room)
        if n is not None and len(parts[part]) < n:
            raise DataError(f"the {part} part needs {n} records but only {len(parts[part])} are left after the "
                            f"parts before it (whole images are kept in one part; {left_out} records of images "
                            "cut at a part's boundary are left out)", path=path)
    left_out += sum(len(grp) for grp in order[g:])
    parts["ppo"] = [{"id": r["id"], **({"image": r["image"]} if "image" in r else {}),
                     "conversations": r["conversations"][:2], "caption_type": 1} for r in parts["ppo"]]
    return parts, left_out


# ----------------------------------------------------------------------------------------------------
# Checking a dataset

def detect_kind(path: str) -> str:
    for _, raw in read_records(path):
        if isinstance(raw, dict):
            if "output_1" in raw or "preference" in raw:
                return "preference"
            if "gt_answer" in raw and "question_type" in raw:
                return "mmhal"
            if any(k in raw for k in ("question", "answer_type", "facts", "caption_type", "length_bonus")):
                return "ppo"
            return "sft"
    return "sft"


def _histogram(lengths: list[int], bins: int = 10) -> list[str]:
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((x - lo) // width for x in lengths)
    top = max(counts.values())
    return [f"  [{lo + b * width:6d}, {lo + (b + 1) * width:6d})  {counts.get(b, 0):7d}  "
            + "#" * int(round(40 * counts.get(b, 0) / top)) for b in range(-(-(hi - lo + 1) // width))]


def check_dataset(path: str, image_folder: str | None = None, tokenizer: str | Tokenizer | None = None,
                  kind: str | None = None, num_image_tokens: int = 576, max_len: int | None = None,
                  check_images: bool = True, out=None) -> dict:
    """Validate every record of a file: prints counts, problems (record index and reason) and a token
    length histogram; returns the same as a dict. Problems never stop the check. Ids naming more than one
    record are listed (count, the first few with their record indices; "repeated_ids" maps each to all its
    indices): an exact copy of an earlier record is a problem (the readers refuse it), records that only
    share an id are not (LLaVA's data gives all the records of an image the image's id)."""
    out = out or sys.stdout
    template = Template()
    kind = kind or detect_kind(path)
    rows = read_records(path)
    total = len(rows)
    repeated = _repeated_ids(rows)
    skips = Skips()
    reader = {"sft": read_sft, "preference": read_preferences, "ppo": read_ppo_prompts, "mmhal": read_mmhal}[kind]
    recs = reader(path, on_error="skip", skips=skips)
    problems = list(zip(skips.indices, skips.reasons))
    n_img = n_img_bad = 0
    good = []
    for r in recs:
        if check_images and kind != "mmhal" and r.get("image") is not None:
            n_img += 1
            p = image_file(image_folder, r["image"])
            try:
                load_image(p)
            except DataError as e:
                problems.append((r["index"], str(e.at(path, r["index"], p))))
                n_img_bad += 1
                continue
        good.append(r)
    problems = [msg for _, msg in sorted(problems, key=lambda x: -1 if x[0] is None else x[0])]
    lengths, too_long, emptied = [], 0, 0
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        for r in good:
            if kind == "sft":
                seqs = [tokenize_conversation(r["conversations"], tok, template, num_image_tokens)[0]]
            elif kind == "preference":
                seqs = [tokenize_conversation(with_response(r["conversations"], r[k]["value"]), tok, template,
                                              num_image_tokens)[0] for k in ("output_1", "output_2")]
            else:
                has_image = r.get("image") is not None or kind == "mmhal"
                seqs = [tokenize_prompt(r["question"], tok, template, num_image_tokens, has_image=has_image)]
            # the histogram shows the model's sequence length (image = num_image_tokens ids); max_len counts
            # the image as one id, as the training scripts do (text_len)
            lengths.append(max(len(x) for x in seqs))
            if max_len is not None and max(text_len(x) for x in seqs) > max_len:
                too_long += 1
                if kind == "sft":
                    try:
                        tokenize_conversation(r["conversations"], tok, template, num_image_tokens, max_len)
                    except TruncationError:
                        emptied += 1
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"file: {printable(path)}")
    p(f"kind: {kind}")
    p(f"records: {total}  valid: {len(good)}  problems: {len(problems)}")
    if kind == "preference" and good:
        c = Counter(r["preference"] for r in good)
        p(f"preference: 1 -> {c.get(1, 0)}, 2 -> {c.get(2, 0)}")
    if kind in ("ppo", "mmhal") and good:
        key, types = ("answer_type", ANSWER_TYPES) if kind == "ppo" else ("question_type", MMHAL_TYPES)
        c = Counter(r[key] for r in good)
        p(f"{key.replace('_', ' ')}s: " + ", ".join(f"{k} {c[k]}" for k in types if c.get(k)))
    if check_images and kind != "mmhal":
        p(f"images: {n_img} referenced, {n_img - n_img_bad} ok, {n_img_bad} missing or unreadable")
    if repeated:
        extra = sum(len(ix) - 1 for ix in repeated.values())
        shown = ", ".join(f"{rid!r} (records {', '.join(map(str, ix[:5]))}"  # repr escapes any surrogate
                          + (", ...)" if len(ix) > 5 else ")") for rid, ix in list(repeated.items())[:5])
        p(f"repeated ids: {len(repeated)} id(s) name more than one record ({extra} beyond the first): {shown}"
          + (", ..." if len(repeated) > 5 else "")
          + "; exact copies are problems (training refuses them), records that only share an id are kept")
    if problems:
        p("problems:")
        for msg in problems[:50]:
            p(f"  {msg}")
        if len(problems) > 50:
            p(f"  ... and {len(problems) - 50} more")
    if lengths:
        a = np.array(lengths)
        p(f"tokens (image = {num_image_tokens}): min {a.min()}  mean {a.mean():.1f}  p50 {int(np.percentile(a, 50))}"
          f"  p90 {int(np.percentile(a, 90))}  p99 {int(np.percentile(a, 99))}  max {a.max()}")
        if max_len is not None:
            p(f"longer than max_len {max_len} (the image counted as one id): {too_long}"
              + (f" ({emptied} would lose every supervised token and be dropped)" if kind == "sft" else ""))
        p("histogram:")
        for line in _histogram(lengths):
            p(line)
    return {"kind": kind, "total": total, "valid": len(good), "problems": problems, "lengths": lengths,
            "too_long": too_long, "images": n_img, "images_bad": n_img_bad, "repeated_ids": repeated}


def _repeated_ids(rows: list[tuple[int, object]]) -> dict[str, list[int]]:
    """{id: [record indices]} for every explicit id that more than one record of the file carries."""
    by_id: dict[str, list[int]] = {}
    for index, raw in rows:
        rid = record_id(raw) if isinstance(raw, dict) else None
        if rid is not None:
            by_id.setdefault(rid, []).append(index)
    return {rid: ix for rid, ix in by_id.items() if len(ix) > 1}


# ----------------------------------------------------------------------------------------------------
# Command line: one config dataclass per command, parsed by common.parse_config like the stages'

@dataclass
class VQAv2Config:
    questions: str = ""                # v2_OpenEnded_mscoco_*_questions.json (required)
    annotations: str = ""              # v2_mscoco_*_annotations.json (required)
    out: str = ""                      # the file to write (required); a .jsonl name writes JSONL
    per_image: bool = True             # sft: one multi-turn conversation per image (the paper's); false: per question
    format: str = "sft"                # sft (conversations) or ppo (prompts in the released PPO file's shape)
    yes_no_only: bool = True           # ppo: only the yes/no questions (the paper's PPO prompts); false: every question
    image_format: str = COCO_IMAGE     # a record's image path, from its {image_id}
    skip: bool = False                 # skip (and count) bad records instead of stopping


@dataclass
class AOKVQAConfig:
    input: str = ""                    # aokvqa_v1p0_*.json (required)
    out: str = ""                      # the file to write (required); a .jsonl name writes JSONL
    style: str = ""                    # letter_first | rationale_first (CoT); default: sft letter_first, ppo rationale_first
    format: str = "sft"                # sft (conversations) or ppo (the released PPO file's shape, facts inline)
    facts_out: str = ""                # ppo: also write the facts keyed as image_to_caption.json's "aok_" entries
    image_format: str = COCO_IMAGE     # a record's image path, from its {image_id}
    skip: bool = False                 # skip (and count) bad records instead of stopping


@dataclass
class Flickr30kConfig:
    input: str = ""                    # results_20130124.token, results.csv or dataset_flickr30k.json (required)
    out: str = ""                      # the file to write (required); a .jsonl name writes JSONL
    seed: int = 0                      # draws each image's caption and instruction
    all_captions: bool = False         # one conversation per caption instead of one per image
    split: str = ""                    # with Karpathy's dataset_flickr30k.json: keep only this split
    captions_out: str = ""             # also write the image -> captions map (the reward model's facts)
    image_format: str = "flickr30k/{name}"  # a record's image path, from its file {name}


@dataclass
class MixConfig:
    inputs: list[str] = field(default_factory=list)  # SFT files, comma-separated (required)
    out: str = ""                      # the file to write (required)
    seed: int = 0                      # the draw and the shuffle
    counts: list[int] = field(default_factory=list)  # records drawn from each input, comma-separated; default all
    skip: bool = False                 # skip (and count) bad records instead of stopping


@dataclass
class CheckConfig:
    file: str = ""                     # the data file (required)
    image_folder: str = ""             # where the records' images are; relative names resolve against it
    tokenizer: str = ""                # a sentencepiece model (or its folder): token lengths and a histogram
    kind: str = ""                     # sft, preference, ppo or mmhal; default: detected from the records
    max_len: int = 0                   # count records longer than this, the image as one id; 0: no limit
    num_image_tokens: int = 576        # image tokens per image in the lengths
    images: bool = True                # open every image


@dataclass
class RLInitConfig:
    preferences: str = ""              # the human-preference file (llava_7b_v1_preference.json's shape) (required)
    aokvqa: str = ""                   # aokvqa_v1p0_train.json: questions added in chain-of-thought form; empty: none
    aokvqa_count: int = -1             # A-OKVQA questions drawn (the paper: 5000); -1: all of the file
    out: str = ""                      # the file to write (required)
    seed: int = 0                      # the draw and the shuffle
    image_format: str = COCO_IMAGE     # an A-OKVQA record's image path, from its {image_id}


@dataclass
class SplitConfig:
    input: str = ""                    # an SFT-format instruction file, e.g. llava_instruct_150k.json (required)
    out_sft: str = ""                  # the SFT part (required)
    out_preference: str = ""           # the preference prompts, SFT records: the last answer is the slot (required)
    out_ppo: str = ""                  # the PPO prompts, the released PPO file's shape (required)
    preference: float = 10000          # records in the preference part: a count, or a fraction (0-1) of the file
    ppo: float = 50000                 # records in the PPO part: a count or a fraction
    sft: float = -1                    # records in the SFT part: a count or a fraction; -1: every record left
    seed: int = 0                      # the shuffle of the images


def _need(cfg, *keys: str) -> None:
    for key in keys:
        if not getattr(cfg, key):
            raise common.ConfigError(f"--{key} is required")


def _one_of(cfg, key: str, options: tuple[str, ...]) -> None:
    if getattr(cfg, key) not in options:
        raise common.ConfigError(f"--{key} must be one of {', '.join(options)}, got {getattr(cfg, key)!r}")


def _wrote(recs: list[dict], out: str, skips: Skips) -> int:
    write_records(recs, out)
    print(f"wrote {len(recs)} records to {printable(out)}" + (f"; skipped {skips.count}" if skips.count else ""))
    if skips.count:
        skips.report()
    return 0


def run_vqav2(cfg: VQAv2Config) -> int:
    _need(cfg, "questions", "annotations", "out")
    _one_of(cfg, "format", ("sft", "ppo"))
    skips = Skips()
    recs = convert_vqav2(cfg.questions, cfg.annotations, cfg.image_format, cfg.per_image, cfg.format,
                         yes_no_only=cfg.yes_no_only, on_error="skip" if cfg.skip else "raise", skips=skips)
    return _wrote(recs, cfg.out, skips)


def run_aokvqa(cfg: AOKVQAConfig) -> int:
    _need(cfg, "input", "out")
    _one_of(cfg, "format", ("sft", "ppo"))
    skips = Skips()
    if cfg.style:
        _one_of(cfg, "style", AOKVQA_STYLES)
    if cfg.facts_out and cfg.format != "ppo":
        raise common.ConfigError("--facts_out goes with --format ppo")
    recs = convert_aokvqa(cfg.input, cfg.image_format, cfg.style, cfg.format,
                          on_error="skip" if cfg.skip else "raise", skips=skips)
    if cfg.facts_out:
        facts = facts_map(recs)
        write_records(facts, cfg.facts_out)
        print(f"wrote the facts of {len(facts)} images to {printable(cfg.facts_out)}")
    return _wrote(recs, cfg.out, skips)


def run_flickr30k(cfg: Flickr30kConfig) -> int:
    _need(cfg, "input", "out")
    recs = convert_flickr30k(cfg.input, cfg.image_format, cfg.seed, cfg.all_captions, cfg.split or None)
    if cfg.captions_out:
        write_records(read_flickr30k_captions(cfg.input, cfg.split or None), cfg.captions_out)
    return _wrote(recs, cfg.out, Skips())


def run_mix(cfg: MixConfig) -> int:
    _need(cfg, "inputs", "out")
    skips = Skips()
    recs = mix_sft(cfg.inputs, cfg.seed, cfg.counts or None, "skip" if cfg.skip else "raise", skips)
    return _wrote(recs, cfg.out, skips)


def run_rlinit(cfg: RLInitConfig) -> int:
    _need(cfg, "preferences", "out")
    recs = build_rlinit(cfg.preferences, cfg.aokvqa or None, None if cfg.aokvqa_count == -1 else cfg.aokvqa_count,
                        cfg.seed, cfg.image_format)
    return _wrote(recs, cfg.out, Skips())


def run_split(cfg: SplitConfig) -> int:
    _need(cfg, "input", "out_sft", "out_preference", "out_ppo")
    outs = {"sft": cfg.out_sft, "preference": cfg.out_preference, "ppo": cfg.out_ppo}
    if len(set(map(os.path.abspath, outs.values()))) < 3:
        raise common.ConfigError("--out_sft, --out_preference and --out_ppo must be three different files")
    parts, left_out = split_instructions(cfg.input, {"sft": cfg.sft, "preference": cfg.preference, "ppo": cfg.ppo},
                                         cfg.seed)
    for part in ("sft", "preference", "ppo"):
        recs = parts[part]
        write_records(recs, outs[part])
        images = len({r["image"] for r in recs if "image" in r})
        print(f"{part}: {len(recs)} records, {images} images -> {printable(outs[part])}")
    print(f"left out: {left_out} records (the rest of an image cut at a part's boundary, or beyond the counts)")
    return 0


def run_check(cfg: CheckConfig) -> int:
    _need(cfg, "file")
    if cfg.kind:
        _one_of(cfg, "kind", ("sft", "preference", "ppo", "mmhal"))
    res = check_dataset(cfg.file, cfg.image_folder or None, cfg.tokenizer or None, cfg.kind or None,
                        num_image_tokens=cfg.num_image_tokens, max_len=cfg.max_len or None, check_images=cfg.images)
    return 1 if res["problems"] else 0


COMMANDS: dict[str, tuple[type, Callable]] = {
    "convert vqav2": (VQAv2Config, run_vqav2), "convert aokvqa": (AOKVQAConfig, run_aokvqa),
    "convert flickr30k": (Flickr30kConfig, run_flickr30k), "mix": (MixConfig, run_mix),
    "rlinit": (RLInitConfig, run_rlinit), "split": (SplitConfig, run_split), "check": (CheckConfig, run_check)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = 2 if argv[:1] == ["convert"] else 1
    command, rest = " ".join(argv[:words]), argv[words:]
    if command not in COMMANDS:
        print(__doc__, file=sys.stdout if command in ("", "--help", "-h") else sys.stderr)
        return 0 if command in ("--help", "-h") else 2
    cls, run = COMMANDS[command]
    if "--help" in rest or "-h" in rest:
        print(common.config_help(cls, prog=f"python prepare_data.py {command}"))
        return 0
    try:
        return run(common.parse_config(cls, rest))
    except (common.UserError, OSError) as e:  # a bad option, bad data, an unreadable or unwritable path
        print(common.error_line(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
