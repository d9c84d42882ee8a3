"""eval_mmhal.py: the benchmark's rating parse and scoring, the API judge against a scripted HTTP server
on 127.0.0.1 (retries, timeouts, malformed bodies, cache, key never written), and resume after an
interruption while answering and while judging. The model and the rule judge are faked, except one test
that answers through model.py/data.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval_mmhal  # noqa: E402
import model  # noqa: E402
from eval_mmhal import parse_rating, summarize  # noqa: E402

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "mmhal",
                        "response_template.json")
KEY = "sk-test-SECRET-key-8f3a1c"
KEY_ENV = "EVAL_MMHAL_TEST_KEY"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # urllib routes through http(s)_proxy when set; the scripted server is local.
    for v in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(KEY_ENV, KEY)


def make_items(n: int, answered: bool = True) -> list[dict]:
    """Items shaped like the benchmark's template; "item-K" in the question lets the server script per item."""
    types_ = data.MMHAL_TYPES
    return [{"question_type": types_[i % 8], "question_topic": "outdoor", "image_id": f"img{i:03d}",
             "image_src": f"https://example.com/photos/src_{i:03d}.jpg", "image_content": ["Dog", "Ball"] if i % 2 else ["Cat"],
             "question": f"What is in item-{i}?", "gt_answer": f"The human answer {i}.",
             "model_answer": f"The model answer {i}." if answered else ""} for i in range(n)]


def write_json(obj, path) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def expected_rating(k: int) -> int:
    return k % 7


# ----------------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server.

