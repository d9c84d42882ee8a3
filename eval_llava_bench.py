r"""LLaVA-Bench (COCO "qa90" and In-the-Wild): answer the questions with a model, have a text-only judge
compare each answer with text-only GPT-4's reference answer, and summarise as LLaVA's
summarize_gpt_review.py does: score = mean(ours) / mean(reference) x 100, per category and overall.

The user's files, as LLaVA publishes them (nothing of them is shipped here):
    --questions   JSON lines {"question_id", "image", "text", "category"} (conv | detail | complex)
    --context     JSON lines, one per image: COCO {"image", "captions": [...], "instances": [{"category",
                  "bbox"}]}; In-the-Wild {"image", "caption"} (a string or a list)
    --reference   JSON lines {"question_id", "text"}: text-only GPT-4's answers (assistant 1)
    --rules       LLaVA's rule.json: {key: {"role", "prompt"}}; the key is the category for --bench coco,
                  "llava_bench_" + category for --bench wild (as LLaVA's two review scripts look them up)

    export OPENAI_API_KEY=...
    python eval_llava_bench.py --bench coco --questions qa90_questions.jsonl --context caps_boxes_coco2014_val_80.jsonl \
        --reference qa90_gpt4_answer.jsonl --rules rule.json --model_path DIR --image_folder val2014 \
        --out results/rlhf_llava_bench.json --api_model gpt-4-0314 --judge_system "..."
    python eval_llava_bench.py ... --judge none            # answers only; judge later without --model_path
    python eval_llava_bench.py compare sft=results/sft_llava_bench.json rlhf=results/rlhf_llava_bench.json [--plot F.png]

Answering (eval_common): the question (plus --instruction, default none: LLaVA-RLHF's eval_llava_bench.sh
passes an empty --test-prompt), --conv_mode's system sentence, pad-to-square images, up to 1024 new
tokens (model_vqa.py's bound), greedy unless --temperature > 0; answers as JSON lines like model_vqa.py,
resumable.

Judging, as LLaVA's eval_gpt_review_visual.py (coco) and eval_gpt_review_bench.py (wild) build it: one
user message made of the context (the captions one per line, then for coco a blank line and one
"category: bbox" line per box), the question, the reference as "[ROLE 1]" and our answer as "[ROLE 2]",
each closed by "[End of ROLE N]", then "[System]" and the rule's prompt, ROLE the rule's role; sent through
the one OpenAI-compatible client (eval_common.APIJudge) with --judge_system as a system message (the
official scripts send a fixed one: pass its text for comparable numbers), temperature --judge_temperature
(theirs: 0.2) and max_tokens --judge_max_tokens (1024). The reply's first line, commas read as spaces,
must split on single spaces into exactly two numbers (reference, ours), as the official parse requires.
A reply that does not is asked again (--judge_rounds asks in all); one that never parses is not scored
(the official script would average in -1, -1): it is left out of the means, counted and named.

Summary, as summarize_gpt_review.py: per category and "all", the mean of the (reference, ours) pairs,
each rounded to 3 decimals; relative = round(100 x ours / reference, 1), reference and ours also on a
100 scale (round(10 x mean, 1)).

The tiny world has no LLaVA-Bench stand-in: the benchmark measures helpfulness relative to GPT-4's
answers as GPT-4 judges it; a rule judge of the tiny world would only re-measure the claim checking that
tinyworld.py eval (MMHal-style) already reports.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

import common
import data
import eval_common

BENCHES = ("coco", "wild")


@dataclass
class BenchConfig(eval_common.AnswerConfig):
    bench: str = "coco"                # coco (qa90: captions and boxes) | wild (In-the-Wild: a caption)
    questions: str = ""                # question file (JSON lines)
    context: str = ""                  # context file (JSON lines, one per image)
    reference: str = ""                # text-only GPT-4's answers (JSON lines)
    rules: str = ""                    # LLaVA's rule.json (the user's copy)
    out: str = "results/llava_bench.json"  # result file; answers, summary, cache beside it
    answers: str = ""                  # answers file; default <out stem>.answers.jsonl
    instruction: str = ""              # appended to each question
    batch_size: int = 8
    max_new_tokens: int = 1024
    judge: str = "api"                 # api | none (answers only)
    judge_cache: str = ""              # default: judge_cache.jsonl beside --out
    api_base: str = "https://api.openai.com/v1"
    api_model: str = "gpt-4-0314"      # the official reviews' model
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the variable holding the key; the key is never written anywhere
    api_timeout: float = 120.0
    api_max_tries: int = 6
    api_backoff: float = 2.0
    api_concurrency: int = 4
    judge_system: str = ""             # the judge's system message ("" sends none); the official scripts send one
    judge_temperature: float = 0.2     # the official review scripts'
    judge_max_tokens: int = 1024
    judge_rounds: int = 3              # asks per item while its reply does not parse
    plot: bool = True


# ----------------------------------------------------------------------------------------------------
# The user's files

def read_questions(path: str) -> list[dict]:
    out = []
    for lineno, q in eval_common.read_jsonl(path):
        out.append({"question_id": eval_common.field_of(q, "question_id", (int, str), path, lineno),
                    "image": eval_common.field_of(q, "image", str, path, lineno),
                    "text": eval_common.field_of(q, "text", str, path, lineno),
                    "category": eval_common.field_of(q, "category", str, path, lineno), "line": lineno})
    eval_common.check_unique_ids([(q["line"], q["question_id"]) for q in out], path)
    return out


def read_context(path: str, bench: str) -> dict[str, str]:
    """{image: the context text the judge sees}: coco, the captions one per line, a blank line, one
    "category: bbox" line per box; wild, the caption (a list: one per line)."""
    out: dict[str, str] = {}
    for lineno, c in eval_common.read_jsonl(path, "context"):
        image = eval_common.field_of(c, "image", str, path, lineno)
        if bench == "coco":
            caps = eval_common.field_of(c, "captions", list, path, lineno)
            boxes = eval_common.field_of(c, "instances", list, path, lineno)
            if not all(isinstance(x, str) for x in caps):
                raise data.DataError(f"line {lineno}: 'captions' should be a list of strings", path=path)
            if not all(isinstance(b, dict) and isinstance(b.get("category"), str) and isinstance(b.get("bbox"), list)
                       for b in boxes):
                raise data.DataError(f"line {lineno}: 'instances' should be a list of {{category, bbox}}", path=path)
            text = "\n".join(caps) + "\n\n" + "\n".join(f"{b['category']}: {b['bbox']}" for b in boxes)
        else:
            cap = eval_common.field_of(c, "caption", (str, list), path, lineno)
            if isinstance(cap, list) and not all(isinstance(x, str) for x in cap):
                raise data.DataError(f"line {lineno}: 'caption' should be a string or a list of strings", path=path)
            text = "\n".join(cap) if isinstance(cap, list) else cap
        out[image] = text   # a later record of an image wins, as the official dict does
    return out


def read_reference(path: str) -> dict[Any, str]:
    out: dict[Any, str] = {}
    rows = eval_common.read_jsonl(path, "reference answer")
    ids = []
    for lineno, r in rows:
        qid = eval_common.field_of(r, "question_id", (int, str), path, lineno)
        out[qid] = eval_common.field_of(r, "text", str, path, lineno)
        ids.append((lineno, qid))
    eval_common.check_unique_ids(ids, path)
    return out


def rule_key(bench: str, category: str) -> str:
    return category if bench == "coco" else "llava_bench_" + category


def read_rules(path: str) -> dict[str, dict]:
    rules = data.load_json(path)
    if not isinstance(rules, dict):
        raise data.DataError("expected an object {key: {role, prompt}} (LLaVA's rule.json)", path=path)
    return rules


def check_inputs(cfg: BenchConfig) -> tuple[list[dict], dict[str, str], dict[Any, str], dict[str, dict]]:
    """Every file read and cross-checked before any model is loaded: each question has its image's
    context, its reference answer and its category's rule."""
    if cfg.bench not in BENCHES:
        raise common.ConfigError(f"--bench: expected coco or wild, got {cfg.bench!r}")
    if cfg.judge not in ("api", "none"):
        raise common.ConfigError(f"--judge: expected api or none, got {cfg.judge!r}")
    for name in ("questions", "context", "reference", "rules"):
        if not getattr(cfg, name):
            raise common.ConfigError(f"--{name} is required (LLaVA's file, see the module docstring)")
    questions = read_questions(cfg.questions)
    context = read_context(cfg.context, cfg.bench)
    reference = read_reference(cfg.reference)
    rules = read_rules(cfg.rules)
    for q in questions:
        where = f"{cfg.questions}: line {q['line']} (question_id {q['question_id']!r})"
        if q["image"] not in context:
            raise data.DataError(f"{where}: image {q['image']!r} has no record in {cfg.context}")
        if q["question_id"] not in reference:
            raise data.DataError(f"{where}: no reference answer in {cfg.reference}")
        key = rule_key(cfg.bench, q["category"])
        rule = rules.get(key)
        if not (isinstance(rule, dict) and isinstance(rule.get("role"), str) and isinstance(rule.get("prompt"), str)):
            raise data.DataError(f"{where}: {cfg.rules} has no rule {key!r} with a string role and prompt")
    if cfg.judge == "api":
        eval_common.check_api_settings(cfg.api_base, cfg.api_timeout)
        if cfg.judge_rounds < 1 or cfg.judge_max_tokens < 1:
            raise common.ConfigError("--judge_rounds and --judge_max_tokens: expected at least 1")
    return questions, context, reference, rules


