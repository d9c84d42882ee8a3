"""eval_llava_bench.py end to end against a scripted OpenAI-compatible judge on 127.0.0.1: the judge's
message built as LLaVA's review scripts build it (reimplemented here from their description), the
request, the official score parse, re-asking a reply that does not parse, the cache, and the summary
against a hand computation of summarize_gpt_review.py's numbers. The model is faked; the rules are our
own stand-in texts."""
from __future__ import annotations

import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import data
import eval_common
import eval_llava_bench
from eval_llava_bench import parse_scores

KEY = "sk-bench-SECRET-4d1e"
KEY_ENV = "EVAL_LLAVA_BENCH_TEST_KEY"
SYSTEM = "You check answers carefully."   # our stand-in for the official system sentence
RULES = {c: {"role": "Assistant", "prompt": f"Rate both assistants' {c} answers 1-10; first line: two scores."}
         for c in ("conv", "detail", "complex")}
RULES.update({"llava_bench_" + c: {"role": "Helper", "prompt": f"Wild {c}: two scores first."} for c in ("conv", "detail", "complex")})


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for v in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(KEY_ENV, KEY)


class JudgeServer:
    """plan: {question_id: [action, ...]} consumed in order, then the scripted scores. An action is an HTTP
    status (int) or a reply text (str). The question id is read from "qid-K" in the user message."""

    def __init__(self, scores: dict[int, tuple], plan: dict | None = None):
        self.scores, self.plan = scores, {k: list(v) for k, v in (plan or {}).items()}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                k = int(re.search(r"qid-(\d+)", body["messages"][-1]["content"]).group(1))
                with srv.lock:
                    srv.requests.append({"item": k, "body": body, "auth": self.headers.get("Authorization")})
                    queue = srv.plan.get(k)
                    action = queue.pop(0) if queue else None
                if isinstance(action, int):
                    payload, code = b'{"error": "scripted"}', action
                else:
                    ref, ours = srv.scores[k]
                    text = action if isinstance(action, str) else f"{ref:g} {ours:g}\nAssistant 1 is thorough; assistant 2 ..."
                    payload, code = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode(), 200
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def count(self, item: int | None = None) -> int:
        return sum(1 for r in self.requests if item is None or r["item"] == item)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made = []

    def make(scores, plan=None):
        made.append(JudgeServer(scores, plan))
        return made[-1]

    yield make
    for s in made:
        s.close()


def write_lines(path, rows) -> str:
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CATS = ["conv", "detail", "complex", "conv", "detail", "complex"]
SCORES = {0: (8, 7), 1: (9, 6), 2: (8, 9), 3: (7, 7), 4: (6, 6), 5: (10, 8.5)}


def bench_files(tmp_path, bench: str = "coco") -> dict:
    from PIL import Image
    imgs = tmp_path / "imgs"
    os.makedirs(imgs, exist_ok=True)
    for n in ("a.jpg", "b.jpg"):
        Image.new("RGB", (16, 9), (10, 200, 30)).save(imgs / n)
    qs = [{"question_id": k, "image": "a.jpg" if k < 3 else "b.jpg", "text": f"What about qid-{k}?",
           "category": CATS[k]} for k in range(6)]
    if bench == "coco":
        ctx = [{"id": "a", "image": "a.jpg", "captions": ["A dog on grass.", "A brown dog."],
                "instances": [{"category": "dog", "bbox": [0.1, 0.25, 0.5, 0.75]}, {"category": "ball", "bbox": [0.6, 0.6, 0.7, 0.7]}]},
               {"id": "b", "image": "b.jpg", "captions": ["Two cups."], "instances": [{"category": "cup", "bbox": [0.0, 0.0, 1.0, 0.5]}]}]
    else:
        ctx = [{"image": "a.jpg", "caption": "A dog on grass, detailed."}, {"image": "b.jpg", "caption": ["Two cups.", "On a table."]}]
    ref = [{"question_id": k, "text": f"Reference answer {k}.", "category": CATS[k]} for k in range(6)]
    rules = tmp_path / "rule.json"
    rules.write_text(json.dumps(RULES))
    return {"questions": write_lines(tmp_path / "q.jsonl", qs), "context": write_lines(tmp_path / "ctx.jsonl", ctx),
            "reference": write_lines(tmp_path / "ref.jsonl", ref), "rules": str(rules), "images": str(imgs),
            "qs": qs, "ctx": ctx, "ref": ref}


