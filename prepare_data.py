r"""Preparing data for LLaVA-RLHF: convert the public human-written sets (VQA-v2, A-OKVQA, Flickr30k) to SFT
conversations (or PPO prompts), mix SFT files into one shuffled set, and check a file before training.

    python prepare_data.py convert vqav2 --questions v2_OpenEnded_mscoco_train2014_questions.json \
        --annotations v2_mscoco_train2014_annotations.json --out vqav2_sft.json [--per_image] [--format ppo]
    python prepare_data.py convert aokvqa --input aokvqa_v1p0_train.json --out aokvqa_sft.json \
        [--style rationale_first] [--format ppo]
    python prepare_data.py convert flickr30k --input results_20130124.token --out flickr_sft.json \
        [--captions_out flickr_captions.json] [--seed 0]
    python prepare_data.py mix --inputs a.json,b.json --out mix.json --seed 0 [--counts 1000,500]
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
from data import (ANSWER_TYPES, IMAGE_PLACEHOLDER, MMHAL_TYPES, DataError, Skips, Template, Tokenizer,
                  TruncationError, get_field, image_file, load_captions, load_image, load_json, parse_each,
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
COCO_IMAGE = "coco/train2017/{image_id:012d}.jpg"


def _convert_each(path: str, items: list, convert_one, on_error: str, skips: Skips | None) -> list[dict]:
    return [rec for _, rec in parse_each(path, list(enumerate(items)), convert_one, on_error, skips)]


def _nonempty(rec: dict, key: str) -> str:
    v = get_field(rec, key, str)
    if not v.strip():
        raise DataError(f"field '{key}' is empty")
    return v.strip()


def convert_vqav2(questions: str, annotations: str, image_format: str = COCO_IMAGE, per_image: bool = False,
                  fmt: str = "sft", instruction: str = VQA_INSTRUCTION, on_error: str = "raise",
                  skips: Skips | None = None) -> list[dict]:
    """VQA-v2 -> short-answer conversations (the answer is multiple_choice_answer). per_image groups the
    questions about one image into one multi-turn conversation. fmt="ppo" writes PPO prompts (yes/no
    answers get answer_type yes_no)."""
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
        image = image_format.format(image_id=image_id)
        if fmt == "ppo":
            at = "yes_no" if answer.lower() in ("yes", "no") else "general"
            return {"id": f"vqav2_{qid}", "image": image, "question": f"{question}\n{instruction}",
                    "answer_type": at, "answer": answer.lower() if at == "yes_no" else answer}
        return {"id": f"vqav2_{qid}", "image": image, "image_id": image_id,
                "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}\n{instruction}"},
                                  {"from": "gpt", "value": answer}]}
    recs = _convert_each(questions, qdata["questions"], one, on_error, skips)
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


def convert_aokvqa(path: str, image_format: str = COCO_IMAGE, style: str = "letter_first", fmt: str = "sft",
                   on_error: str = "raise", skips: Skips | None = None) -> list[dict]:
    """A-OKVQA -> multiple choice (options lettered A-D) answered with the first rationale.
    style="letter_first": "B. choice\\nrationale"; "rationale_first" (chain of thought):
    "rationale So the correct option is B." fmt="ppo" writes PPO prompts with the correct letter and the
    item's own facts (the correct answer and the rationales)."""
    items = load_json(path)
    if not isinstance(items, list):
        raise DataError("expected a JSON list of A-OKVQA records", path=path)
    if style not in ("letter_first", "rationale_first"):
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
        letter = "ABCD"[k]
        options = "\n".join(f"{'ABCD'[i]}. {c.strip()}" for i, c in enumerate(choices))
        prompt = f"{question}\n{options}\n{MC_INSTRUCTION}"
        image = image_format.format(image_id=image_id)
        if fmt == "ppo":
            facts = [f"The answer is {choices[k].strip()}."] + rationales
            return {"id": f"aokvqa_{qid}", "image": image, "question": prompt, "answer_type": "multiple_choice",
                    "answer": letter, "facts": facts}
        if not rationales:
            raise DataError("no rationale to answer with")
        if style == "letter_first":
            answer = f"{letter}. {choices[k].strip()}\n{rationales[0]}"
        else:
            answer = f"{rationales[0]} So the correct option is {letter}."
        return {"id": f"aokvqa_{qid}", "image": image,
                "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
                                  {"from": "gpt", "value": answer}]}
    return _convert_each(path, items, one, on_error, skips)


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


# ----------------------------------------------------------------------------------------------------
# Checking a dataset

def detect_kind(path: str) -> str:
    for _, raw in read_records(path):
        if isinstance(raw, dict):
            if "output_1" in raw or "preference" in raw:
                return "preference"
            if "gt_answer" in raw and "question_type" in raw:
                return "mmhal"
            if "question" in raw or "answer_type" in raw or "facts" in raw:
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
    per_image: bool = False            # one multi-turn conversation per image
    format: str = "sft"                # sft (conversations) or ppo (prompts with answer types)
    image_format: str = COCO_IMAGE     # a record's image path, from its {image_id}
    skip: bool = False                 # skip (and count) bad records instead of stopping


@dataclass
class AOKVQAConfig:
    input: str = ""                    # aokvqa_v1p0_*.json (required)
    out: str = ""                      # the file to write (required); a .jsonl name writes JSONL
    style: str = "letter_first"        # letter_first ("B. choice\nrationale") or rationale_first
    format: str = "sft"                # sft (conversations) or ppo (prompts with the correct letter)
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
                         on_error="skip" if cfg.skip else "raise", skips=skips)
    return _wrote(recs, cfg.out, skips)


def run_aokvqa(cfg: AOKVQAConfig) -> int:
    _need(cfg, "input", "out")
    _one_of(cfg, "format", ("sft", "ppo"))
    skips = Skips()
    recs = convert_aokvqa(cfg.input, cfg.image_format, cfg.style, cfg.format,
                          on_error="skip" if cfg.skip else "raise", skips=skips)
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
    "check": (CheckConfig, run_check)}


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