class ScriptedServer:
    """plan: {item: [action, ...]} consumed in order, then "ok". Actions: "ok", an HTTP status (int),
    "slow" (answers after 3 s, past the client's 1 s timeout), "malformed" (200 with an HTML body), "no_choices" (200, empty list),
    ("reply", text) (200, the judge's reply is text), "trickle_head" / "trickle_body" (a good reply whose first 12 bytes of
    the status line / of the body come one every 0.5 s: each read is quick, the reply takes 6 s)."""

    def __init__(self, plan: dict | None = None, delay: float = 0.05):
        self.plan = {k: list(v) for k, v in (plan or {}).items()}
        self.delay = delay
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.inflight = self.max_inflight = 0
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompt = body["messages"][0]["content"]
                k = int(re.search(r"item-(\d+)", prompt).group(1))
                auth = self.headers.get("Authorization", "")
                with srv.lock:
                    srv.requests.append({"path": self.path, "auth": auth, "item": k, "body": body})
                    queue = srv.plan.get(k)
                    action = queue.pop(0) if queue else "ok"
                    srv.inflight += 1
                    srv.max_inflight = max(srv.max_inflight, srv.inflight)
                try:
                    time.sleep(srv.delay)
                    if action == "slow":
                        time.sleep(3.0)
                    if isinstance(action, int):
                        # A real server might echo what it got; the judge must not repeat it anywhere.
                        self._send(action, json.dumps({"error": {"message": f"scripted {action}, got {auth}"}}).encode())
                    elif action == "malformed":
                        self._send(200, b"<html><body>502 Bad Gateway</body></html>")
                    elif action == "no_choices":
                        self._send(200, b'{"choices": []}')
                    elif isinstance(action, tuple):
                        self._send(200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": action[1]}}]}).encode())
                    elif action in ("trickle_head", "trickle_body"):
                        reply = f"Fine.\nRating: {expected_rating(k)}"
                        payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}).encode()
                        head = (f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
                        if action == "trickle_body":
                            self.wfile.write(head)
                        rest = payload if action == "trickle_body" else head + payload
                        for i in range(12):
                            self.wfile.write(rest[i:i + 1])
                            time.sleep(0.5)
                        self.wfile.write(rest[12:])
                    else:
                        reply = f"The answer mentions item {k}; no contradiction.\nRating: {expected_rating(k)}"
                        self._send(200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with srv.lock:
                        srv.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def count(self, item: int | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if item is None or r["item"] == item)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(plan=None, delay=0.05):
        s = ScriptedServer(plan, delay)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def api_args(tmp_path, template, server, *extra) -> list[str]:
    return ["--template", template, "--out", str(tmp_path / "out" / "res.json"), "--judge", "api",
            "--api_base", server.base, "--api_model", "judge-model", "--api_key_env", KEY_ENV,
            "--api_timeout", "1.0", "--api_max_tries", "5", "--api_backoff", "0.01", "--api_concurrency", "4",
            "--plot", "false", *extra]


def assert_key_nowhere(root, *texts) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert KEY.encode() not in f.read(), f"API key written to {name}"
    for t in texts:
        assert KEY not in t


# ----------------------------------------------------------------------------------------------------
# Rating parse and scoring.

def test_parse_rating():
    assert parse_rating("The answer is accurate and detailed.\nRating: 5") == 5
    assert parse_rating("explanation ... rating: 0") == 0
    assert parse_rating("Explanation. RATING: 4") == 4
    assert parse_rating("rAtInG: 6 because ...") == 6
    assert parse_rating("Rating: 3. To repeat, rating: 3.") == 3        # one distinct N
    assert parse_rating("Rating: 2 ... on reflection Rating: 5") == 0   # several: the benchmark gives 0
    assert parse_rating("I would give it a 5 out of 6.") == 0           # no match
    assert parse_rating("Rating:5") == 0                                # the benchmark needs the space
    assert parse_rating("Rating: 7") == 0                               # outside 0..6
    assert parse_rating("") == 0


def test_summarize_small_by_hand():
    recs = [{"question_type": "a", "rating": 6}, {"question_type": "a", "rating": 0},
            {"question_type": "b", "rating": 3}, {"question_type": "b", "rating": 2}]
    s = summarize(recs)
    assert s["average"] == pytest.approx(11 / 4)
    assert s["hallucination_rate"] == pytest.approx(2 / 4)   # 0 and 2 are below 3; 3 is not
    assert s["per_type"] == {"a": pytest.approx(3.0), "b": pytest.approx(2.5)}
    with pytest.raises(ValueError):
        summarize([{"rating": 7}])


def test_summarize_on_shared_template():
    if not os.path.exists(TEMPLATE):
        pytest.skip("shared MMHal template not present")
    with open(TEMPLATE) as f:
        items = json.load(f)
    assert len(items) == 96
    ratings = [(5 * i + i // 8) % 7 for i in range(96)]  # every value 0..6 appears, types differ
    recs = [{**r, "rating": s} for r, s in zip(items, ratings)]
    s = summarize(recs)
    # Direct computation, as the benchmark's script does it: type = index mod 8 in file order.
    assert s["average"] == pytest.approx(sum(ratings) / 96)
    assert s["hallucination_rate"] == pytest.approx(sum(1 for x in ratings if x < 3) / 96)
    official = ["attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other"]
    assert list(s["per_type"]) == official
    for t, name in enumerate(official):
        col = ratings[t::8]
        assert len(col) == 12
        assert s["per_type"][name] == pytest.approx(sum(col) / 12)
    # Without question_type the position decides the type: same numbers on the official file.
    bare = [{k: v for k, v in r.items() if k != "question_type"} for r in recs]
    assert summarize(bare)["per_type"] == s["per_type"]


# ----------------------------------------------------------------------------------------------------
# The API judge.

def test_api_judge_scripted_server_and_cache(tmp_path, server_factory, capsys):
    template = write_json(make_items(8), tmp_path / "tpl.json")
    plan = {1: [429], 2: [500], 3: ["slow"], 4: ["malformed"], 5: [429, 503, "no_choices"]}
    srv = server_factory(plan)
    t0 = time.time()
    summary = eval_mmhal.main(api_args(tmp_path, template, srv))
    assert time.time() - t0 < 20

    with open(tmp_path / "out" / "res.json") as f:
        doc = json.load(f)
    items = doc["items"]
    assert [r["rating"] for r in items] == [expected_rating(k) for k in range(8)]
    assert all(r["judge_reply"].endswith(f"Rating: {expected_rating(k)}") for k, r in enumerate(items))
    assert all(r["model_answer"] == f"The model answer {k}." for k, r in enumerate(items))
    assert summary == doc["summary"] == summarize(items)
    # Retries: each scripted failure cost one more request, then the item succeeded.
    assert [srv.count(k) for k in range(8)] == [1, 2, 2, 2, 2, 4, 1, 1]
    assert srv.max_inflight >= 2  # several requests in flight
    for r in srv.requests:
        assert r["path"] == "/v1/chat/completions"
        assert r["auth"] == f"Bearer {KEY}"
        assert r["body"]["model"] == "judge-model" and r["body"]["temperature"] == 0
    # The judge saw the benchmark's four fields, image contents joined by ", ".
    prompt = next(r["body"]["messages"][0]["content"] for r in srv.requests if r["item"] == 1)
    assert "Dog, Ball" in prompt and "What is in item-1?" in prompt
    assert "The human answer 1." in prompt and "The model answer 1." in prompt

    # A rerun is served from the cache: nothing is sent.
    sent = srv.count()
    again = eval_mmhal.main(api_args(tmp_path, template, srv))
    assert srv.count() == sent
    assert again == summary
    out = capsys.readouterr()
    assert "nothing sent" in out.out
    assert os.path.exists(tmp_path / "out" / "judge_cache.jsonl")
    assert os.path.exists(tmp_path / "out" / "res.summary.txt")
    assert_key_nowhere(tmp_path, out.out, out.err)


def test_api_judge_malformed_forever_raises_and_scores_nothing(tmp_path, server_factory, capsys):
    # Decision: a body that never parses is retried, then the run stops with a clear error; it is never
    # scored 0 (that would count an outage as a hallucination). The other judgments stay cached.
    template = write_json(make_items(8), tmp_path / "tpl.json")
    srv = server_factory({2: ["malformed"] * 10})
    with pytest.raises(eval_mmhal.JudgeError, match=r"item 2: .*malformed body"):
        eval_mmhal.main(api_args(tmp_path, template, srv, "--api_max_tries", "3"))
    assert srv.count(2) == 3
    assert not os.path.exists(tmp_path / "out" / "res.json")
    out = capsys.readouterr()
    assert_key_nowhere(tmp_path, out.out, out.err)


def test_api_judge_client_error_fails_fast_and_redacts_key(tmp_path, server_factory, capsys):
    template = write_json(make_items(2), tmp_path / "tpl.json")
    srv = server_factory({0: [401]})
    with pytest.raises(eval_mmhal.JudgeError, match="HTTP 401") as exc:
        eval_mmhal.main(api_args(tmp_path, template, srv, "--api_concurrency", "1"))
    assert srv.count(0) == 1           # a bad key is not retried
    assert KEY not in str(exc.value)   # the server echoed the header; the error does not
    out = capsys.readouterr()
    assert_key_nowhere(tmp_path, out.out, out.err)


def test_api_judge_needs_key_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    template = write_json(make_items(2), tmp_path / "tpl.json")
    with pytest.raises(eval_mmhal.common.ConfigError, match=KEY_ENV):
        eval_mmhal.main(["--template", template, "--out", str(tmp_path / "r.json"), "--judge", "api",
                         "--api_base", "http://127.0.0.1:9/v1", "--api_key_env", KEY_ENV])


@pytest.mark.parametrize("where", ["trickle_head", "trickle_body"])
def test_api_timeout_is_a_deadline_for_the_whole_request(tmp_path, server_factory, where):
    # Each byte comes well within the 1 s timeout, the reply as a whole takes 6 s: a per-read timeout
    # never fires, the deadline does; the retry policy then treats it as any timeout.
    template = write_json(make_items(1), tmp_path / "tpl.json")
    srv = server_factory({0: [where]})
    t0 = time.monotonic()
    with pytest.raises(eval_mmhal.JudgeError, match=r"item 0: .*failed after 1 tries.*within --api_timeout 1 s"):
        eval_mmhal.main(api_args(tmp_path, template, srv, "--api_max_tries", "1"))
    assert time.monotonic() - t0 < 3
    assert srv.count(0) == 1

    srv2 = server_factory({0: [where]})   # with a second try the item gets its judgment
    t0 = time.monotonic()
    summary = eval_mmhal.main(api_args(tmp_path, template, srv2, "--api_max_tries", "2"))
    assert time.monotonic() - t0 < 4
    assert srv2.count(0) == 2 and summary["average"] == expected_rating(0)


def test_unparsable_ratings_are_counted_and_named(tmp_path, server_factory, capsys):
    # The benchmark scores a reply with no rating or several as 0; so do we, but never silently.
    template = write_json(make_items(4), tmp_path / "tpl.json")
    rambling = "The answer looks fine. " * 20 + "I would say five out of six."
    srv = server_factory({1: [("reply", rambling)], 3: [("reply", "Rating: 2 at first; on reflection Rating: 5")]})
    summary = eval_mmhal.main(api_args(tmp_path, template, srv))
    with open(tmp_path / "out" / "res.json") as f:
        doc = json.load(f)
    assert [r["rating"] for r in doc["items"]] == [0, 0, 2, 0]   # item 0's "Rating: 0" is a real rating
    assert summary["unparsable_ratings"] == 2 and summary["unparsable_items"] == [1, 3]
    assert doc["summary"] == summary == summarize(doc["items"])
    out = capsys.readouterr()
    assert "warning: 2 of 4 judge replies" in out.err
    item1 = next(line for line in out.err.splitlines() if "item 1 " in line)
    assert "image_id 'img001'" in item1 and "no rating" in item1
    assert "The answer looks fine." in item1 and "five out of six." in item1 and " ... " in item1   # start and end
    item3 = next(line for line in out.err.splitlines() if "item 3 " in line)
    assert "2 ratings (2, 5)" in item3 and "on reflection Rating: 5" in item3
    assert "item 0 " not in out.err and "item 2 " not in out.err
    shown = "unparsable ratings    2 (scored 0: items 1, 3)"
    assert shown in out.out
    assert shown in (tmp_path / "out" / "res.summary.txt").read_text()

    # Every reply parsed: the count is 0 and there is no warning.
    summary = eval_mmhal.main(api_args(tmp_path / "clean", template, server_factory()))
    assert summary["unparsable_ratings"] == 0 and summary["unparsable_items"] == []
    out = capsys.readouterr()
    assert "warning" not in out.err and "unparsable ratings    0\n" in out.out


def test_resume_after_interrupted_judging(tmp_path, server_factory, capsys):
    template = write_json(make_items(12), tmp_path / "tpl.json")
    srv = server_factory({5: [500] * 10})   # item 5's server keeps failing: the run stops
    with pytest.raises(eval_mmhal.JudgeError, match="item 5"):
        eval_mmhal.main(api_args(tmp_path, template, srv, "--api_max_tries", "2"))
    cache = eval_mmhal.JudgeCache(str(tmp_path / "out" / "judge_cache.jsonl"))
    cached = len(cache.entries)
    assert 1 <= cached <= 11 and not os.path.exists(tmp_path / "out" / "res.json")

    srv2 = server_factory()  # the server is healthy again
    summary = eval_mmhal.main(api_args(tmp_path, template, srv2))
    assert srv2.count() == 12 - cached          # only the missing judgments are asked for
    assert srv2.count(5) == 1
    with open(tmp_path / "out" / "res.json") as f:
        doc = json.load(f)
    assert [r["rating"] for r in doc["items"]] == [expected_rating(k) for k in range(12)]
    assert summary["average"] == pytest.approx(sum(expected_rating(k) for k in range(12)) / 12)
    out = capsys.readouterr()
    assert_key_nowhere(tmp_path, out.out, out.err)


def test_cache_survives_a_torn_line(tmp_path):
    path = str(tmp_path / "c.jsonl")
    c = eval_mmhal.JudgeCache(path)
    k1 = eval_mmhal.JudgeCache.key("api:m", "p1")
    c.put(k1, "api:m", "Rating: 4")
    with open(path, "a") as f:
        f.write('{"key": "abc", "jud')  # a crash mid-write
    c2 = eval_mmhal.JudgeCache(path)
    assert c2.get(k1) == "Rating: 4"
    k2 = eval_mmhal.JudgeCache.key("api:m", "p2")
    c2.put(k2, "api:m", "Rating: 1")
    c3 = eval_mmhal.JudgeCache(path)
    assert c3.get(k1) == "Rating: 4" and c3.get(k2) == "Rating: 1"
    # The judge model is part of the key.
    assert eval_mmhal.JudgeCache.key("api:other", "p1") != k1


# ----------------------------------------------------------------------------------------------------
# Judge prompt.

def test_judge_prompt_default_named_slots_and_braces(tmp_path):
    rec = {"image_content": ["Fire hydrant", "Car"], "question": "Q?", "gt_answer": "GT.", "model_answer": "A {gt_answer} {}"}
    default = eval_mmhal.fill_prompt(eval_mmhal.load_judge_prompt(""), rec)
    assert "Fire hydrant, Car" in default and "Q?" in default and "GT." in default
    assert "A {gt_answer} {}" in default  # braces inside an answer are left alone
    assert "rating" in default.lower()

    named = tmp_path / "named.txt"
    named.write_text("{response} | {gt_answer} {{x}} | {question} | {image_content}")
    assert eval_mmhal.fill_prompt(eval_mmhal.load_judge_prompt(str(named)), rec) == \
        "A {gt_answer} {} | GT. {{x}} | Q? | Fire hydrant, Car"   # the project's other braces are literal

    # Four bare {} are the official template's slots: the project protocol refuses them and says which flag fills them.
    positional = tmp_path / "positional.txt"
    positional.write_text("Contents: {}\nQuestion: {}\nStandard answer: {}\nResponse: {}\nRate it.")
    with pytest.raises(eval_mmhal.common.ConfigError, match="pass --judge_protocol official"):
        eval_mmhal.load_judge_prompt(str(positional))
    text = eval_mmhal.fill_prompt(eval_mmhal.load_judge_prompt(str(positional), "official"), rec, "official")
    assert text == "Contents: Fire hydrant, Car\nQuestion: Q?\nStandard answer: GT.\nResponse: A {gt_answer} {}\nRate it."

    bad = tmp_path / "bad.txt"
    bad.write_text("only {question} {response}")
    with pytest.raises(eval_mmhal.common.ConfigError, match="four named slots"):
        eval_mmhal.load_judge_prompt(str(bad))


# ----------------------------------------------------------------------------------------------------
# Answering: images, resume, missing image.

def make_images(folder, items) -> None:
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i, r in enumerate(items):
        # Half the images are named by image_id, half by the file name of image_src.
        name = f"{r['image_id']}.png" if i % 2 == 0 else os.path.basename(r["image_src"])
        Image.new("RGB", (12, 8), (i * 20 % 256, 40, 90)).save(os.path.join(folder, name), format="PNG")


def test_find_image_variants(tmp_path):
    items = make_items(4, answered=False)
    make_images(tmp_path / "imgs", items)
    folder = str(tmp_path / "imgs")
    assert eval_mmhal.find_image(items[0], 0, folder).endswith("img000.png")
    assert eval_mmhal.find_image(items[1], 1, folder).endswith("src_001.jpg")
    given = {**items[2], "image_path": "img002.png"}
    assert eval_mmhal.find_image(given, 2, "", base_dir=folder) == os.path.join(folder, "img002.png")
    with pytest.raises(FileNotFoundError, match="img003"):
        eval_mmhal.find_image({**items[3], "image_src": "https://x/y/none.jpg"}, 3, folder)


class FakeAnswerer:
    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[list[int]] = []
        self.fail_on_call = fail_on_call

    def __call__(self, records, paths):
        assert all(os.path.isfile(p) for p in paths)
        self.calls.append([int(r["image_id"][3:]) for r in records])
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt  # the run is killed mid-way
        # Item 7 gets an empty answer: it must count as answered on resume all the same.
        return ["" if r["image_id"] == "img007" else f"answer to {r['question']}" for r in records]


def fake_rule_judge(record: dict, answer: str) -> tuple[str, int]:
    """Stands in for tinyworld.rule_judge: what --judge rule is given."""
    n = 0 if not answer else len(answer) % 7
    return f"scene says {record['scene']}. Rating: {n}", n


def test_resume_after_interrupted_answering(tmp_path, monkeypatch):
    items = [{**r, "scene": f"scene {i}"} for i, r in enumerate(make_items(10, answered=False))]
    template = write_json(items, tmp_path / "tpl.json")
    make_images(tmp_path / "imgs", items)
    args = ["--template", template, "--out", str(tmp_path / "out" / "res.json"), "--model_path", "some/model",
            "--image_folder", str(tmp_path / "imgs"), "--batch_size", "3", "--judge", "none"]

    first = FakeAnswerer(fail_on_call=3)
    monkeypatch.setattr(eval_mmhal, "build_answerer", lambda cfg: first)
    with pytest.raises(KeyboardInterrupt):
        eval_mmhal.main(args)
    answers_path = tmp_path / "out" / "res.answers.json"
    with open(answers_path) as f:
        partial = json.load(f)
    with open(str(answers_path) + ".meta.json") as f:
        partial_meta = json.load(f)
    assert partial_meta["answered"] == list(range(6))
    assert [bool(r["model_answer"]) for r in partial] == [True] * 6 + [False] * 4  # two batches written

    second = FakeAnswerer()
    monkeypatch.setattr(eval_mmhal, "build_answerer", lambda cfg: second)
    assert eval_mmhal.main(args) is None
    assert second.calls == [[6, 7, 8], [9]]   # only what was missing
    with open(answers_path) as f:
        done = json.load(f)
    expected = ["" if i == 7 else f"answer to What is in item-{i}?" for i in range(10)]
    assert [r["model_answer"] for r in done] == expected
    assert [r["question"] for r in done] == [r["question"] for r in items]  # the template's format, in order

    # Complete: no model is built again (even for item 7's empty answer); judge with the rule judge.
    monkeypatch.setattr(eval_mmhal, "build_answerer", lambda cfg: pytest.fail("model loaded again"))
    rule_args = [a if a != "none" else "rule" for a in args]
    summary = eval_mmhal.main(rule_args, rule_judge=fake_rule_judge)
    ratings = [0 if not a else len(a) % 7 for a in expected]
    assert summary["average"] == pytest.approx(sum(ratings) / 10)
    with open(tmp_path / "out" / "res.json") as f:
        doc = json.load(f)
    assert [r["rating"] for r in doc["items"]] == ratings
    assert doc["items"][3]["judge_reply"].startswith("scene says scene 3")

    # Another model may not continue this answers file.
    write_json(partial, answers_path)
    write_json(partial_meta, str(answers_path) + ".meta.json")
    monkeypatch.setattr(eval_mmhal, "build_answerer", lambda cfg: FakeAnswerer())
    with pytest.raises(eval_mmhal.common.ConfigError, match="started with model_path 'some/model', this run has 'other/model'"):
        eval_mmhal.main([a if a != "some/model" else "other/model" for a in args])


def test_missing_image_is_named_before_loading_the_model(tmp_path, monkeypatch):
    items = make_items(4, answered=False)
    make_images(tmp_path / "imgs", items[:3])
    template = write_json(items, tmp_path / "tpl.json")
    monkeypatch.setattr(eval_mmhal, "build_answerer", lambda cfg: pytest.fail("model loaded before the image check"))
    with pytest.raises(FileNotFoundError, match=r"item 3 .*img003.*src_003\.jpg"):
        eval_mmhal.main(["--template", template, "--out", str(tmp_path / "r.json"), "--model_path", "m",
                         "--image_folder", str(tmp_path / "imgs"), "--judge", "none"])


def test_judge_only_needs_answers(tmp_path):
    template = write_json(make_items(3, answered=False), tmp_path / "tpl.json")
    with pytest.raises(eval_mmhal.common.ConfigError, match="--model_path"):
        eval_mmhal.main(["--template", template, "--out", str(tmp_path / "r.json"), "--judge", "rule"],
                        rule_judge=fake_rule_judge)
    with pytest.raises(eval_mmhal.common.ConfigError, match="unknown config key"):
        eval_mmhal.main(["--template", template, "--no_such_key", "1"])


def test_rule_judge_mismatch_is_loud(tmp_path):
    template = write_json([{**r, "scene": "s"} for r in make_items(2)], tmp_path / "tpl.json")
    with pytest.raises(RuntimeError, match="rated 5"):
        eval_mmhal.main(["--template", template, "--out", str(tmp_path / "r.json"), "--judge", "rule"],
                        rule_judge=lambda rec, a: ("Rating: 2", 5))


def test_rule_judge_is_passed_in_not_imported(tmp_path, monkeypatch):
    # --judge rule without a judge function fails before any model is loaded, and names the command that has one
    items = [{**r, "scene": "s"} for r in make_items(2, answered=False)]
    template = write_json(items, tmp_path / "tpl.json")
    make_images(tmp_path / "imgs", items)
    monkeypatch.setattr(eval_mmhal, "build_answerer", lambda cfg: pytest.fail("model loaded before the judge check"))
    with pytest.raises(eval_mmhal.common.ConfigError, match="tinyworld.py eval"):
        eval_mmhal.main(["--template", template, "--out", str(tmp_path / "r.json"), "--judge", "rule",
                         "--model_path", "m", "--image_folder", str(tmp_path / "imgs")])
    # no import cycle: eval_mmhal does not import the tiny world (a fresh interpreter, so no test's import counts)
    code = "import sys, eval_mmhal; assert 'tinyworld' not in sys.modules, 'eval_mmhal imported tinyworld'"
    subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   check=True, capture_output=True)


# ----------------------------------------------------------------------------------------------------
# Output: comparison table and plot.

def test_compare_and_plot(tmp_path, capsys):
    outs = []
    for name, n in (("sft", 8), ("rlhf", 16)):
        items = [{**r, "scene": "s", "model_answer": "x" * (k + 1 + (n == 16))} for k, r in enumerate(make_items(n))]
        template = write_json(items, tmp_path / f"{name}_tpl.json")
        out = str(tmp_path / f"{name}.json")
        eval_mmhal.main(["--template", template, "--out", out, "--judge", "rule", "--plot", "true"],
                        rule_judge=fake_rule_judge)
        outs.append(out)
    png = tmp_path / "sft.per_type.png"
    assert png.exists()     # pillow, with or without matplotlib
    capsys.readouterr()
    # The answers came in the template, not from a run of ours: how they were made is unknown (compare's
    # refusal is tested in test_mmhal_official.py); compared anyway, with a warning per file.
    table = eval_mmhal.main(["compare", *outs, "--allow_mismatch"])
    printed = capsys.readouterr()
    assert table in printed.out
    assert all(f"warning: compare: {out} records no answer settings" in printed.err for out in outs)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["result", "avg", "halluc", "attribute"]
    for name, out in zip(("sft", "rlhf"), outs):
        with open(out) as f:
            s = json.load(f)["summary"]
        row = next(line for line in lines if line.startswith(name + " "))
        assert f"{s['average']:.2f}" in row and f"{s['hallucination_rate']:.2f}" in row


# ----------------------------------------------------------------------------------------------------
# The local judge (model and data faked: a judge "model" that reads the prompt back and rates it).

class ReversibleTokenizer:
    bos_id, eos_id, pad_id = 1, 2, 0
    decode_response = data.Tokenizer.decode_response   # the real one: cut at EOS, over this decode

    def encode(self, text: str) -> list[int]:
        return [ord(c) + 3 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 3) for i in ids if i > 2)


class FakeJudgeModel:
    num_image_tokens = 4

    def __init__(self, tok):
        self.tok, self.batches = tok, []

    def generate(self, input_ids, images, attention_mask=None, max_new_tokens=64, temperature=0.0, eos_token_id=2, **kw):
        import torch
        assert images is None and temperature == 0.0
        self.batches.append(input_ids.shape[0])
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tok.decode([i for i, m in zip(ids, mask) if m])
            k = int(re.search(r"item-(\d+)", prompt).group(1))
            rows.append(self.tok.encode(f"Fine. Rating: {expected_rating(k)}") + [eos_token_id])
        width = max(map(len, rows))
        return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def test_local_judge_batches_and_caches(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(data, "tokenize_prompt",
                        lambda q, tok, tpl, n, has_image=True: [tok.bos_id] + tok.encode(f"{tpl} USER: {q} ASSISTANT:"))
    monkeypatch.setattr(data, "left_pad", lambda seqs, pad: (
        torch.tensor([[pad] * (max(map(len, seqs)) - len(s)) + s for s in seqs]),
        torch.tensor([[0] * (max(map(len, seqs)) - len(s)) + [1] * len(s) for s in seqs])))
    tok = ReversibleTokenizer()
    built = []

    def build_judge(cfg):
        m = FakeJudgeModel(tok)
        built.append(m)
        return eval_mmhal.LocalJudge(m, tok, "SYSTEM", cfg.judge_batch_size, cfg.judge_max_new_tokens, torch.device("cpu"))

    monkeypatch.setattr(eval_mmhal, "build_judge", build_judge)
    template = write_json(make_items(7), tmp_path / "tpl.json")
    args = ["--template", template, "--out", str(tmp_path / "r.json"), "--judge", "local",
            "--judge_model_path", str(tmp_path / "judge"), "--judge_batch_size", "3"]
    summary = eval_mmhal.main(args)
    assert built[0].batches == [3, 3, 1]
    with open(tmp_path / "r.json") as f:
        doc = json.load(f)
    assert [r["rating"] for r in doc["items"]] == [expected_rating(k) for k in range(7)]
    assert doc["judge"].startswith("local:")
    assert eval_mmhal.main(args) == summary and len(built) == 1  # rerun: all cached, no model loaded


# ----------------------------------------------------------------------------------------------------
# The real answering path through model.py and data.py.

class CharTokenizer:
    """Enough of data.Tokenizer for a random tiny model: one id per character."""
    bos_id, eos_id, pad_id = 1, 2, 0
    decode_response = data.Tokenizer.decode_response

    def encode(self, text: str) -> list[int]:
        return [3 + ord(c) % 200 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + (i % 26)) for i in ids if i > 2)


def test_real_answering_path_through_model(tmp_path, monkeypatch):
    import torch
    torch.manual_seed(0)
    cfg = model.ModelConfig.preset("tiny", image_size=32, patch_size=16, vision_layers=1, layers=2, vocab_size=256)
    m = model.LLaVA(cfg).eval()
    ckpt = str(tmp_path / "ckpt")
    m.save_pretrained(ckpt)

    def make_answerer(c):  # the real loader and answerer; only the tokenizer is a stand-in
        loaded = model.LLaVA.from_pretrained(c.model_path).eval()
        return eval_mmhal.ModelAnswerer(loaded, CharTokenizer(), data.Template(system=data.VICUNA_V1_SYSTEM),
                                        c.max_new_tokens, torch.device("cpu"))

    items = [{**r, "scene": "s"} for r in make_items(5, answered=False)]
    template = write_json(items, tmp_path / "tpl.json")
    make_images(tmp_path / "imgs", items)
    monkeypatch.setattr(eval_mmhal, "build_answerer", make_answerer)
    args = ["--template", template, "--out", str(tmp_path / "res.json"), "--model_path", ckpt,
            "--image_folder", str(tmp_path / "imgs"), "--batch_size", "2", "--max_new_tokens", "6", "--judge", "rule"]
    eval_mmhal.main(args, rule_judge=fake_rule_judge)
    with open(tmp_path / "res.json") as f:
        doc = json.load(f)
    answers = [r["model_answer"] for r in doc["items"]]
    assert len(answers) == 5 and all(isinstance(a, str) and len(a) <= 6 for a in answers)
    # Greedy: answering again one at a time gives the same text (left padding does not change answers).
    os.remove(tmp_path / "res.answers.json")
    os.remove(tmp_path / "res.answers.json.meta.json")
    eval_mmhal.main([a if a != "2" else "1" for a in args], rule_judge=fake_rule_judge)
    with open(tmp_path / "res.json") as f:
        assert [r["model_answer"] for r in json.load(f)["items"]] == answers


# ----------------------------------------------------------------------------------------------------
# User errors: one line naming the flag or file, exit code 2, no traceback.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_user_errors_are_one_line(tmp_path):
    items = make_items(2, answered=False)
    template = write_json(items, tmp_path / "tpl.json")
    make_images(tmp_path / "imgs", items)
    cases = [(["--some_bad_flag", "1"], "--some_bad_flag"),
             (["--template", str(tmp_path / "nope.json"), "--judge", "none"], "nope.json"),
             (["--template", template, "--model_path", str(tmp_path / "no_model"), "--image_folder",
               str(tmp_path / "imgs"), "--out", str(tmp_path / "r.json"), "--judge", "none"], "--model_path")]
    for argv, named in cases:
        r = subprocess.run([sys.executable, "eval_mmhal.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2, (argv, r.stderr)
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
        assert named in r.stderr
    assert "no_model" in r.stderr and "no such model folder" in r.stderr


def cli_error(capsys, argv: list[str]) -> str:
    """What common.run_cli (the script's entry) prints for main(argv): one line, exit code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        eval_mmhal.common.run_cli(lambda: eval_mmhal.main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    # the error is the last line, whole (a progress bar may precede it)
    assert "Traceback" not in err and err.count("error: ") == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def test_user_errors_name_the_flag_or_file(tmp_path, server_factory, monkeypatch, capsys):
    monkeypatch.setattr(eval_mmhal, "build_answerer", lambda cfg: pytest.fail("model loaded before the check"))
    items = make_items(2, answered=False)
    template = write_json(items, tmp_path / "tpl.json")
    answered = write_json(make_items(2), tmp_path / "answered.json")
    make_images(tmp_path / "imgs", items)
    out = str(tmp_path / "r.json")
    answer = ["--template", template, "--out", out, "--model_path", str(tmp_path), "--image_folder", str(tmp_path / "imgs")]

    # the answers file and its meta file
    (tmp_path / "bad.answers.json").write_text("[{")
    assert "bad.answers.json: invalid JSON" in cli_error(capsys, [*answer, "--answers", str(tmp_path / "bad.answers.json"), "--judge", "none"])
    other = write_json(make_items(3), tmp_path / "other.answers.json")
    assert "holds other items" in cli_error(capsys, [*answer, "--answers", other, "--judge", "none"])
    write_json(make_items(2), tmp_path / "m.answers.json")
    (tmp_path / "m.answers.json.meta.json").write_text('{"answered": [0,')
    assert "m.answers.json.meta.json: invalid JSON" in cli_error(
        capsys, [*answer, "--answers", str(tmp_path / "m.answers.json"), "--judge", "none"])
    empty = write_json([], tmp_path / "empty.json")
    assert "empty.json: no items" in cli_error(capsys, ["--template", empty, "--out", out, "--judge", "none"])

    # flags checked before any answering
    assert "--judge_prompt_file" in cli_error(capsys, [*answer, "--judge", "api", "--judge_prompt_file", str(tmp_path / "nope.txt")])
    (tmp_path / "three.txt").write_text("{} {} {}")
    assert "four named slots" in cli_error(capsys, [*answer, "--judge", "api", "--judge_prompt_file", str(tmp_path / "three.txt")])
    err = cli_error(capsys, [*answer, "--judge", "api", "--judge_protocol", "official", "--judge_prompt_file", str(tmp_path / "three.txt")])
    assert "three.txt" in err and "four bare {} fields" in err and "found 3" in err
    (tmp_path / "lone.txt").write_text("{} {} {} {} and a lone } brace")
    err = cli_error(capsys, [*answer, "--judge", "api", "--judge_protocol", "official", "--judge_prompt_file", str(tmp_path / "lone.txt")])
    assert "lone.txt" in err and "{{ and }}" in err
    (tmp_path / "named_official.txt").write_text("{image_content} {question} {gt_answer} {response}")
    err = cli_error(capsys, [*answer, "--judge", "api", "--judge_protocol", "official", "--judge_prompt_file", str(tmp_path / "named_official.txt")])
    assert "four bare {} fields" in err and "{image_content}" in err
    assert "needs --judge_prompt_file" in cli_error(capsys, [*answer, "--judge", "api", "--judge_protocol", "official"])
    assert "needs --judge api" in cli_error(capsys, [*answer, "--judge", "local", "--judge_protocol", "official",
                                                     "--judge_prompt_file", str(tmp_path / "lone.txt")])
    assert "--judge_protocol" in cli_error(capsys, [*answer, "--judge", "api", "--judge_protocol", "paper"])
    assert "--conv_mode" in cli_error(capsys, [*answer, "--judge", "none", "--conv_mode", "llava_v0"])
    assert "--api_base" in cli_error(capsys, [*answer, "--judge", "api", "--api_base", "127.0.0.1:8000/v1"])
    assert "--batch_size" in cli_error(capsys, [*answer, "--judge", "none", "--batch_size", "0"])
    monkeypatch.undo()   # the real loader from here on: it checks its folders before loading anything
    monkeypatch.setenv(KEY_ENV, KEY)
    assert "--adapter_path" in cli_error(capsys, [*answer, "--judge", "none", "--adapter_path", str(tmp_path / "no_adapter")])
    err = cli_error(capsys, ["--template", answered, "--out", out, "--judge", "local", "--judge_model_path", str(tmp_path / "no_judge")])
    assert "--judge_model_path" in err and "no_judge" in err

    # a judge that will not answer: the item and the status, the key nowhere
    err = cli_error(capsys, api_args(tmp_path, answered, server_factory({0: [401]}), "--api_concurrency", "1"))
    assert "item 0" in err and "HTTP 401" in err and KEY not in err

    # compare: a missing file, a file that is no result
    assert "nope.json" in cli_error(capsys, ["compare", str(tmp_path / "nope.json")])
    assert "tpl.json: not an eval_mmhal.py result file" in cli_error(capsys, ["compare", template])
