r"""What the three benchmarks share, in one place: the answering stage (model loading, conversation mode,
decoding, batching, resume) and the one OpenAI-compatible judge client (deadline sockets, retries, the
judgment cache). eval_mmhal.py, eval_pope.py and eval_llava_bench.py each hold only their format and
their scoring, and `compare_results` sets their result files side by side.

Answering. A model answers prompts as LLaVA's evaluation scripts do: the image first in the user turn,
the conversation mode's system sentence (data.CONV_MODES: vicuna_v1, ours and LLaVA-1.5's, or llava_v1,
LLaVA's and LLaVA-RLHF's model_vqa.py default), pad-to-square images (data.image_tensor), greedy unless
--temperature > 0, batched with left padding. POPE and LLaVA-Bench write their answers as JSON lines
{"question_id", "prompt", "text", "model_id"} like LLaVA's model_vqa.py (`answer_jsonl`): each batch is
appended and fsynced, so a killed run continues where it stopped without answering anything twice; the
settings that made the answers are kept in <answers>.meta.json and a resumed run with other settings is
refused. MMHal keeps its own answers file (the benchmark's template) but answers through the same
ModelAnswerer and loader.

Judging. APIJudge is the one client for any OpenAI-compatible chat-completions endpoint: a deadline for
each whole request, exponential backoff on 429/5xx/timeouts/malformed bodies, an immediate error on other
HTTP errors, the key only ever in the Authorization header. `cached_judgments` asks it only for prompts
not already in the judgment cache, caches each reply the moment it arrives, and re-asks a reply that its
benchmark cannot parse (`accept`) up to `rounds` times before keeping it for the benchmark to count.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable

import torch

import common
import data
import model


class JudgeError(common.UserError):
    """The judge gave no reply for an item (an outage past the retries, a bad key or URL); the message
    names the item and the URL. A person can fix it (or wait), and a rerun asks only for what is missing."""


# ----------------------------------------------------------------------------------------------------
# Answering

class ModelAnswerer:
    """Answers from a LLaVA model: one user turn with the image first, pad-to-square images, greedy at
    temperature 0 (else sampled, top-p, from a generator seeded once: a rerun draws the same answers)."""

    def __init__(self, m, tok, template, max_new_tokens: int, device: torch.device, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0):
        self.m, self.tok, self.template = m, tok, template
        self.max_new_tokens, self.device = max_new_tokens, device
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None

    def __call__(self, records: list[dict], image_paths: list[str]) -> list[str]:
        images = torch.stack([data.image_tensor(p, self.m.config.image_size) for p in image_paths])  # (B, 3, S, S)
        return self.replies([r["question"] for r in records], images)

    @torch.no_grad()
    def replies(self, prompts: list[str], images: torch.Tensor | None = None) -> list[str]:
        """One reply per prompt, each one user turn (the image first when there are images)."""
        seqs = [data.tokenize_prompt(p, self.tok, self.template, self.m.num_image_tokens, has_image=images is not None)
                for p in prompts]
        ids, mask = data.left_pad(seqs, self.tok.pad_id)                                      # (B, T)
        if images is not None:
            images = images.to(self.device, next(self.m.parameters()).dtype)
        kw = {"top_p": self.top_p, "generator": self.generator} if self.temperature > 0 else {}
        new = self.m.generate(ids.to(self.device), images, attention_mask=mask.to(self.device),
                              max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              eos_token_id=self.tok.eos_id, **kw)                              # (B, <=max_new_tokens)
        return [self.tok.decode_response(row) for row in new]


def load_chat_model(path: str, vision_tower: str, tokenizer: str, system: str, device: str = "auto",
                    dtype: str = "auto", adapter: str = "", flag: str = "--model_path"
                    ) -> tuple[model.LLaVA, data.Tokenizer, data.Template, torch.device]:
    """A checkpoint (+ a LoRA adapter) on `device` in `dtype`, its tokenizer and a Vicuna-format template
    with `system` (default data.VICUNA_V1_SYSTEM). `flag` names the setting that gave `path`, for the
    error when it is no folder."""
    if not os.path.isdir(path):
        raise common.ConfigError(f"{flag} {path}: no such model folder")
    if adapter and not os.path.isdir(adapter):
        raise common.ConfigError(f"--adapter_path {adapter}: no such adapter folder")
    dev = common.resolve_device(device)
    m = model.LLaVA.from_pretrained(path, vision_tower=vision_tower or None, dtype=model.torch_dtype(dtype, dev))
    if adapter:
        m.load_adapter(adapter, name="default")
        m.set_adapter("default")
    m = m.to(dev).eval()
    return m, data.Tokenizer(tokenizer or path), data.Template(system=system or data.VICUNA_V1_SYSTEM), dev


# Answerer: (records with "question", image paths) -> answers. AnswerConfig.build wraps model.py; tests
# put fakes in its place.
Answerer = Callable[[list[dict], list[str]], list[str]]


@dataclass
class AnswerConfig:
    """The answering settings of POPE and LLaVA-Bench (their configs subclass it)."""
    model_path: str = ""               # checkpoint to answer with; empty = score the answers already in the answers file
    vision_tower: str = ""             # CLIP tower for original-layout checkpoints that only name it
    adapter_path: str = ""             # peft-layout LoRA adapter applied on the base (e.g. the PPO policy)
    tokenizer_path: str = ""           # default: model_path
    conv_mode: str = "vicuna_v1"       # vicuna_v1 | llava_v1: the system sentence of data.CONV_MODES
    system: str = ""                   # an explicit system sentence; non-empty, it wins over --conv_mode's
    image_folder: str = ""             # the question's "image" is looked up here
    batch_size: int = 64
    max_new_tokens: int = 64
    temperature: float = 0.0           # 0 = greedy; > 0 samples (top_p, seed)
    top_p: float = 1.0
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    dtype: str = "auto"                # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16


def answer_system(cfg) -> str:
    """The system sentence the answers are made with: an explicit --system, else --conv_mode's."""
    return cfg.system or data.CONV_MODES[cfg.conv_mode]


