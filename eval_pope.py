r"""POPE (object hallucination as yes/no questions): answer the three splits with a model, score the
answers exactly as the official summariser does. No judge: it is the cheap first comparison.

Questions, one JSON object per line (POPE's coco_pope_{random,popular,adversarial} files, over COCO val2014
images the user downloads; `tinyworld.py make` writes the tiny world's as DATA/eval/pope_*.jsonl):
    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}
Answers, one per line, as LLaVA's model_vqa.py writes them: {"question_id", "prompt", "text", "model_id"}.

    # the three splits: answers, scores per split and their mean, in OUT/
    python eval_pope.py run --model_path DIR --image_folder val2014 --out_dir OUT \
        --question_files random=coco_pope_random.jsonl,popular=coco_pope_popular.jsonl,adversarial=coco_pope_adversarial.jsonl
    # one file: answer (resumable), then score
    python eval_pope.py answer --model_path DIR --question_file Q.jsonl --image_folder IMGS --answers_file A.jsonl
    python eval_pope.py score --answers_file A.jsonl --question_file Q.jsonl     # prints and writes A.scores.json
    # several models (and the other benchmarks' result files) side by side
    python eval_pope.py compare sft=OUT_SFT/pope.json rlhf=OUT_RLHF/pope.json [--plot cmp.png]

Answering (eval_common): the image first, then the question followed by --instruction (default a newline
and "Answer the question using a single word or phrase.", the default of LLaVA-RLHF's model_vqa.py),
--conv_mode's system sentence, pad-to-square images, at most 64 new tokens (model_vqa.py's short_eval),
greedy unless --temperature > 0, --batch_size questions at a time; each batch is appended to the answers
file, so a killed run continues without answering anything twice.

Scoring, as the official summariser: the answer's text before its first ".", commas dropped, split on
single spaces; "no" when a word is exactly "No", "not" or "no", else "yes". Then with "yes" as the positive
class: accuracy, precision, recall, F1 and yes_ratio (the share of "yes" answers), n the number of
questions. Where the official script divides by zero (no "yes" answer, or no "yes" label) precision,
recall and F1 are 0 here. Answers and questions are matched by question_id (the official script pairs
them by line order); a missing, stray or duplicated id is an error naming it. The mean row is the plain
mean of each score over the splits (n: their sum), the paper's "overall".
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import common
import data
import eval_common

DEFAULT_INSTRUCTION = "\nAnswer the question using a single word or phrase."
SPLITS = ("random", "popular", "adversarial")
SCORE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")
NEGATIONS = ("No", "not", "no")   # the official summariser's words, case as it matches them


@dataclass
class PopeConfig(eval_common.AnswerConfig):
    question_file: str = ""            # answer / score: one question file
    answers_file: str = ""             # answer / score: its answers (JSON lines); default <question stem>.answers.jsonl
    question_files: str = ""           # run: SPLIT=PATH,... (e.g. random=...,popular=...,adversarial=...)
    out_dir: str = ""                  # run: <split>.answers.jsonl, pope.json, pope.summary.txt
    instruction: str = DEFAULT_INSTRUCTION  # appended to each question; "" for none (the tiny world's SFT has none)
    batch_size: int = 64
    max_new_tokens: int = 64           # model_vqa.py's short_eval bound
    plot: bool = True                  # run: per-split bars when matplotlib is installed


# ----------------------------------------------------------------------------------------------------
# Format

def read_questions(path: str) -> list[dict]:
    """A POPE question file: {"question_id", "image", "text", "label" yes|no} per line, ids unique. DataError
    naming the file and line for anything else (before any model is loaded)."""
    out = []
    for lineno, q in eval_common.read_jsonl(path):
        rec = {"question_id": eval_common.field_of(q, "question_id", (int, str), path, lineno),
               "image": eval_common.field_of(q, "image", str, path, lineno),
               "text": eval_common.field_of(q, "text", str, path, lineno),
               "label": eval_common.field_of(q, "label", str, path, lineno), "line": lineno}
        if rec["label"] not in ("yes", "no"):
            raise data.DataError(f"line {lineno}: label should be 'yes' or 'no', got {rec['label']!r}", path=path)
        out.append(rec)
    eval_common.check_unique_ids([(q["line"], q["question_id"]) for q in out], path)
    return out


def default_answers_file(question_file: str) -> str:
    return os.path.splitext(question_file)[0] + ".answers.jsonl"


# ----------------------------------------------------------------------------------------------------
# Scoring, exactly as the official summariser

def pope_answer(text: str) -> str:
    """"yes" or "no" for an answer's text: its first sentence (before the first "."), commas dropped, split
    on single spaces; "no" when any word is exactly "No", "not" or "no"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in NEGATIONS for w in words) else "yes"