# ----------------------------------------------------------------------------------------------------
# The judgment

def judge_prompt(context: str, question: str, reference: str, answer: str, role: str, prompt: str) -> str:
    return (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
            f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{prompt}\n\n")


def parse_scores(reply: str) -> tuple[float, float] | None:
    """The official parse: the first line, commas as spaces, split on single spaces into exactly two
    numbers (reference, ours); None otherwise (the official script's -1, -1)."""
    parts = reply.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


def judge_id(cfg: BenchConfig) -> str:
    """The cache key's judge: the model and every request setting that changes the reply."""
    system = hashlib.sha256(cfg.judge_system.encode()).hexdigest()[:12] if cfg.judge_system else "none"
    return f"api:{cfg.api_model}:llava_bench:t{cfg.judge_temperature:g}:max{cfg.judge_max_tokens}:system-{system}"


def judge_settings(cfg: BenchConfig, rules_text: str) -> dict:
    return {"kind": cfg.judge, "model": cfg.api_model, "api_base": cfg.api_base, "bench": cfg.bench,
            "rules_file": cfg.rules, "rules_sha256": hashlib.sha256(rules_text.encode()).hexdigest(),
            "system": cfg.judge_system or None, "temperature": cfg.judge_temperature, "max_tokens": cfg.judge_max_tokens}


def summarize(items: list[dict]) -> dict:
    """summarize_gpt_review.py's numbers over the items whose reply parsed: per category (sorted, "all"
    among them) the mean (reference, ours) rounded to 3 decimals, relative = round(100 ours / reference, 1),
    reference and ours on a 100 scale. Unparsed items are counted and named, never scored."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for it in items:
        if it["scores"] is not None:
            groups.setdefault(it["category"], []).append(tuple(it["scores"]))
            groups.setdefault("all", []).append(tuple(it["scores"]))
    cats = {}
    for cat, pairs in sorted(groups.items()):
        ref, ours = [round(x, 3) for x in np.asarray(pairs).mean(0).tolist()]
        cats[cat] = {"relative": round(ours / ref * 100, 1) if ref else float("nan"), "reference": round(ref * 10, 1),
                     "ours": round(ours * 10, 1), "n": len(pairs)}
    bad = [it["question_id"] for it in items if it["scores"] is None]
    return {"categories": cats, "unparsable": len(bad), "unparsable_ids": bad}


def format_summary(summary: dict, title: str) -> str:
    lines = [title, f"  {'category':<12}{'relative':>10}{'reference':>11}{'ours':>8}{'n':>6}"]
    for cat, s in summary["categories"].items():
        lines.append(f"  {cat:<12}{s['relative']:>10.1f}{s['reference']:>11.1f}{s['ours']:>8.1f}{s['n']:>6}")
    bad = summary["unparsable_ids"]
    lines.append(f"  unparsable replies {summary['unparsable']}" + (f" (not scored: question_id {', '.join(map(str, bad))})" if bad else ""))
    return "\n".join(lines)


def plot_summary(summary: dict, path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the LLaVA-Bench plot")
        return
    cats = list(summary["categories"])
    fig, ax = plt.subplots(figsize=(1.5 + 1.0 * len(cats), 3.5))
    ax.bar(cats, [summary["categories"][c]["relative"] for c in cats], color="tab:green")
    ax.axhline(100, color="k", ls="--", lw=1)
    ax.set_ylabel("% of the reference's score")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# The run

def out_stem(out: str) -> str:
    return out[:-5] if out.endswith(".json") else out


def run(cfg: BenchConfig) -> dict | None:
    questions, context, reference, rules = check_inputs(cfg)
    answers_path = cfg.answers or out_stem(cfg.out) + ".answers.jsonl"
    answers, answer_settings = eval_common.answer_jsonl(cfg, questions, answers_path, cfg.questions, cfg.instruction)
    if cfg.judge == "none":
        print(f"answers for {len(answers)} questions in {answers_path}; no judge (--judge none)")
        return None
    prompts = []
    for q in questions:
        rule = rules[rule_key(cfg.bench, q["category"])]
        prompts.append(judge_prompt(context[q["image"]], q["text"], reference[q["question_id"]],
                                    answers[q["question_id"]]["text"], rule["role"], rule["prompt"]))
    jid = judge_id(cfg)

    def make_judge() -> eval_common.APIJudge:
        return eval_common.APIJudge(cfg.api_base, cfg.api_model, eval_common.api_key(cfg.api_key_env),
                                    timeout=cfg.api_timeout, max_tries=cfg.api_max_tries, backoff=cfg.api_backoff,
                                    concurrency=cfg.api_concurrency, max_tokens=cfg.judge_max_tokens,
                                    temperature=cfg.judge_temperature, system=cfg.judge_system or None)

    cache = cfg.judge_cache or os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "judge_cache.jsonl")
    replies = eval_common.cached_judgments(prompts, jid, cache, make_judge,
                                           accept=lambda r: parse_scores(r) is not None, rounds=cfg.judge_rounds)
    items = [{"question_id": q["question_id"], "category": q["category"], "image": q["image"], "question": q["text"],
              "answer": answers[q["question_id"]]["text"], "review": reply, "scores": parse_scores(reply)}
             for q, reply in zip(questions, replies)]
    summary = summarize(items)
    for it in items:
        if it["scores"] is None:
            print(f"warning: question_id {it['question_id']!r}: the judge's reply does not start with two scores "
                  f"after {cfg.judge_rounds} asks; not scored: {eval_common.excerpt(it['review'])!r}", file=sys.stderr)
    title = f"LLaVA-Bench ({cfg.bench}): {cfg.out} ({len(items)} questions, judge {jid})"
    table = format_summary(summary, title)
    print(table)
    with open(cfg.rules, encoding="utf-8") as f:
        rules_text = f.read()
    doc = {"benchmark": "llava_bench", "summary": summary,
           "settings": {"answer": answer_settings, "judge": judge_settings(cfg, rules_text)},
           "config": asdict(cfg), "items": items}
    common.atomic_write_text(json.dumps(doc, indent=2, ensure_ascii=False), cfg.out)
    common.atomic_write_text(table + "\n", out_stem(cfg.out) + ".summary.txt")
    if cfg.plot:
        plot_summary(summary, out_stem(cfg.out) + ".png", title)
    return summary


def main(argv: list[str] | None = None) -> dict | str | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return eval_common.compare_cli(argv[1:], "eval_llava_bench.py")
    if argv and argv[0] == "run":
        argv = argv[1:]
    cfg = common.parse_config(BenchConfig, argv)
    common.print_config(cfg)
    return run(cfg)


if __name__ == "__main__":
    common.run_cli(main)