def official_content(f: dict, q: dict, answer: str, bench: str) -> str:
    """The judge's message as LLaVA's review scripts assemble it (described in eval_llava_bench's docstring)."""
    c = next(x for x in f["ctx"] if x["image"] == q["image"])
    if bench == "coco":
        context = "\n".join(c["captions"]) + "\n\n" + "\n".join(f"{i['category']}: {i['bbox']}" for i in c["instances"])
        rule = RULES[q["category"]]
    else:
        context = "\n".join(c["caption"]) if isinstance(c["caption"], list) else c["caption"]
        rule = RULES["llava_bench_" + q["category"]]
    ref = next(r["text"] for r in f["ref"] if r["question_id"] == q["question_id"])
    role = rule["role"]
    return (f"[Context]\n{context}\n\n[Question]\n{q['text']}\n\n[{role} 1]\n{ref}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{rule['prompt']}\n\n")


class FakeAnswerer:
    def __init__(self):
        self.calls = 0

    def __call__(self, records, paths):
        assert all(os.path.isfile(p) for p in paths)
        self.calls += 1
        return [f"Our answer to {r['question']}" for r in records]


def args_for(f: dict, tmp_path, srv, *extra) -> list[str]:
    return ["--questions", f["questions"], "--context", f["context"], "--reference", f["reference"],
            "--rules", f["rules"], "--image_folder", f["images"], "--out", str(tmp_path / "out" / "res.json"),
            "--api_base", srv.base, "--api_model", "judge-x", "--api_key_env", KEY_ENV, "--judge_system", SYSTEM,
            "--api_backoff", "0.01", "--api_timeout", "5", "--plot", "false", *extra]


def test_parse_scores_is_the_official_parse():
    assert parse_scores("8 7\nbecause ...") == (8.0, 7.0)
    assert parse_scores("8,7") == (8.0, 7.0)          # commas read as spaces
    assert parse_scores("9.5 10") == (9.5, 10.0)
    assert parse_scores("8, 7") is None               # "8  7": three parts on single spaces, as officially
    assert parse_scores("Assistant 1: 8") is None
    assert parse_scores("8 7 6") is None and parse_scores("") is None and parse_scores("eight seven") is None
    assert parse_scores("\n8 7") is None              # only the first line counts