def confusion(labels: list[str], preds: list[str]) -> dict[str, int]:
    """True/false positives/negatives with "yes" the positive class."""
    pairs = list(zip(labels, preds))
    return {"tp": sum(lab == "yes" and p == "yes" for lab, p in pairs), "fp": sum(lab == "no" and p == "yes" for lab, p in pairs),
            "tn": sum(lab == "no" and p == "no" for lab, p in pairs), "fn": sum(lab == "yes" and p == "no" for lab, p in pairs)}


def scores_of(c: dict[str, int]) -> dict:
    n = c["tp"] + c["fp"] + c["tn"] + c["fn"]
    precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
    recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
    return {"accuracy": (c["tp"] + c["tn"]) / n, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": (c["tp"] + c["fp"]) / n, "n": n}


def matched(questions: list[dict], answers: dict[Any, dict], answers_file: str, question_file: str) -> list[str]:
    """Each question's answer text, matched by question_id; an error naming the first missing or stray id."""
    ids = {q["question_id"] for q in questions}
    stray = [qid for qid in answers if qid not in ids]
    if stray:
        raise data.DataError(f"question_id {stray[0]!r} is not in {question_file}", path=answers_file)
    missing = [q for q in questions if q["question_id"] not in answers]
    if missing:
        raise data.DataError(f"no answer for question_id {missing[0]['question_id']!r} ({question_file} line "
                             f"{missing[0]['line']}; {len(missing)} of {len(questions)} missing)", path=answers_file)
    return [answers[q["question_id"]]["text"] for q in questions]


def score_answers(questions: list[dict], answers: dict[Any, dict], answers_file: str,
                  question_file: str) -> tuple[dict, dict[str, int]]:
    """-> (the six scores, the confusion counts)."""
    texts = matched(questions, answers, answers_file, question_file)
    c = confusion([q["label"] for q in questions], [pope_answer(t) for t in texts])
    return scores_of(c), c


def mean_scores(per_split: dict[str, dict]) -> dict:
    """The paper's overall: each score's mean over the splits; n their total."""
    k = len(per_split)
    mean = {key: sum(s[key] for s in per_split.values()) / k for key in SCORE_KEYS if key != "n"}
    return {**mean, "n": sum(s["n"] for s in per_split.values())}


def score_file(answers_file: str, question_file: str) -> dict:
    """`score`: the six scores of one answers file, written beside it as <stem>.scores.json."""
    scores, _ = score_answers(read_questions(question_file), eval_common.read_answers(answers_file),
                              answers_file, question_file)
    common.atomic_write_text(json.dumps(scores, indent=2) + "\n", os.path.splitext(answers_file)[0] + ".scores.json")
    return scores


def format_table(per_split: dict[str, dict], title: str) -> str:
    lines = [title, f"  {'split':<14}" + "".join(f"{k:>11}" for k in SCORE_KEYS)]
    for split, s in per_split.items():
        lines.append(f"  {split:<14}" + "".join(f"{100 * s[k]:>10.1f}%" for k in SCORE_KEYS if k != "n")
                     + f"{s['n']:>11}")
    return "\n".join(lines)


def plot_splits(per_split: dict[str, dict], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the POPE plot")
        return
    keys = [k for k in SCORE_KEYS if k != "n"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(per_split)
    for j, (split, s) in enumerate(per_split.items()):
        ax.bar([i + j * width for i in range(len(keys))], [100 * s[k] for k in keys], width, label=split)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    ax.set_xticklabels(keys)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Answering and the run over splits

def parse_question_files(spec: str) -> dict[str, str]:
    """"random=A,popular=B" -> {"random": "A", "popular": "B"} (split names as given, in order)."""
    out: dict[str, str] = {}
    for part in [p for p in spec.split(",") if p.strip()]:
        name, sep, path = part.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise common.ConfigError(f"--question_files: expected SPLIT=PATH,..., got {part!r}")
        if name.strip() in out:
            raise common.ConfigError(f"--question_files: split {name.strip()!r} given twice")
        out[name.strip()] = path.strip()
    if not out:
        raise common.ConfigError("--question_files: expected SPLIT=PATH,... (e.g. random=...,popular=...,adversarial=...)")
    return out


def answer_splits(cfg: PopeConfig, files: dict[str, tuple[str, str]]) -> dict[str, tuple[list[dict], dict, dict | None]]:
    """{split: (question file, answers file)} -> {split: (questions, answers, answer settings)}. Every
    question file is read and every image to be answered found before the model is loaded (once)."""
    questions = {split: read_questions(q) for split, (q, _) in files.items()}
    if cfg.model_path:
        eval_common.check_answer_config(cfg)
        for split, (q, a) in files.items():
            done = eval_common.read_answers(a)
            eval_common.find_images([x for x in questions[split] if x["question_id"] not in done], cfg.image_folder, q)
    built: list = []

    def build(c: eval_common.AnswerConfig) -> eval_common.Answerer:
        if not built:   # one model for all splits, loaded when the first answer is needed
            built.append(eval_common.build_answerer(c))
        return built[0]

    out = {}
    for split, (q, a) in files.items():
        answers, settings = eval_common.answer_jsonl(cfg, questions[split], a, q, cfg.instruction, build=build)
        out[split] = (questions[split], answers, settings)
    return out


def run(cfg: PopeConfig) -> dict:
    """`run`: answer and score every split, write OUT/pope.json (scores per split and their mean,
    confusion counts, the answer settings) and OUT/pope.summary.txt. -> {split: scores, "mean": scores}."""
    if not cfg.out_dir:
        raise common.ConfigError("run needs --out_dir")
    splits = parse_question_files(cfg.question_files)
    files = {s: (q, os.path.join(cfg.out_dir, f"{s}.answers.jsonl")) for s, q in splits.items()}
    answered = answer_splits(cfg, files)
    per_split, counts, settings = {}, {}, None
    for split, (questions, answers, s) in answered.items():
        per_split[split], counts[split] = score_answers(questions, answers, files[split][1], files[split][0])
        settings = settings or s
    scores = {**per_split, "mean": mean_scores(per_split)}
    title = f"POPE: {cfg.out_dir}" + (f" ({cfg.model_path})" if cfg.model_path else "")
    table = format_table(scores, title)
    print(table)
    doc = {"benchmark": "pope", "scores": scores, "counts": counts, "question_files": splits,
           "settings": {"answer": settings}, "config": asdict(cfg)}
    common.atomic_write_text(json.dumps(doc, indent=2) + "\n", os.path.join(cfg.out_dir, "pope.json"))
    common.atomic_write_text(table + "\n", os.path.join(cfg.out_dir, "pope.summary.txt"))
    if cfg.plot:
        plot_splits(scores, os.path.join(cfg.out_dir, "pope.png"), title)
    return scores


def evaluate_splits(model_path: str, question_files: dict[str, str], image_folder: str, out_dir: str,
                    batch_size: int = 64, **settings: Any) -> dict:
    """POPE from Python (the tiny pipeline): answer each split's questions with model_path, score them.
    -> {"random": {...}, "popular": {...}, "adversarial": {...}, "mean": {...}}, each with accuracy,
    precision, recall, f1, yes_ratio, n. `settings` are other PopeConfig fields (instruction, conv_mode,
    max_new_tokens, temperature, tokenizer_path, adapter_path, device, dtype, plot)."""
    spec = ",".join(f"{s}={p}" for s, p in question_files.items())
    cfg = PopeConfig(model_path=model_path, question_files=spec, image_folder=image_folder, out_dir=out_dir,
                     batch_size=batch_size, **settings)
    return run(cfg)


COMMANDS = ("answer", "score", "run", "compare")


def main(argv: list[str] | None = None) -> dict | str:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise common.ConfigError(f"usage: python eval_pope.py {{{'|'.join(COMMANDS)}}} [--key value ...] "
                                 "(--help after the command lists the keys)")
    cmd, rest = argv[0], argv[1:]
    if cmd == "compare":
        return eval_common.compare_cli(rest, "eval_pope.py")
    cfg = common.parse_config(PopeConfig, rest)
    if cmd == "run":
        common.print_config(cfg)
        return run(cfg)
    if not cfg.question_file:
        raise common.ConfigError(f"{cmd} needs --question_file")
    answers_file = cfg.answers_file or default_answers_file(cfg.question_file)
    if cmd == "answer":
        if not cfg.model_path:
            raise common.ConfigError("answer needs --model_path")
        answer_splits(cfg, {"answers": (cfg.question_file, answers_file)})
        print(f"answers in {answers_file}")
        return {"answers_file": answers_file}
    scores = score_file(answers_file, cfg.question_file)
    print(json.dumps(scores))
    return scores


if __name__ == "__main__":
    common.run_cli(main)