def decoding(temperature: float, top_p: float = 1.0) -> str:
    return "greedy" if temperature <= 0 else f"sample(temperature={temperature:g}, top_p={top_p:g})"


def check_answer_config(cfg: AnswerConfig) -> None:
    if cfg.conv_mode not in data.CONV_MODES:
        raise common.ConfigError(f"--conv_mode: expected one of {', '.join(data.CONV_MODES)}, got {cfg.conv_mode!r}")
    for name in ("batch_size", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise common.ConfigError(f"--{name}: expected at least 1, got {getattr(cfg, name)}")
    if cfg.temperature < 0:
        raise common.ConfigError(f"--temperature: expected 0 (greedy) or more, got {cfg.temperature:g}")
    if not 0 < cfg.top_p <= 1:
        raise common.ConfigError(f"--top_p: expected a number in (0, 1], got {cfg.top_p:g}")


def build_answerer(cfg: AnswerConfig) -> Answerer:
    m, tok, template, device = load_chat_model(cfg.model_path, cfg.vision_tower, cfg.tokenizer_path,
                                               answer_system(cfg), cfg.device, cfg.dtype, adapter=cfg.adapter_path)
    return ModelAnswerer(m, tok, template, cfg.max_new_tokens, device, cfg.temperature, cfg.top_p, cfg.seed)


def model_id(cfg: AnswerConfig) -> str:
    """LLaVA's model_id: the checkpoint folder's name (with the adapter's, when there is one)."""
    name = os.path.basename(os.path.normpath(cfg.model_path)) if cfg.model_path else ""
    return name + (f"+{os.path.basename(os.path.normpath(cfg.adapter_path))}" if cfg.adapter_path else "")


def answer_batches(pending: list[int], records: list[dict], paths: dict[int, str], answerer: Answerer,
                   batch_size: int, on_batch: Callable[[list[int], list[str]], None], total: int) -> None:
    """The one answering loop: `pending` record indices in batches; on_batch(indices, answers) persists
    each batch before the next is answered (so an interrupted run loses at most one batch)."""
    progress = common.Progress(total, desc="answering", start=total - len(pending))
    for start in range(0, len(pending), batch_size):
        idx = pending[start:start + batch_size]
        outs = answerer([records[i] for i in idx], [paths[i] for i in idx])
        if len(outs) != len(idx):
            raise RuntimeError(f"answerer returned {len(outs)} answers for {len(idx)} items")
        on_batch(idx, outs)
        progress.update(len(idx))
    progress.close()


# ----------------------------------------------------------------------------------------------------
# Question files (JSON lines) and the JSONL answers file

def read_jsonl(path: str, what: str = "question") -> list[tuple[int, dict]]:
    """[(line number, object)] of a JSON-lines file (one object per non-empty line, whatever the file's
    extension: POPE's own .json files are JSON lines too). DataError naming the file and line."""
    rows = []
    for lineno, line in enumerate(data.read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise data.DataError(f"line {lineno}: invalid JSON ({e.msg}); expected one {what} object per line",
                                 path=path) from None
        if not isinstance(obj, dict):
            raise data.DataError(f"line {lineno}: expected a JSON object, got {type(obj).__name__}", path=path)
        rows.append((lineno, obj))
    if not rows:
        raise data.DataError(f"no {what}s", path=path)
    return rows


def field_of(obj: dict, key: str, types: type | tuple, path: str, lineno: int) -> Any:
    """A required field of a JSON-lines record, of the right type (bools are not ids); else DataError naming
    the file and line."""
    v = obj.get(key)
    types = types if isinstance(types, tuple) else (types,)
    if v is None or not isinstance(v, types) or isinstance(v, bool):
        got = "missing" if v is None else f"a {type(v).__name__}"
        names = " or ".join(t.__name__ for t in types)
        raise data.DataError(f"line {lineno}: '{key}' should be {names}, got {got}", path=path)
    return v


def check_unique_ids(ids: list[tuple[int, Any]], path: str, key: str = "question_id") -> None:
    seen: dict[Any, int] = {}
    for lineno, qid in ids:
        if qid in seen:
            raise data.DataError(f"line {lineno}: duplicate {key} {qid!r} (first on line {seen[qid]})", path=path)
        seen[qid] = lineno


def find_images(questions: list[dict], image_folder: str, source: str) -> dict[Any, str]:
    """{question_id: image path} for questions with "image" and "line"; FileNotFoundError naming the
    question file, line and path of the first image that is not there (before any model is loaded)."""
    paths = {}
    for q in questions:
        p = data.image_file(image_folder or None, q["image"])
        if not os.path.isfile(p):
            where = f"--image_folder {image_folder}" if image_folder else "no --image_folder"
            raise FileNotFoundError(f"{source}: line {q['line']}: image {q['image']!r} not found at {p} ({where})")
        paths[q["question_id"]] = p
    return paths


def answer_settings(cfg: AnswerConfig, prompt_suffix: str = "") -> dict:
    """What produces the answers (kept beside them and recorded in results): a resumed run must not mix
    answers made two ways, and compare must not set side by side results answered differently."""
    return {"model_path": cfg.model_path, "adapter_path": cfg.adapter_path, "conv_mode": cfg.conv_mode,
            "system": answer_system(cfg), "prompt_suffix": prompt_suffix, "max_new_tokens": cfg.max_new_tokens,
            "decoding": decoding(cfg.temperature, cfg.top_p)}


def read_answers(path: str) -> dict[Any, dict]:
    """{question_id: answer record} of a JSONL answers file. A torn last line (a run killed mid-write) is
    dropped from the file, so it is answered again; a bad line elsewhere, a record without question_id or
    text, or an id answered twice is a DataError naming the line."""
    if not os.path.exists(path):
        return {}
    text = data.read_text(path)
    lines = text.split("\n")
    out: dict[Any, dict] = {}
    lineno_of: dict[Any, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not text.endswith("\n"):   # torn by a crash: cut it off
                with open(path, "r+b") as f:
                    f.truncate(len("\n".join(lines[:-1]).encode("utf-8")) + (1 if len(lines) > 1 else 0))
                break
            raise data.DataError(f"line {lineno}: invalid JSON ({e.msg})", path=path) from None
        if not isinstance(rec, dict):
            raise data.DataError(f"line {lineno}: expected an answer object, got {type(rec).__name__}", path=path)
        qid = field_of(rec, "question_id", (int, str), path, lineno)
        field_of(rec, "text", str, path, lineno)
        if qid in out:
            raise data.DataError(f"line {lineno}: question_id {qid!r} answered twice (first on line {lineno_of[qid]})",
                                 path=path)
        out[qid], lineno_of[qid] = rec, lineno
    return out


def check_answers_meta(settings: dict, meta: dict, answers_path: str) -> None:
    """The answers file was made as this run would make it, setting by setting; else one line naming the
    first setting that differs."""
    for key, value in settings.items():
        if key not in meta or meta[key] != value:
            got = repr(meta[key]) if key in meta else "no recorded value"
            raise common.ConfigError(f"{answers_path} was started with {key} {got}, this run has {value!r}; "
                                     "delete it (and its .meta.json) or pass another answers file")


def answer_jsonl(cfg: AnswerConfig, questions: list[dict], answers_path: str, source: str,
                 prompt_suffix: str = "", build: Callable[[AnswerConfig], Answerer] | None = None
                 ) -> tuple[dict[Any, dict], dict | None]:
    """Answer every question ({"question_id", "image", "text", "line"}) not yet in the JSONL answers file,
    appending one line {"question_id", "prompt", "text", "model_id"} per answer, fsynced after each batch.
    The model sees text + prompt_suffix; "prompt" is the text as the question file gives it (LLaVA's
    model_vqa.py). Answers for other questions than these are refused (another question file).
    -> ({question_id: answer record}, the settings that made them; None when no meta file says)."""
    answers = read_answers(answers_path)
    ids = {q["question_id"] for q in questions}
    stray = [qid for qid in answers if qid not in ids]
    if stray:
        raise common.ConfigError(f"{answers_path} answers question_id {stray[0]!r}, which {source} does not hold "
                                 "(answers of another question file?); delete it or pass another answers file")
    meta_path = answers_path + ".meta.json"
    meta = data.load_json(meta_path) if os.path.exists(meta_path) else None
    if meta is not None and not isinstance(meta, dict):
        raise data.DataError("not an answers meta file (expected an object of settings)", path=meta_path)
    pending = [i for i, q in enumerate(questions) if q["question_id"] not in answers]
    settings = answer_settings(cfg, prompt_suffix)
    if cfg.model_path and (answers or meta):   # answers made otherwise are never scored as if they were not
        if meta is None:
            raise common.ConfigError(f"{answers_path} has answers but no {os.path.basename(meta_path)} saying how "
                                     "they were made; delete it to answer afresh, or score it without --model_path")
        check_answers_meta(settings, meta, answers_path)
    recorded = {k: meta.get(k) for k in settings} if meta else None
    if not pending:
        return answers, recorded
    if not cfg.model_path:
        first = questions[pending[0]]
        raise common.ConfigError(f"{len(pending)} of {len(questions)} questions in {source} have no answer in "
                                 f"{answers_path} (first: question_id {first['question_id']!r}, line {first['line']}); "
                                 "pass --model_path to answer them")
    check_answer_config(cfg)
    paths_by_id = find_images([questions[i] for i in pending], cfg.image_folder, source)
    records = [{"question": q["text"] + prompt_suffix} for q in questions]
    paths = {i: paths_by_id[questions[i]["question_id"]] for i in pending}
    answerer = (build or build_answerer)(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(answers_path)), exist_ok=True)
    common.atomic_write_text(json.dumps(settings, indent=2), meta_path)
    mid = model_id(cfg)

    def on_batch(idx: list[int], outs: list[str]) -> None:
        lines = []
        for i, text in zip(idx, outs):
            rec = {"question_id": questions[i]["question_id"], "prompt": questions[i]["text"], "text": text,
                   "model_id": mid}
            answers[rec["question_id"]] = rec
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        with open(answers_path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())

    answer_batches(pending, records, paths, answerer, cfg.batch_size, on_batch, len(questions))
    return answers, settings


# ----------------------------------------------------------------------------------------------------
# The OpenAI-compatible client

class _DeadlineSocket:
    """A connection's socket under one deadline for the whole request: before each send and each receive
    its timeout is set to the time left, so a server that trickles bytes cannot stretch a request past
    --api_timeout (a plain socket timeout bounds each read, not the reply)."""

    def __init__(self, sock, deadline: float, timeout: float):
        self.sock, self.deadline, self.timeout = sock, deadline, timeout

    def arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.expired()
        self.sock.settimeout(left)

    def expired(self) -> TimeoutError:
        return TimeoutError(f"no complete reply within --api_timeout {self.timeout:g} s")

    def sendall(self, payload: bytes) -> None:
        self.arm()
        self.sock.sendall(payload)

    def makefile(self, mode: str = "rb", **_) -> io.BufferedReader:
        # The socket's own reader underneath keeps its reference count: the response may outlive close().
        return io.BufferedReader(_DeadlineReader(self, self.sock.makefile("rb", buffering=0)))

    def close(self) -> None:
        self.sock.close()

    def __getattr__(self, name: str):  # anything else http.client may ask of a socket
        return getattr(self.sock, name)


class _DeadlineReader(io.RawIOBase):
    def __init__(self, owner: _DeadlineSocket, raw):
        super().__init__()
        self.owner, self.raw = owner, raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        self.owner.arm()
        try:
            return self.raw.readinto(buffer)
        except TimeoutError:  # the time left ran out inside this read
            raise self.owner.expired() from None

    def close(self) -> None:
        self.raw.close()
        super().close()


class _DeadlineConnection(http.client.HTTPConnection):
    """urllib's connection, its deadline starting when urllib creates it, just before connecting."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = time.monotonic() + self.timeout

    def connect(self) -> None:
        super().connect()   # TLS (and a proxy tunnel) included for the HTTPS class below
        self.sock = _DeadlineSocket(self.sock, self.deadline, self.timeout)


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_DeadlineConnection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_DeadlineHTTPSConnection, req)


def http_error_detail(e: urllib.error.HTTPError) -> str:
    """The start of an error reply's body; a body that cannot be read (the deadline passed) is said so."""
    try:
        return e.read()[:300].decode("utf-8", "replace")
    except (http.client.HTTPException, OSError) as err:
        return f"(body unreadable: {type(err).__name__}: {err})"


def request_body(model_name: str, prompt: str, max_tokens: int | None, temperature: float = 0.0,
                 system: str | None = None) -> dict:
    """The chat-completions request: an optional system message, one user message, the temperature, and
    max_tokens unless it is None (MMHal's official request sends none)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body = {"model": model_name, "messages": messages, "temperature": temperature}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


class APIJudge:
    """OpenAI-compatible chat completions over urllib: a thread pool of requests in flight, retries with
    exponential backoff on 429/5xx/timeouts/malformed bodies. Other HTTP errors (401, 400, ...) fail at
    once: retrying a bad key or request only wastes time. `timeout` is a deadline for each whole request
    (connect, send, the full reply), not for each socket read. max_tokens None sends none."""

    def __init__(self, base: str, model_name: str, key: str, timeout: float = 120.0, max_tries: int = 6,
                 backoff: float = 2.0, concurrency: int = 4, max_tokens: int | None = 1024,
                 temperature: float = 0.0, system: str | None = None):
        self.url = base.rstrip("/") + "/chat/completions"
        self.model, self._key = model_name, key
        self.timeout, self.max_tries, self.backoff = timeout, max(1, max_tries), backoff
        self.concurrency, self.max_tokens = max(1, concurrency), max_tokens
        self.temperature, self.system = temperature, system
        # urllib's usual opener (proxies from the environment and all) with the deadline connections
        self._opener = urllib.request.build_opener(_DeadlineHTTPHandler, _DeadlineHTTPSHandler)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def complete(self, prompt: str) -> str:
        body = json.dumps(request_body(self.model, prompt, self.max_tokens, self.temperature, self.system)).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"}
        last, retry_after = "", None
        for attempt in range(self.max_tries):
            if attempt:
                # Exponential backoff; the jitter keeps a burst of 429s from retrying in lockstep.
                delay = min(60.0, self.backoff * 2 ** (attempt - 1)) * (1 + 0.25 * random.random())
                if retry_after is not None:
                    delay = min(60.0, max(delay, retry_after))
                time.sleep(delay)
            retry_after = None
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = http_error_detail(e)
                if e.code in (408, 429) or e.code >= 500:
                    last = f"HTTP {e.code}: {detail}"
                    try:
                        retry_after = float(e.headers.get("Retry-After", ""))
                    except (TypeError, ValueError):
                        pass
                    continue
                raise JudgeError(self._redact(f"judge API {self.url} returned HTTP {e.code}: {detail}")) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # timeouts, resets, refused
                last = f"{type(e).__name__}: {e}"
                continue
            try:
                reply = json.loads(raw)["choices"][0]["message"]["content"]
                if not isinstance(reply, str):
                    raise TypeError("content is not a string")
                return reply
            except (ValueError, KeyError, IndexError, TypeError) as e:
                # A proxy's HTML error page or a truncated body: worth another try, never a rating.
                last = f"malformed body ({type(e).__name__}): {raw[:200].decode('utf-8', 'replace')!r}"
        raise JudgeError(self._redact(f"judge API {self.url} failed after {self.max_tries} tries; last: {last}"))

    def run(self, prompts: dict[int, str], on_done: Callable[[int, str], None]) -> None:
        """Replies are handed to on_done in the calling thread as they arrive (so it may write files).
        On a failure the pending requests are cancelled, the ones in flight finish and are kept, and
        the first error is raised; a rerun asks only for what is missing."""
        error: JudgeError | None = None
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = {pool.submit(self.complete, p): i for i, p in prompts.items()}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    reply = fut.result()
                except CancelledError:
                    continue
                except JudgeError as e:
                    if error is None:
                        error = JudgeError(f"item {i}: {e}")
                        for f in futures:
                            f.cancel()
                    continue
                on_done(i, reply)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if error is not None:
            raise error


def api_key(env_name: str) -> str:
    """The key from the variable named by --api_key_env; it is never logged or written anywhere."""
    key = os.environ.get(env_name)
    if key is None:
        raise common.ConfigError(f"--judge api: the environment variable {env_name} (named by --api_key_env) is not set")
    return key


def check_api_settings(api_base: str, api_timeout: float) -> None:
    url = urllib.parse.urlsplit(api_base)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise common.ConfigError(f"--api_base {api_base!r}: expected an http:// or https:// URL")
    if not api_timeout > 0:
        raise common.ConfigError(f"--api_timeout: expected a positive number of seconds, got {api_timeout}")


# ----------------------------------------------------------------------------------------------------
# Judgment cache: JSON lines {"key", "judge", "reply"}, appended and fsynced after each judgment.

class JudgeCache:
    def __init__(self, path: str):
        self.path = path
        self.entries: dict[str, str] = {}
        if os.path.exists(path):
            with open(path) as f:
                raw = f.read()
            for line in raw.splitlines():
                try:
                    e = json.loads(line)
                    self.entries[e["key"]] = e["reply"]
                except (ValueError, KeyError, TypeError):
                    pass  # a line torn by a crash mid-write: that judgment is simply asked again
            if raw and not raw.endswith("\n"):
                with open(path, "a") as f:  # so the next entry does not glue onto the torn line
                    f.write("\n")

    @staticmethod
    def key(judge_id: str, prompt: str) -> str:
        return hashlib.sha256(f"{judge_id}\x00{prompt}".encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, judge_id: str, reply: str) -> None:
        self.entries[key] = reply
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "judge": judge_id, "reply": reply}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def cached_judgments(prompts: list[str], judge_id: str, cache_path: str, make_judge: Callable[[], Any],
                     accept: Callable[[str], bool] | None = None, rounds: int = 1) -> list[str]:
    """One judge reply per prompt. Cached replies are reused; only the missing ones are asked for (the
    judge is built only then), and each is cached the moment it arrives. A reply `accept` refuses (its
    benchmark cannot parse it) is asked for again, up to `rounds` asks in all; the last one is then cached
    as it is, for the benchmark to count and name. The judge has run({index: prompt}, on_done)."""
    cache = JudgeCache(cache_path)
    keys = [JudgeCache.key(judge_id, p) for p in prompts]
    todo = {i: p for i, (p, k) in enumerate(zip(prompts, keys)) if cache.get(k) is None}
    if not todo:
        print(f"all {len(prompts)} judgments cached ({judge_id}); nothing sent")
        return [cache.get(k) for k in keys]
    print(f"judging {len(todo)} of {len(prompts)} items with {judge_id} ({len(prompts) - len(todo)} cached)")
    judge = make_judge()
    progress = common.Progress(len(prompts), desc="judging", start=len(prompts) - len(todo))
    try:
        for r in range(max(1, rounds)):
            last_round = r == max(1, rounds) - 1
            refused: dict[int, str] = {}

            def on_done(i: int, reply: str) -> None:
                if accept is None or accept(reply) or last_round:
                    cache.put(keys[i], judge_id, reply)
                    progress.update(1)
                else:
                    refused[i] = reply

            judge.run(todo, on_done)
            if not refused:
                break
            print(f"{len(refused)} judge replies do not parse; asking again (ask {r + 2} of {rounds})", file=sys.stderr)
            todo = {i: prompts[i] for i in refused}
    finally:
        progress.close()
    return [cache.get(k) for k in keys]


def excerpt(text: str, width: int = 100) -> str:
    """A judge reply on one line; a long one keeps its start and its end (where the verdict usually is)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width // 2] + " ... " + flat[-(width // 2 - 5):]


# ----------------------------------------------------------------------------------------------------
# Several benchmarks side by side

def result_kind(doc: Any) -> str | None:
    """Which benchmark wrote a result file: "pope", "llava_bench", "mmhal", or None."""
    if isinstance(doc, dict) and doc.get("benchmark") in ("pope", "llava_bench"):
        return doc["benchmark"]
    s = doc.get("summary") if isinstance(doc, dict) else None
    if isinstance(s, dict) and all(k in s for k in ("average", "hallucination_rate", "per_type")):
        return "mmhal"
    return None


def result_columns(kind: str, doc: dict) -> dict[str, float]:
    """A result file's headline numbers, as table columns (percentages for POPE and LLaVA-Bench)."""
    if kind == "pope":
        cols = {f"POPE F1 {s[:3]}": 100 * doc["scores"][s]["f1"] for s in doc["scores"] if s != "mean"}
        if "mean" in doc["scores"]:
            cols["POPE F1 mean"] = 100 * doc["scores"]["mean"]["f1"]
            cols["POPE yes%"] = 100 * doc["scores"]["mean"]["yes_ratio"]
        return cols
    if kind == "llava_bench":
        return {f"LB {c[:7]}": v["relative"] for c, v in doc["summary"]["categories"].items()}
    return {"MMHal avg": doc["summary"]["average"], "MMHal halluc": doc["summary"]["hallucination_rate"]}


def compare_results(args: list[str], plot_path: str = "") -> str:
    """A table, one row per model, one column per headline number of each benchmark. Each argument is a
    result file (eval_pope.py run's, eval_llava_bench.py's or eval_mmhal.py's), optionally NAME=PATH: files
    with the same NAME are one model's row; without it the row is named by the file's folder and stem.
    A model run with other answer settings than the first on a benchmark is warned about. With
    plot_path and matplotlib, one bar chart per benchmark."""
    rows: dict[str, dict[str, float]] = {}
    settings: dict[str, list[tuple[str, Any]]] = {}
    for arg in args:
        name, sep, path = arg.partition("=")
        if not sep:
            name, path = os.path.splitext(os.path.basename(arg))[0], arg
        doc = data.load_json(path)
        kind = result_kind(doc)
        if kind is None:
            raise data.DataError("not a result file of eval_pope.py run, eval_llava_bench.py or eval_mmhal.py", path=path)
        rows.setdefault(name, {}).update(result_columns(kind, doc))
        answer = (doc.get("settings") or {}).get("answer") if isinstance(doc.get("settings"), dict) else None
        settings.setdefault(kind, []).append((name, {k: v for k, v in (answer or {}).items()
                                                     if k not in ("model_path", "adapter_path")} or None))
    for kind, named in settings.items():
        first_name, first = named[0]
        for name, s in named[1:]:
            if s != first:
                print(f"warning: compare: {kind}: {name} was answered with other settings than {first_name} "
                      f"({s} vs {first})", file=sys.stderr)
    cols: list[str] = []
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    w = max(12, *(len(n) for n in rows)) + 2
    header = f"{'model':<{w}}" + "".join(f"{c[:13]:>14}" for c in cols)
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        lines.append(f"{name:<{w}}" + "".join(f"{r[c]:>14.2f}" if c in r else f"{'-':>14}" for c in cols))
    if plot_path:
        plot_comparison(rows, cols, plot_path)
    return "\n".join(lines)


def compare_cli(args: list[str], prog: str) -> str:
    """`PROG compare [NAME=]RESULT.json ... [--plot FILE.png]`: print and return compare_results' table."""
    rest, plot = list(args), ""
    if "--plot" in rest:
        k = rest.index("--plot")
        if k + 1 >= len(rest):
            raise common.ConfigError("--plot needs a file name")
        plot, rest = rest[k + 1], rest[:k] + rest[k + 2:]
    if not rest or any(a.startswith("--") for a in rest):
        raise common.ConfigError(f"usage: python {prog} compare [NAME=]RESULT.json ... [--plot FILE.png]")
    table = compare_results(rest, plot)
    print(table)
    return table


def plot_comparison(rows: dict[str, dict[str, float]], cols: list[str], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the comparison plot")
        return False
    groups = [(g, [c for c in cols if c.startswith(g)]) for g in ("POPE", "LB", "MMHal")]
    groups = [(g, cs) for g, cs in groups if cs]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.5), squeeze=False)
    width = 0.8 / max(1, len(rows))
    for ax, (g, cs) in zip(axes[0], groups):
        for k, (name, r) in enumerate(rows.items()):
            ax.bar([j + k * width for j in range(len(cs))], [r.get(c, 0.0) for c in cs], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cs))])
        ax.set_xticklabels([c[len(g):].strip() for c in cs], rotation=30, ha="right")
        ax.set_title({"LB": "LLaVA-Bench (% of reference)", "POPE": "POPE (%)", "MMHal": "MMHal-Bench"}[g])
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