def test_end_to_end_against_a_scripted_judge(tmp_path, servers, monkeypatch, capsys):
    f = bench_files(tmp_path)
    fake = FakeAnswerer()
    monkeypatch.setattr(eval_common, "build_answerer", lambda cfg: fake)
    # qid 2's first reply does not parse (asked again); qid 3 meets a 429 first; qid 4 never parses
    srv = servers(SCORES, {2: ["Assistant 1: 8, Assistant 2: 9"], 3: [429], 4: ["I rate them 6 and 6."] * 5})
    summary = eval_llava_bench.main(["--model_path", "m/sft", *args_for(f, tmp_path, srv)])

    assert srv.count(2) == 2 and srv.count(3) == 2 and srv.count(4) == 3 and srv.count(0) == 1
    for r in srv.requests:
        assert r["auth"] == f"Bearer {KEY}"
        body = r["body"]
        assert set(body) == {"model", "messages", "temperature", "max_tokens"}
        assert body["model"] == "judge-x" and body["temperature"] == 0.2 and body["max_tokens"] == 1024
        q = f["qs"][r["item"]]
        assert body["messages"] == [{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": official_content(f, q, f"Our answer to {q['text']}", "coco")}]

    # summarize_gpt_review.py by hand over the parsed pairs (qid 4 left out):
    #   all: reference (8+9+8+7+10)/5 = 8.4, ours (7+6+9+7+8.5)/5 = 7.5 -> 100*7.5/8.4 = 89.29 -> 89.3
    #   complex (8,9),(10,8.5): 9, 8.75 -> 97.2; conv (8,7),(7,7): 7.5, 7 -> 93.3; detail (9,6) -> 66.7
    want = {"all": {"relative": 89.3, "reference": 84.0, "ours": 75.0, "n": 5},
            "complex": {"relative": 97.2, "reference": 90.0, "ours": 87.5, "n": 2},
            "conv": {"relative": 93.3, "reference": 75.0, "ours": 70.0, "n": 2},
            "detail": {"relative": 66.7, "reference": 90.0, "ours": 60.0, "n": 1}}
    assert summary["categories"] == want and list(summary["categories"]) == ["all", "complex", "conv", "detail"]
    assert summary["unparsable"] == 1 and summary["unparsable_ids"] == [4]
    out = capsys.readouterr()
    assert "question_id 4" in out.err and "I rate them 6 and 6." in out.err
    assert "unparsable replies 1 (not scored: question_id 4)" in out.out

    doc = json.loads((tmp_path / "out" / "res.json").read_text())
    assert doc["benchmark"] == "llava_bench" and doc["summary"] == summary
    assert doc["settings"]["answer"]["model_path"] == "m/sft" and doc["settings"]["judge"]["system"] == SYSTEM
    answers = eval_common.read_answers(str(tmp_path / "out" / "res.answers.jsonl"))
    assert answers[0] == {"question_id": 0, "prompt": "What about qid-0?", "text": "Our answer to What about qid-0?",
                          "model_id": "sft"}

    # A rerun: answers and judgments reused, nothing sent, no model built.
    monkeypatch.setattr(eval_common, "build_answerer", lambda cfg: pytest.fail("model loaded again"))
    sent = srv.count()
    assert eval_llava_bench.main(args_for(f, tmp_path, srv)) == summary and srv.count() == sent
    assert "nothing sent" in capsys.readouterr().out
    # another judge temperature is another judgment: all asked again
    srv2 = servers(SCORES)
    eval_llava_bench.main(args_for(f, tmp_path, srv2, "--judge_temperature", "0", "--out", str(tmp_path / "t0" / "res.json"),
                                   "--answers", str(tmp_path / "out" / "res.answers.jsonl")))
    assert srv2.count() == 6 and all(r["body"]["temperature"] == 0.0 for r in srv2.requests)

    for dirpath, _, names in os.walk(tmp_path):
        for n in names:
            assert KEY.encode() not in open(os.path.join(dirpath, n), "rb").read(), n

    # compare with POPE-free results: the LLaVA-Bench columns
    table = eval_llava_bench.main(["compare", f"sft={tmp_path / 'out' / 'res.json'}"])
    assert "LB all" in table.splitlines()[0] and "89.30" in table.splitlines()[2]


def test_in_the_wild_context_and_rules(tmp_path, servers, monkeypatch):
    f = bench_files(tmp_path, "wild")
    monkeypatch.setattr(eval_common, "build_answerer", lambda cfg: FakeAnswerer())
    srv = servers(SCORES)
    summary = eval_llava_bench.main(["--model_path", "m", "--bench", "wild", *args_for(f, tmp_path, srv)])
    for r in srv.requests:
        q = f["qs"][r["item"]]
        assert r["body"]["messages"][1]["content"] == official_content(f, q, f"Our answer to {q['text']}", "wild")
    assert summary["unparsable"] == 0 and summary["categories"]["all"]["n"] == 6


def test_bad_input_is_named_before_the_model(tmp_path, monkeypatch):
    f = bench_files(tmp_path)
    monkeypatch.setattr(eval_common, "build_answerer", lambda cfg: pytest.fail("model loaded before the check"))
    base = ["--model_path", "m", "--image_folder", f["images"], "--out", str(tmp_path / "r.json"), "--judge", "none"]
    files = {k: f[k] for k in ("questions", "context", "reference", "rules")}

    def run(**over):
        argv = base + sum(([f"--{k}", v] for k, v in {**files, **over}.items()), [])
        return eval_llava_bench.main(argv)

    ctx = write_lines(tmp_path / "ctx1.jsonl", f["ctx"][:1])
    with pytest.raises(data.DataError, match=r"q.jsonl: line 4 \(question_id 3\): image 'b.jpg' has no record in .*ctx1.jsonl"):
        run(context=ctx)
    ref = write_lines(tmp_path / "ref5.jsonl", f["ref"][:5])
    with pytest.raises(data.DataError, match=r"line 6 \(question_id 5\): no reference answer"):
        run(reference=ref)
    rules = tmp_path / "rules_nodetail.json"
    rules.write_text(json.dumps({k: v for k, v in RULES.items() if k != "detail"}))
    with pytest.raises(data.DataError, match=r"line 2 \(question_id 1\): .*no rule 'detail'"):
        run(rules=str(rules))
    qs = write_lines(tmp_path / "q_bad.jsonl", f["qs"][:2] + [{"question_id": 2, "image": "a.jpg", "text": "x"}])
    with pytest.raises(data.DataError, match=r"q_bad.jsonl: line 3: 'category' should be str"):
        run(questions=qs)
    bad_ctx = write_lines(tmp_path / "ctx_bad.jsonl", [{"image": "a.jpg", "captions": "not a list", "instances": []}])
    with pytest.raises(data.DataError, match=r"ctx_bad.jsonl: line 1: 'captions' should be list"):
        run(context=bad_ctx)
    os.remove(os.path.join(f["images"], "b.jpg"))
    with pytest.raises(FileNotFoundError, match=r"q.jsonl: line 4: image 'b.jpg' not found"):
        run()
