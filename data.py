"""Data for LLaVA-RLHF: the Vicuna v1 conversation template, a sentencepiece tokenizer, CLIP image
preprocessing, readers for every data format of the pipeline, datasets, batching and a resumable sampler.
Converting public data sets, mixing and checking files: prepare_data.py.

Bad data: every reader raises DataError naming the file, the record index (and the image) by default. With
on_error="skip" the record is skipped, counted in a Skips object (passed in, or the module-level SKIPS) and a
summary line is printed when the reader finishes. Nothing here ever returns a silently wrong tensor.
Every text file is read by read_text (UTF-8 or a DataError naming the file and the offending byte); every
message shows file names through printable (an undecodable name is escaped, never a UnicodeEncodeError).
"""
from __future__ import annotations

import codecs
import copy
import json
import math
import os
import struct
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
from PIL import Image

from common import UserError
from model import IMAGE_TOKEN_INDEX  # -200: where the projected patch features are spliced in

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
EOS_TEXT = "</s>"
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# LLaVA's "llava_v1" conversation mode: the same format, the system sentence says "human" (SPEC §9: the
# official MMHal-Bench answers were generated with it).
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CONV_MODES = {"vicuna_v1": VICUNA_V1_SYSTEM, "llava_v1": LLAVA_V1_SYSTEM}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SPEC §1: the pad colour is int(mean * 255), truncated, as LLaVA's expand2square call computes it and
# every released checkpoint was trained with.
PAD_FILL = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
# Refuse images above this many pixels before decoding them (PIL's own default threshold), and images
# whose square padding (expand2square, max(w, h) ** 2 pixels) would be larger: a 1 x 80,000,000 strip
# has fewer pixels than this but pads to 6.4e15.
MAX_IMAGE_PIXELS = 89_478_485

ROLES = ("human", "gpt")
ANSWER_TYPES = ("multiple_choice", "yes_no", "general")


# ----------------------------------------------------------------------------------------------------
# Errors and skip counting

def printable(text: str) -> str:
    """`text` safe to print or encode as UTF-8: a file name os.listdir / sys.argv could not decode holds
    surrogate escapes (b"caf\\xe9" -> "caf\\udce9"), shown here as the byte "\\xe9"; any other lone
    surrogate (a JSON "\\udXXX" escape) as "\\udXXX". Valid text comes back unchanged."""
    def show(c: str) -> str:
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:
            return f"\\x{o - 0xDC00:02x}"
        return f"\\u{o:04x}" if 0xD800 <= o <= 0xDFFF else c
    return "".join(map(show, text))


class DataError(UserError):
    """Bad data. The message names the file, the record index and the image when they are known."""

    def __init__(self, reason: str, path: str | None = None, index: int | None = None, image: str | None = None):
        self.reason, self.path, self.index, self.image = reason, path, index, image
        where = ([str(path)] if path else []) + ([f"record {index}"] if index is not None else [])
        super().__init__(printable(": ".join(where + [reason]) + (f" (image {image})" if image else "")))

    def at(self, path: str | None, index: int | None, image: str | None = None) -> "DataError":
        """The same error with the file / record / image filled in where they were unknown."""
        return type(self)(self.reason, self.path or path, self.index if self.index is not None else index,
                          self.image or image)


class TruncationError(DataError):
    """Truncation to max_len would cut off the image tokens or leave nothing supervised."""


@dataclass
class Skips:
    """Counts records skipped under on_error="skip"; `reasons` holds the full DataError messages and
    `indices` the record index of each (None when unknown)."""
    count: int = 0
    reasons: list[str] = field(default_factory=list)
    indices: list[int | None] = field(default_factory=list)

    def add(self, reason: str, index: int | None = None) -> None:
        self.count += 1
        self.reasons.append(reason)
        self.indices.append(index)

    def report(self, file=None, limit: int = 20) -> str:
        lines = [f"skipped {self.count} record(s)"] + [f"  {r}" for r in self.reasons[:limit]]
        if self.count > limit:
            lines.append(f"  ... and {self.count - limit} more")
        text = "\n".join(lines)
        print(text, file=file or sys.stderr)
        return text


SKIPS = Skips()  # the default counter when a reader is not given one


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


# ----------------------------------------------------------------------------------------------------
# Conversation template (SPEC §2)

@dataclass
class Template:
    """Vicuna v1: `SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>`.
    style="plain" is LLaVA's pretraining format: `<image>CAPTION\\n`, the human text ignored."""
    system: str = VICUNA_V1_SYSTEM
    style: str = "vicuna_v1"

    def segments(self, conversations: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, str, bool]]:
        """The rendered text as (lead, text, supervised) pieces; render() == "".join(lead + text).
        `lead` is the separator space before an answer: it is not tokenised on its own because
        sentencepiece's dummy-prefix "▁" at the start of the answer's chunk already stands for it."""
        if self.style == "plain":  # a human turn gives only its image
            return [("", IMAGE_PLACEHOLDER, False) if t["from"] == "human" else ("", t["value"] + "\n", True)
                    for t in conversations if t["from"] != "human" or IMAGE_PLACEHOLDER in t["value"]]
        if self.style != "vicuna_v1":
            raise ValueError(f"unknown template style {self.style!r}")
        segs, cur = [], self.system + " "
        for turn in conversations:
            if turn["from"] == "human":
                cur += f"USER: {turn['value']} "
            elif turn["from"] == "gpt":
                segs.append(("", cur + "ASSISTANT:", False))
                segs.append((" ", turn["value"] + EOS_TEXT, True))
                cur = ""
            else:
                raise DataError(f"unknown role {turn['from']!r} (expected 'human' or 'gpt')")
        if add_generation_prompt:
            cur += "ASSISTANT:"
        if cur:
            segs.append(("", cur, False))
        return segs

    def render(self, conversations: list[dict], add_generation_prompt: bool = False) -> str:
        return "".join(lead + text for lead, text, _ in self.segments(conversations, add_generation_prompt))


PLAIN_TEMPLATE = Template(system="", style="plain")


def _place_image(value: str) -> str:
    """LLaVA's placement: the image goes first in the user turn, "<image>\\n" then the stripped text."""
    return IMAGE_PLACEHOLDER + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()


def normalize_conversation(conversations: Any, has_image: bool | None = None, last: str | None = "gpt") -> list[dict]:
    """Validate a [{"from", "value"}] list and return a clean copy with the image placed LLaVA's way.
    Turns alternate human/gpt starting with human; `last` is the role the list must end with (None: either).
    has_image=True inserts "<image>\\n" when the text lacks it; has_image=False forbids the placeholder;
    None takes the text as it is. Raises DataError with the reason (the caller adds file and index)."""
    if not isinstance(conversations, list):
        raise DataError(f"'conversations' should be a list, got {type(conversations).__name__}")
    if not conversations:
        raise DataError("'conversations' is empty")
    out = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise DataError(f"turn {i} should be an object, got {type(turn).__name__}")
        for key in ("from", "value"):
            if key not in turn:
                raise DataError(f"turn {i} is missing field '{key}'")
        role, value = turn["from"], turn["value"]
        if role not in ROLES:
            raise DataError(f"turn {i} has role {role!r}; expected 'human' or 'gpt'")
        if not isinstance(value, str):
            raise DataError(f"turn {i} 'value' should be a string, got {type(value).__name__}")
        if role != ROLES[i % 2]:
            raise DataError(f"turn {i} is from {role!r} but roles must alternate human/gpt starting with human")
        if not value.strip() and role == "gpt":
            raise DataError(f"turn {i} is an empty answer")
        if not value.strip() and i > 0:  # turn 0 is checked below: the image may be all it asks about
            raise DataError(f"turn {i} is an empty question")
        out.append({"from": role, "value": value})
    if last is not None and out[-1]["from"] != last:
        raise DataError(f"conversation ends with a {out[-1]['from']!r} turn; expected it to end with {last!r}")
    counts = [t["value"].count(IMAGE_PLACEHOLDER) for t in out]
    total = sum(counts)
    if total > 1:
        raise DataError(f"{IMAGE_PLACEHOLDER} appears {total} times; at most once is allowed")
    if total == 1 and counts[0] != 1:
        raise DataError(f"{IMAGE_PLACEHOLDER} must be in the first user turn, found in turn {counts.index(1)}")
    if total == 1 and has_image is False:
        raise DataError(f"{IMAGE_PLACEHOLDER} in the text but the record has no image")
    if total == 1 or has_image:
        out[0]["value"] = _place_image(out[0]["value"])
    elif not out[0]["value"].strip():
        raise DataError("turn 0 is an empty question")
    return out


def with_response(conversations: list[dict], response: str) -> list[dict]:
    """A preference context (ending with a user turn) followed by one candidate response."""
    return [dict(t) for t in conversations] + [{"from": "gpt", "value": response}]


# ----------------------------------------------------------------------------------------------------
# Tokenizer and tokenisation

class Tokenizer:
    """A LLaMA-style sentencepiece model: BOS 1, EOS 2, pad = unk 0. encode() adds no BOS/EOS."""

    def __init__(self, path: str):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: the sentencepiece model has no BOS/EOS ids")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int) if text else []

    def decode_response(self, ids) -> str:
        """A generated row -> its text: the tokens before the first EOS (generate pads after it),
        stripped of surrounding spaces. The one way every stage reads a sampled response."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.decode(ids).strip()

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        keep = [int(i) for i in ids if i >= 0 and i != self.pad_id and i != self.bos_id]
        bad = [i for i in keep if i >= self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary ({self.vocab_size})")
        return self.sp.decode(keep)


def encode_text(text: str, tok: Tokenizer, num_image_tokens: int, bos: bool = True) -> list[int]:
    """LLaVA's encoding of a prompt string: the text is cut at "</s>" (-> EOS id) and "<image>"
    (-> num_image_tokens copies of IMAGE_TOKEN_INDEX); each piece between is encoded on its own."""
    ids = [tok.bos_id] if bos else []
    for j, part in enumerate(text.split(EOS_TEXT)):
        if j:
            ids.append(tok.eos_id)
        for k, chunk in enumerate(part.split(IMAGE_PLACEHOLDER)):
            if k:
                ids.extend([IMAGE_TOKEN_INDEX] * num_image_tokens)
            ids.extend(tok.encode(chunk))
    return ids


def _text_starts(ids: list[int]) -> list[int]:
    """The index where each position starts when an image (a run of IMAGE_TOKEN_INDEX) is one position."""
    return [i for i, t in enumerate(ids) if t != IMAGE_TOKEN_INDEX or i == 0 or ids[i - 1] != IMAGE_TOKEN_INDEX]


def text_len(ids: list[int]) -> int:
    """Length of an id list with each image counted as ONE id: how the official code's limits count
    (SPEC §9), so max_len / max_prompt_len never count the 256 / 576 expanded image tokens."""
    return len(_text_starts(ids))


def tokenize_conversation(conversations: list[dict], tok: Tokenizer, template: Template, num_image_tokens: int,
                          max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a training conversation. Labels are IGNORE_INDEX except on the assistant
    answers and their </s>. Pieces are encoded separately (see Template.segments), so the prompt from
    tokenize_prompt is an exact prefix. max_len counts the image as ONE id (text_len, SPEC §9: the official
    model_max_length 1280 counts text ids only); a longer conversation keeps its first max_len ids so
    counted, the image whole. Raises TruncationError when max_len would cut off the image or leave no
    supervised token."""
    conv = normalize_conversation(conversations, has_image=None, last="gpt")
    ids, labels = [tok.bos_id], [IGNORE_INDEX]
    for _, text, supervised in template.segments(conv):
        piece = encode_text(text, tok, num_image_tokens, bos=False)
        ids.extend(piece)
        labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))
    starts = _text_starts(ids)
    if max_len is not None and len(starts) > max_len:  # keep the first max_len, never cutting inside an image
        n_img = ids.count(IMAGE_TOKEN_INDEX)
        ids, labels = ids[:starts[max_len]], labels[:starts[max_len]]
        if ids.count(IMAGE_TOKEN_INDEX) != n_img:
            raise TruncationError(f"max_len {max_len} (the image counted as one id) cuts off the {n_img} image tokens")
    if all(label == IGNORE_INDEX for label in labels):
        raise TruncationError(f"no supervised token left after truncation to max_len {max_len}")
    return ids, labels


def tokenize_prompt(question: str, tok: Tokenizer, template: Template, num_image_tokens: int,
                    has_image: bool = True) -> list[int]:
    """BOS + "SYSTEM USER: <image>\\nQUESTION ASSISTANT:" for generation (PPO rollouts, evaluation)."""
    n = question.count(IMAGE_PLACEHOLDER)
    if n > 1:
        raise DataError(f"{IMAGE_PLACEHOLDER} appears {n} times in the question")
    if n and not has_image:
        raise DataError(f"{IMAGE_PLACEHOLDER} in the question but has_image=False")
    q = _place_image(question) if has_image else question
    text = template.render([{"from": "human", "value": q}], add_generation_prompt=True)
    return encode_text(text, tok, num_image_tokens, bos=True)


# ----------------------------------------------------------------------------------------------------
# Images (SPEC §1)

# EXIF orientation -> the transpose that makes the pixels upright.
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited onto white (as transformers does); 16-bit
    grey is scaled to 8 bits (PIL's own convert would clip everything above 255 to white)."""
    mode = img.mode
    if mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I" (32-bit ints, usually 16-bit PNG data)
        arr = np.asarray(img).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f"integer image (mode {mode}) has values outside 0..65535")
        return Image.fromarray(np.round(arr / 257.0).astype(np.uint8)).convert("RGB")
    if mode == "F":
        raise DataError("floating-point images (mode F) are not supported: their value range is unknown")
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise DataError(f"cannot convert image mode {mode} to RGB: {e}") from None


def check_image_size(w: int, h: int) -> None:
    """DataError unless a w x h image, and the square it is padded to, fit in MAX_IMAGE_PIXELS."""
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(f"refusing a {w}x{h} image: more than MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS} "
                        "pixels (decompression bomb?)")
    side = max(w, h)
    if side * side > MAX_IMAGE_PIXELS:
        raise DataError(f"refusing a {w}x{h} image: padded to a {side}x{side} square it has more than "
                        f"MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS} pixels (longest side at most "
                        f"{math.isqrt(MAX_IMAGE_PIXELS)}); shrink it")


def load_image(path: str) -> Image.Image:
    """Open, check the size (and the padded size) against MAX_IMAGE_PIXELS from the header, before
    decoding, decode fully, apply the EXIF orientation and convert to RGB. DataError naming the path on
    any failure."""
    if not os.path.isfile(path):
        raise DataError("image file not found", image=path)
    try:
        with warnings.catch_warnings():
            # we apply our own limit below; PIL's warning would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_image_size(*im.size)
                im.load()
                try:
                    orientation = im.getexif().get(0x0112, 1)
                except Exception:  # noqa: BLE001 - broken EXIF metadata: keep the pixels as stored
                    orientation = 1
                rgb = to_rgb(im)
    except DataError as e:
        raise e.at(None, None, path) from None
    except Image.DecompressionBombError as e:
        raise DataError(f"refusing a decompression bomb: {e}", image=path) from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise DataError(f"cannot read image: {e}", image=path) from None
    if orientation in _EXIF_TRANSPOSE:
        rgb = rgb.transpose(_EXIF_TRANSPOSE[orientation])
    return rgb


def expand2square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of its longer side, filled with `fill`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)


def preprocess_image(img: Image.Image, image_size: int, pad_to_square: bool = True) -> torch.Tensor:
    """(3, S, S) float32: pad to square, resize the shortest side to S (bicubic), centre crop,
    scale to [0, 1], normalise with the CLIP mean/std. Equal to transformers' CLIPImageProcessor."""
    if img.mode != "RGB":
        img = to_rgb(img)
    if pad_to_square:
        check_image_size(*img.size)  # an image made in memory has not been through load_image
        img = expand2square(img, PAD_FILL)
    S = image_size
    w, h = img.size
    # shortest side -> S; the other side scaled and truncated to int, as torchvision/transformers do
    new_w, new_h = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - S) // 2, (new_w - S) // 2
    arr = np.array(img)[top:top + S, left:left + S]  # (S, S, 3) uint8, a writable copy for torch
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0  # (3, S, S)
    return ((x - _MEAN) / _STD).contiguous()


def image_tensor(path: str, image_size: int) -> torch.Tensor:
    """An image file as the model's (3, S, S) input: the one way every stage reads an image.
    DataError naming the file when it is missing or unreadable."""
    return preprocess_image(load_image(path), image_size)


def image_file(image_folder: str | None, image: str) -> str:
    """Where a record's image is: relative names are looked up in image_folder."""
    return image if (image_folder is None or os.path.isabs(image)) else os.path.join(image_folder, image)


# ----------------------------------------------------------------------------------------------------
# Files: JSON lists and JSONL

def read_text(path: str) -> str:
    """A text file as str: UTF-8, a leading byte-order mark dropped, line ends made "\\n" (as open() in
    text mode does). The one way data.py and prepare_data.py read text; DataError naming the file when it
    is missing or not UTF-8."""
    if not os.path.isfile(path):
        raise DataError("file not found", path=path)
    with open(path, "rb") as f:
        raw = f.read()
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        line = raw.count(b"\n", 0, at) + 1
        raise DataError(f"not UTF-8 text (byte 0x{raw[at]:02x} at offset {at}, line {line}); save it as UTF-8",
                        path=path) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_records(path: str) -> list[tuple[int, Any]]:
    """[(record index, parsed record or DataError)] from a JSON list or a JSONL file. Errors that make
    the whole file unreadable raise DataError; a bad JSONL line becomes that record's error."""
    text = read_text(path)
    if not path.endswith((".jsonl", ".ndjson")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # several objects one per line in a ".json" file: read it as JSONL below
            if e.msg != "Extra data" or not text.lstrip().startswith("{"):
                raise DataError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", path=path) from None
        else:
            if not isinstance(data, list):
                raise DataError(f"expected a JSON list of records, got {type(data).__name__}", path=path)
            return list(enumerate(data))
    out = []
    # split on "\n" only: str.splitlines would also cut at U+2028 or U+0085 inside a JSON string,
    # which json.dumps(ensure_ascii=False) writes as they are
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((len(out), json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((len(out), DataError(f"invalid JSON on line {lineno}: {e.msg}")))
    return out


def load_json(path: str) -> Any:
    """A whole JSON file; DataError naming the file when it is missing or invalid."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON at line {e.lineno}: {e.msg}", path=path) from None


def record_id(rec: dict) -> str | None:
    """A record's explicit "id" (a string or an integer) as a string; None when it has none."""
    rid = rec.get("id")
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None


def parse_each(path: str, rows: list[tuple[int, Any]], parse_one, on_error: str,
               skips: Skips | None) -> list[tuple[int, dict]]:
    """[(index, parse_one(raw))] for the (index, raw) rows of a file. A DataError gets the file and the
    index, then raises, or with on_error="skip" is counted and the record left out.
    Duplicates: a record with an explicit "id" that parses to exactly an earlier kept record (same id,
    same content) is an error, so that no run trains twice on one record by accident; under
    on_error="skip" the later copies are skipped and counted. Records sharing an id but differing are
    kept: LLaVA's own data gives every record of an image the image's id. Records without an id are not
    compared."""
    _check_on_error(on_error)
    skips = SKIPS if skips is None else skips
    out, bad = [], 0
    kept_by_id: dict[str, list[tuple[int, dict]]] = {}
    for index, raw in rows:
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, dict):
                raise DataError(f"record should be an object, got {type(raw).__name__}")
            try:
                rec = parse_one(raw)
            except (TypeError, AttributeError, KeyError) as e:  # a shape the checks above did not foresee
                raise DataError(f"malformed record ({type(e).__name__}: {e})") from None
            rid = record_id(rec)
            if rid is not None:
                same = kept_by_id.setdefault(rid, [])
                first = next((i for i, r in same if r == rec), None)
                if first is not None:
                    raise DataError(f"duplicate of record {first} (id {rid!r}, same content); "
                                    "delete one copy or give it its own id")
                same.append((index, rec))
            out.append((index, rec))
        except DataError as e:
            e = e.at(path, index)
            if on_error == "raise":
                raise e from None
            skips.add(str(e), index)
            bad += 1
    if bad:
        print(f"{printable(path)}: skipped {bad} of {len(rows)} records (on_error='skip')", file=sys.stderr)
    return out


def _parse_file(path: str, parse_one, on_error: str, skips: Skips | None) -> list[dict]:
    """The records of a data file through parse_one, each tagged with its "source" file and "index";
    a record without an "id" is given its index."""
    return [{**rec, "id": str(index) if rec["id"] is None else rec["id"], "source": path, "index": index}
            for index, rec in parse_each(path, read_records(path), parse_one, on_error, skips)]


def get_field(rec: dict, key: str, types: type | tuple, required: bool = True, default: Any = None) -> Any:
    """A field of the right type; bools are not accepted as numbers."""
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(f"missing field '{key}'")
        return default
    v = rec[key]
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise DataError(f"field '{key}' should be {names}, got {type(v).__name__}")
    return v


def _unwrap(conversations: Any) -> Any:
    """The turns of a conversation stored as [[turn, ...]] (a list holding one list), which the official
    loaders accept and unwrap (data_utils_sft / data_utils_rm); any other value is returned as it is."""
    if isinstance(conversations, list) and conversations and isinstance(conversations[-1], list):
        if len(conversations) != 1:
            raise DataError("'conversations' should be a list of turns (or one list of turns inside a list)")
        return conversations[0]
    return conversations


def _parse_id_image(raw: dict) -> tuple[str | None, str | None]:
    rid = get_field(raw, "id", (str, int), required=False)
    image = get_field(raw, "image", str, required=False)
    if image is not None and not image.strip():
        raise DataError("field 'image' is an empty string")
    return (None if rid is None else str(rid)), image


# ----------------------------------------------------------------------------------------------------
# Readers

def read_sft(path: str, image_folder: str | None = None, on_error: str = "raise", check_images: bool = False,
             skips: Skips | None = None) -> list[dict]:
    """LLaVA SFT records -> [{"id", "image" (or None), "conversations", "source", "index"}]: the SFT mix, the
    released RL-init file (llava_reward10k-aokvqa5k.json) and prepare_data's outputs. Other fields are ignored.
    Conversations are validated and the image placeholder put first in the first user turn; a conversation
    wrapped in a one-element list is unwrapped, as the official loaders do (_unwrap). A record
    repeating an earlier one exactly (same id, same content) is refused, or skipped under on_error="skip";
    records that only share an id (LLaVA's: the image's id) are kept (parse_each)."""
    def parse(raw: dict) -> dict:
        if "conversations" not in raw:
            raise DataError("missing field 'conversations'")
        rid, image = _parse_id_image(raw)
        if check_images and image is not None:
            load_image(image_file(image_folder, image))
        conv = normalize_conversation(_unwrap(raw["conversations"]), has_image=image is not None, last="gpt")
        return {"id": rid, "image": image, "conversations": conv}
    return _parse_file(path, parse, on_error, skips)


def read_preferences(path: str, on_error: str = "raise", skips: Skips | None = None) -> list[dict]:
    """Human preference pairs (SPEC §3; the released llava_7b_v1_preference.json) -> [{"id", "image",
    "conversations", "output_1", "output_2", "preference", "hallucination", "source", "index"}, plus "facts"
    (list of str) when the record has them]. `conversations` is the context and ends with the user turn being
    answered: the file's trailing gpt turn (the slot the official loader overwrites with each output) is
    dropped; a conversation wrapped in a one-element list is unwrapped as the official loader does. Build a
    scored conversation with with_response(rec["conversations"], rec["output_1"]["value"]).
    output_k become {"value": str} (other keys of the object, e.g. "from", are dropped); preference is 1 or 2
    (the better response); hallucination a boolean (true/false or 1/0) or None. Fields the reader does not
    know are ignored.
    An exact repeat of an earlier pair with the same id is refused (skipped under on_error="skip"), so that
    no pair trains the reward model twice; pairs that only share an id are kept (parse_each)."""
    def parse(raw: dict) -> dict:
        for key in ("conversations", "output_1", "output_2", "preference"):
            if key not in raw:
                raise DataError(f"missing field '{key}'")
        rid, image = _parse_id_image(raw)
        conv = _unwrap(raw["conversations"])
        if isinstance(conv, list) and len(conv) >= 2 and isinstance(conv[-1], dict) and conv[-1].get("from") == "gpt":
            conv = conv[:-1]
        conv = normalize_conversation(conv, has_image=image is not None, last="human")
        outs = {}
        for key in ("output_1", "output_2"):
            o = raw[key]
            if not isinstance(o, dict) or not isinstance(o.get("value"), str):
                raise DataError(f"field '{key}' should be an object with a string 'value'")
            if not o["value"].strip():
                raise DataError(f"field '{key}' is an empty answer")
            outs[key] = {"value": o["value"]}
        pref = raw["preference"]
        if isinstance(pref, bool) or not isinstance(pref, int) or pref not in (1, 2):
            raise DataError(f"'preference' must be 1 or 2, got {pref!r}")
        hall = raw.get("hallucination")
        if hall is not None and not (isinstance(hall, int) and hall in (0, 1)):  # a bool, or 0 / 1
            raise DataError(f"'hallucination' should be a boolean, got {hall!r}")
        rec = {"id": rid, "image": image, "conversations": conv, **outs, "preference": pref,
               "hallucination": None if hall is None else bool(hall)}
        if raw.get("facts") is not None:   # the record's own facts; the reward model prefers them to captions
            facts = raw["facts"]
            if not isinstance(facts, list) or not all(isinstance(f, str) and f.strip() for f in facts):
                raise DataError("'facts' should be a list of non-empty strings")
            rec["facts"] = list(facts)
        return rec
    return _parse_file(path, parse, on_error, skips)


def load_captions(captions: str | dict | None) -> dict[str, list[str]]:
    """An image -> [caption, ...] map from a JSON file or a dict, validated; no file ("" or None): {}.
    The released image_to_caption.json is such a map: COCO file names ("000000123456.jpg") to their human
    captions, and "aok_" + file name ("aok_000000123456.jpg") to the facts of the image's A-OKVQA
    questions (facts_key)."""
    if not captions:
        return {}
    src = captions if isinstance(captions, str) else "captions"
    if isinstance(captions, str):
        captions = load_json(captions)
    if not isinstance(captions, dict):
        raise DataError(f"captions should map image -> list of strings, got {type(captions).__name__}", path=src)
    for k, v in captions.items():
        if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
            raise DataError(f"captions for {k!r} should be a list of strings", path=src)
    return captions


_ANSWER_TYPE_ALIASES = {"multiple_choice": "multiple_choice", "multiple-choice": "multiple_choice",
                        "mc": "multiple_choice", "yes_no": "yes_no", "yes-no": "yes_no", "yes/no": "yes_no",
                        "general": "general"}

# The released PPO file's "caption_type" (the official AnswerType enum, RLHF/data_utils/constants.py): what
# a prompt's correct answer is, as our (answer_type, answer). The official trainer also reads it to choose
# the facts entry (facts_key) and the correctness bonus.
CAPTION_TYPES: dict[int, tuple[str, str | None]] = {
    1: ("general", None), 2: ("multiple_choice", "A"), 3: ("multiple_choice", "B"), 4: ("multiple_choice", "C"),
    5: ("multiple_choice", "D"), 6: ("yes_no", "no"), 7: ("yes_no", "yes")}


def caption_type(answer_type: str, answer: str | None) -> int:
    """The caption_type (1-7) of a prompt with this answer_type and answer (inverse of CAPTION_TYPES)."""
    if answer_type == "general":
        return 1
    for ct, pair in CAPTION_TYPES.items():
        if pair == (answer_type, answer):
            return ct
    raise DataError(f"no caption_type for answer_type {answer_type!r} with answer {answer!r}")


def facts_key(image: str, answer_type: str) -> str:
    """The image_to_caption.json key of a PPO prompt's facts, by the official trainer's rule: the image
    file's number zero-padded to 12 digits + ".jpg" (COCO's train2017 names), prefixed "aok_" for
    multiple-choice prompts (A-OKVQA, whose facts are the questions' own, not the image's captions). The
    official code takes the number as int(name.split(".")[0]) and crashes on any other name; here such a
    name keys its facts by the file's base name (prefixed alike)."""
    name = os.path.basename(image)
    try:
        name = str(int(name.split(".")[0])).zfill(12) + ".jpg"
    except ValueError:
        pass
    return ("aok_" if answer_type == "multiple_choice" else "") + name


def _prompt_answer(raw: dict) -> tuple[str, str | None]:
    """(answer_type, answer) of a PPO prompt record, from "caption_type" (the released file) and / or
    "answer_type" with "answer" or "correct_choice_idx" (our own files); DataError when they disagree."""
    ct = get_field(raw, "caption_type", int, required=False)
    if ct is not None and ct not in CAPTION_TYPES:
        raise DataError(f"unknown 'caption_type' {ct}; expected 1-7 (1 general, 2-5 multiple choice answered "
                        "A-D, 6 yes/no answered no, 7 yes/no answered yes)")
    at_raw = get_field(raw, "answer_type", str, required=False)
    if at_raw is not None and at_raw.lower() not in _ANSWER_TYPE_ALIASES:
        raise DataError(f"'answer_type' must be one of {ANSWER_TYPES}, got {at_raw!r}")
    at = _ANSWER_TYPE_ALIASES[at_raw.lower()] if at_raw is not None else None
    ct_at, ct_ans = CAPTION_TYPES[ct] if ct is not None else (None, None)
    if ct is not None:
        if at is not None and at != ct_at:
            raise DataError(f"'caption_type' {ct} ({ct_at}) disagrees with 'answer_type' {at_raw!r}")
        at = ct_at
    at = at or "general"
    ans = get_field(raw, "answer", str, required=False)
    if at == "multiple_choice":
        if ans is None and raw.get("correct_choice_idx") is not None:
            idx = get_field(raw, "correct_choice_idx", int)
            if not 0 <= idx < 4:
                raise DataError(f"'correct_choice_idx' must be 0-3, got {idx}")
            ans = "ABCD"[idx]
        if ans is None and ct is None:
            raise DataError("a multiple_choice prompt needs 'answer' (the correct letter)")
        if ans is not None:
            ans = ans.strip().rstrip(".").upper()
            if ans not in ("A", "B", "C", "D"):
                raise DataError(f"multiple_choice 'answer' must be a letter A-D, got {raw.get('answer')!r}")
    elif at == "yes_no":
        if ans is None and ct is None:
            raise DataError("a yes_no prompt needs 'answer' ('yes' or 'no')")
        if ans is not None:
            ans = ans.strip().rstrip(".").lower()
            if ans not in ("yes", "no"):
                raise DataError(f"yes_no 'answer' must be 'yes' or 'no', got {raw.get('answer')!r}")
    if ct_ans is not None:
        if ans is not None and ans != ct_ans:
            raise DataError(f"'caption_type' {ct} (answer {ct_ans}) disagrees with the answer {ans!r}")
        ans = ct_ans
    return at, ans


def read_ppo_prompts(path: str, captions: str | dict | None = None, on_error: str = "raise",
                     skips: Skips | None = None) -> list[dict]:
    """PPO prompts -> [{"id", "image", "question", "facts", "answer_type", "answer", "length_multiplier",
    "source", "index"}]. Reads the released llava_ppo50k-aokvqa12k-vqa10k.json as it is ("conversations",
    "caption_type", "length_bonus") and our own files ("question", "answer_type", "answer", "facts").
    The question is the first user turn (or the "question" field) with the <image> placeholder removed:
    tokenize_prompt puts it back; the official loader, too, keeps only the first exchange.
    Answer: "caption_type" 1-7 (CAPTION_TYPES), or "answer_type" with "answer" (multiple choice: a letter
    A-D or "correct_choice_idx" 0-3; yes/no: "yes"/"no"); both given must agree (_prompt_answer).
    "length_bonus" (or "length_multiplier"), default 1.0, is the length term's multiplier.
    Facts: inline "facts", else captions[facts_key(image, answer_type)] (the official trainer's key: the
    "aok_" entry for a multiple-choice prompt), else captions[image], else captions[base name of image],
    else []; prompts whose image has no entry, and released-shape (caption_type) multiple-choice prompts
    that fall back from their "aok_" entry to the image's captions, are counted in one line on stderr.
    An exact repeat of an earlier prompt with the same id is refused (skipped under on_error="skip");
    prompts that only share an id are kept (parse_each)."""
    cap = load_captions(captions) if captions is not None else None
    no_facts = no_aok = 0

    def parse(raw: dict) -> dict:
        nonlocal no_facts, no_aok
        rid, image = _parse_id_image(raw)
        if "question" in raw:
            q = get_field(raw, "question", str)
        elif "conversations" in raw:
            conv = raw["conversations"]
            if not isinstance(conv, list) or not conv:
                raise DataError("'conversations' should be a non-empty list")
            first = conv[0]
            if not isinstance(first, dict) or first.get("from") != "human" or not isinstance(first.get("value"), str):
                raise DataError("the first turn should be {'from': 'human', 'value': str}")
            q = first["value"]
        else:
            raise DataError("missing field 'conversations' (or 'question')")
        n = q.count(IMAGE_PLACEHOLDER)
        if n > 1:
            raise DataError(f"{IMAGE_PLACEHOLDER} appears {n} times in the question")
        if n and image is None:
            raise DataError(f"{IMAGE_PLACEHOLDER} in the question but the record has no image")
        q = q.replace(IMAGE_PLACEHOLDER, "").strip()
        if not q:
            raise DataError("empty question")
        at, ans = _prompt_answer(raw)
        facts = get_field(raw, "facts", list, required=False)
        if facts is not None:
            if not all(isinstance(x, str) for x in facts):
                raise DataError("'facts' should be a list of strings")
        elif cap is not None and image is not None:
            key = facts_key(image, at)
            facts = next((cap[k] for k in (key, image, os.path.basename(image)) if k in cap), None)
            if facts is None:
                no_facts += 1
            elif at == "multiple_choice" and key not in cap and raw.get("caption_type") is not None:
                no_aok += 1  # the official trainer would stop here (KeyError); say that we did not
        facts = list(facts or [])
        key = "length_multiplier" if "length_multiplier" in raw else "length_bonus"
        lm = float(get_field(raw, key, (int, float), required=False, default=1.0))
        if not (lm >= 0 and np.isfinite(lm)):
            raise DataError(f"'{key}' must be a finite number >= 0, got {lm}")
        return {"id": rid, "image": image, "question": q, "facts": facts, "answer_type": at, "answer": ans,
                "length_multiplier": lm}
    recs = _parse_file(path, parse, on_error, skips)
    if no_facts:
        print(f"{printable(path)}: {no_facts} prompt(s) have an image missing from the captions map "
              "(empty facts)", file=sys.stderr)
    if no_aok:
        print(f"{printable(path)}: {no_aok} multiple-choice prompt(s) have no 'aok_' facts entry; their image's "
              "captions are used", file=sys.stderr)
    return recs


MMHAL_TYPES = ("attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other")


def read_mmhal(path: str, on_error: str = "raise", skips: Skips | None = None) -> list[dict]:
    """MMHal-Bench items (SPEC §6), the one reader of the template (eval_mmhal.py, prepare_data check):
    every field of the file kept and nothing added but model_answer ("" when absent), so the answers file
    is the template's format again (a tiny-world item keeps its scene); the benchmark's fields checked.
    The benchmark's items have no "id"; an item that has one and repeats an earlier item exactly is refused
    (skipped under on_error="skip"), as it would be scored twice (parse_each)."""
    def parse(raw: dict) -> dict:
        for k in ("question_type", "question_topic", "image_id", "image_src", "question", "gt_answer"):
            get_field(raw, k, str)
        content = get_field(raw, "image_content", list)
        if not all(isinstance(c, str) for c in content):
            raise DataError("'image_content' should be a list of strings")
        if raw["question_type"] not in MMHAL_TYPES:
            raise DataError(f"unknown question_type {raw['question_type']!r}")
        return {**raw, "model_answer": get_field(raw, "model_answer", str, required=False, default="")}
    return [rec for _, rec in parse_each(path, read_records(path), parse, on_error, skips)]


# ----------------------------------------------------------------------------------------------------
# Datasets

class _ServeOrSkip:
    """__getitem__ for datasets whose items can fail to load (a broken image): raise the DataError, or with
    on_error="skip" count it and serve the next record instead, so batch shapes stay as planned."""

    def __init__(self, image_folder: str | None, image_size: int, on_error: str, skips: Skips | None):
        _check_on_error(on_error)
        self.image_folder, self.image_size, self.on_error = image_folder, image_size, on_error
        self.skips = SKIPS if skips is None else skips

    def _item(self, i: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        for k in range(len(self)):
            try:
                return self._item((i + k) % len(self))
            except DataError as e:
                if self.on_error == "raise":
                    raise
                self.skips.add(str(e))
                print(f"warning: {e}; serving the next record instead", file=sys.stderr)
        raise DataError("every record failed to load")

    def _image(self, rec: dict) -> torch.Tensor | None:
        """(3, S, S) image of a record, or None; DataError naming the file, record and image."""
        if rec.get("image") is None:
            return None
        path = image_file(self.image_folder, rec["image"])
        try:
            return image_tensor(path, self.image_size)
        except DataError as e:
            raise e.at(rec.get("source"), rec.get("index"), path) from None


class SFTDataset(_ServeOrSkip):
    """Tokenised conversations with their images. Tokenisation runs once up front to drop (and count, in
    `dropped` and the Skips) the records that truncation to max_len would empty, and to count in `truncated`
    those it cuts but keeps; __getitem__ tokenises again (cheap, and keeps memory flat on large sets) and
    loads the image. Broken images are found before training by read_sft(check_images=True) or
    `prepare_data.py check`."""

    def __init__(self, records: list[dict], tok: Tokenizer, template: Template, image_folder: str | None,
                 image_size: int, num_image_tokens: int, max_len: int | None, on_error: str = "raise",
                 skips: Skips | None = None):
        super().__init__(image_folder, image_size, on_error, skips)
        self.tok, self.template, self.num_image_tokens, self.max_len = tok, template, num_image_tokens, max_len
        self.records, self.dropped, self.truncated = [], 0, 0
        for i, rec in enumerate(records):
            try:
                if rec.get("image") is not None and not any(IMAGE_PLACEHOLDER in t["value"] for t in rec["conversations"]):
                    raise DataError("the record has an image but no <image> placeholder (read it with read_sft)")
                ids, _ = tokenize_conversation(rec["conversations"], tok, template, num_image_tokens)
                cut = max_len is not None and text_len(ids) > max_len
                if cut:  # TruncationError when the cut would leave no answer
                    tokenize_conversation(rec["conversations"], tok, template, num_image_tokens, max_len)
            except DataError as e:
                e = e.at(rec.get("source"), rec.get("index", i))
                if isinstance(e, TruncationError):
                    self.dropped += 1  # too long is not bad data: always dropped, never raised
                elif on_error == "raise":
                    raise e from None
                self.skips.add(str(e))
                continue
            self.truncated += int(cut)
            self.records.append(rec)
        if len(self.records) < len(records) or self.truncated:
            print(f"SFTDataset: kept {len(self.records)} of {len(records)} records "
                  f"({self.dropped} dropped by truncation to max_len={max_len}, {self.truncated} kept truncated; "
                  f"the image counted as one id)", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.records)

    def _item(self, i: int) -> dict:
        rec = self.records[i]
        ids, labels = tokenize_conversation(rec["conversations"], self.tok, self.template, self.num_image_tokens,
                                            self.max_len)
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "image": self._image(rec), "id": rec["id"]}


class PromptDataset(_ServeOrSkip):
    """PPO / evaluation prompts (records from read_ppo_prompts or read_mmhal): tokenised prompt ending at
    "ASSISTANT:", the image, and "index" into `records` for the facts and answers. Prompts longer than
    max_prompt_len (text_len; SPEC §5/§9: <= 128 with the image as one id) are dropped, counted in `dropped`."""

    def __init__(self, records: list[dict], tok: Tokenizer, template: Template, image_folder: str | None,
                 image_size: int, num_image_tokens: int, max_prompt_len: int | None = None,
                 on_error: str = "raise", skips: Skips | None = None):
        super().__init__(image_folder, image_size, on_error, skips)
        self.records, self.prompts, self.keep, self.dropped = records, [], [], 0
        for i, rec in enumerate(records):
            ids = tokenize_prompt(rec["question"], tok, template, num_image_tokens, has_image=rec.get("image") is not None)
            if max_prompt_len is not None and text_len(ids) > max_prompt_len:
                self.dropped += 1
                continue
            self.prompts.append(ids)
            self.keep.append(i)
        if self.dropped:
            print(f"PromptDataset: dropped {self.dropped} of {len(records)} prompts longer than {max_prompt_len} ids "
                  f"(the image counted as one)", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.keep)

    def _item(self, i: int) -> dict:
        rec = self.records[self.keep[i]]
        return {"input_ids": torch.tensor(self.prompts[i], dtype=torch.long), "image": self._image(rec),
                "index": self.keep[i]}


# ----------------------------------------------------------------------------------------------------
# Batching

def _pad(seqs, pad_value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not len(seqs):
        raise ValueError("cannot pad an empty batch")
    seqs = [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in seqs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        real = slice(T - len(s), T) if left else slice(0, len(s))
        ids[b, real] = torch.tensor(s, dtype=torch.long)
        mask[b, real] = 1
    return ids, mask


def right_pad(seqs, pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) values padded on the right with pad_value, and the (B, T) attention mask (1 = real)."""
    return _pad(seqs, pad_value, left=False)


def left_pad(seqs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded on the left (generation appends on the right), and the (B, T) attention mask."""
    return _pad(seqs, pad_id, left=True)


def _stack_images(batch: list[dict], ids: torch.Tensor) -> torch.Tensor | None:
    """(N, 3, S, S) images of the rows holding image tokens, in row order. A row with image tokens and
    no image (or the reverse) is an error: the model would splice the wrong features."""
    images = []
    for b, item in enumerate(batch):
        has_tokens = bool((ids[b] == IMAGE_TOKEN_INDEX).any())
        img = item.get("image")
        if has_tokens != (img is not None):
            raise DataError(f"batch row {b}: " + ("image tokens but no image" if has_tokens else "an image but no image tokens"))
        if img is not None:
            images.append(img)
    if not images:
        return None
    if any(im.shape != images[0].shape for im in images):
        raise DataError(f"images of different shapes in one batch: {sorted({tuple(im.shape) for im in images})}")
    return torch.stack(images)


def collate_right(batch: list[dict], pad_id: int) -> dict:
    """Training batch: input_ids (B, T) right-padded with pad_id, labels (B, T) padded with IGNORE_INDEX,
    attention_mask (B, T), images (N, 3, S, S) or None."""
    ids, mask = right_pad([b["input_ids"] for b in batch], pad_id)
    labels, _ = right_pad([b["labels"] for b in batch], IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "images": _stack_images(batch, ids)}


def collate_left(batch: list[dict], pad_id: int) -> dict:
    """Generation batch: input_ids (B, T) left-padded, attention_mask (B, T), images (N, 3, S, S) or None,
    and "index" (B,) when the items carry one (PromptDataset)."""
    ids, mask = left_pad([b["input_ids"] for b in batch], pad_id)
    out = {"input_ids": ids, "attention_mask": mask, "images": _stack_images(batch, ids)}
    if all("index" in b for b in batch):
        out["index"] = torch.tensor([b["index"] for b in batch], dtype=torch.long)
    return out


# ----------------------------------------------------------------------------------------------------
# Sampler: sharded, deterministic from (seed, epoch), resumable mid-epoch

class ResumableSampler:
    """Each epoch's order is a permutation drawn from (seed, epoch); rank r takes every world_size-th
    index of what remains. `position` counts indices consumed across all ranks, so a checkpointed state
    resumes the same remaining order, even with a different world size. drop_last=False pads the tail
    by wrapping to the start of the order so every rank gets the same count."""

    def __init__(self, num_items: int, rank: int | None = None, world_size: int | None = None, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        ddp = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if ddp else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if ddp else 0)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.num_items, self.seed, self.shuffle, self.drop_last = num_items, seed, shuffle, drop_last
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order): drawn once per epoch

    def order(self, epoch: int) -> np.ndarray:
        """The global order of an epoch (all ranks)."""
        if self._order is None or self._order[0] != epoch:
            perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_items) if self.shuffle
                    else np.arange(self.num_items))
            self._order = (epoch, perm)
        return self._order[1]

    def _remaining(self) -> np.ndarray:
        """This rank's indices still to come in the current epoch."""
        order = self.order(self.epoch)
        rest, w = order[self.position:], self.world_size
        if self.drop_last:
            rest = rest[:len(rest) // w * w]
        elif len(rest) % w:
            rest = np.concatenate([rest, np.resize(order, w - len(rest) % w)])  # np.resize repeats the order
        return rest[self.rank::w]

    def take(self, n: int) -> list[int]:
        """This rank's next n indices, running on into the next epoch when one ends: how the training
        loops draw a batch. The state after it is what a checkpoint saves."""
        out: list[int] = []
        while len(out) < n:
            rest = self._remaining()
            if not len(rest):
                if self.position == 0:
                    raise ValueError(f"the sampler yields nothing ({self.num_items} items over {self.world_size} ranks)")
                self.epoch, self.position = self.epoch + 1, 0
                continue
            k = min(n - len(out), len(rest))
            out += [int(i) for i in rest[:k]]
            # every rank takes k, so k * world_size indices of the order are consumed
            self.position = min(self.num_items, self.position + k * self.world_size)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": self.num_items}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_items"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]} but this sampler has {getattr(self, key)}: "
                                 "the order would differ")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ----------------------------------------------------------------------------------------------------
# Loading off the critical path: batches read, decoded and collated ahead in DataLoader workers

class _Batches(torch.utils.data.Dataset):
    """What a worker makes of one planned batch: key (k, epoch, indices) -> (key, collated batch or None,
    the skips counted while reading it, the UserError it raised or None). Errors and skips come back as
    values: a worker's Skips is its own copy, and the training process re-raises the error as it was."""

    def __init__(self, ds, collate: Callable[[list], Any], setup: Callable[[Any, int, int], None] | None):
        self.ds, self.collate, self.setup = ds, collate, setup

    def __getitem__(self, key: tuple[int, int, tuple[int, ...]]):
        k, epoch, idx = key
        if self.setup is not None:
            self.setup(self.ds, epoch, k)
        skips = getattr(self.ds, "skips", None)
        n0 = skips.count if skips is not None else 0
        try:
            batch = self.collate([self.ds[i] for i in idx])
        except UserError as e:
            return key, None, [], e
        counted = list(zip(skips.reasons[n0:], skips.indices[n0:])) if skips is not None else []
        return key, batch, counted, None


def _identity(x: Any) -> Any:
    return x


def _loader(batches: _Batches, keys, workers: int, prefetch: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    # its own generator: making an iterator draws the workers' base seed, which must not move the global
    # RNG that checkpoints save (a resumed run would draw differently from the uninterrupted one)
    np.random.seed   # noqa: B018  numpy imports np.random lazily; imported in a forked worker, it can
    #                  meet an import lock another thread held at the fork (KeyError): import it here first
    return torch.utils.data.DataLoader(batches, sampler=keys, batch_size=None, collate_fn=_identity,
                                       num_workers=workers, prefetch_factor=prefetch if workers else None,
                                       pin_memory=pin_memory, generator=torch.Generator())


def _received(out: tuple, ds, in_worker: bool) -> Any:
    """A _Batches result in the training process: its skips counted in ds.skips, its error raised."""
    _, batch, counted, err = out
    skips = getattr(ds, "skips", None)
    if in_worker and skips is not None:
        for reason, index in counted:
            skips.add(reason, index)
    if err is not None:
        raise err
    return batch


class _Plan:
    """The keys a BatchLoader's workers read: a copy of the training sampler, taking n at a time ahead."""

    def __init__(self, lookahead: "ResumableSampler", n: int):
        self.lookahead, self.n = lookahead, n

    def __iter__(self):
        k = 0
        while True:
            idx = self.lookahead.take(self.n)
            yield k, self.lookahead.epoch, tuple(idx)
            k += 1


class BatchLoader:
    """`next()` is collate([ds[i] for i in sampler.take(n)]), what the training loops did between steps,
    with the reading, image decoding, preprocessing and collation done ahead in `workers` DataLoader
    processes, `prefetch` batches each, into pinned memory when pin_memory (a CUDA run). Exact resume: the
    workers follow a copy of the sampler made at the first next(), while `sampler` itself, the one
    checkpoints save, advances only as batches are handed out, so its position is what was trained, not
    what was prefetched; each batch handed out is checked to be the one the sampler drew.
    setup(ds, epoch, k), when given, runs before batch k's items are read (k counts from 0 at the first
    next(); epoch: the sampler's after that batch's take), in the process that reads them: how a dataset
    whose items depend on the step or the epoch (reward_model.PairData's facts order) learns them.
    workers 0 reads in this process, at next(), as before. Skips counted and DataErrors raised while
    reading arrive in ds.skips and at next() as if read here."""

    def __init__(self, ds, sampler: "ResumableSampler", n: int, collate: Callable[[list], Any], workers: int = 2,
                 prefetch: int = 2, pin_memory: bool = False, setup: Callable[[Any, int, int], None] | None = None):
        if workers < 0 or prefetch < 1:
            raise ValueError(f"workers {workers} must be >= 0 and prefetch {prefetch} >= 1")
        self.ds, self.sampler, self.n, self.workers = ds, sampler, n, workers
        self._batches = _Batches(ds, collate, setup)
        self._prefetch, self._pin = prefetch, pin_memory
        self._it, self._k = None, 0

    def next(self) -> Any:
        if self.workers and self._it is None:   # the copy is of the sampler as resumed, before this take
            plan = _Plan(copy.deepcopy(self.sampler), self.n)
            self._it = iter(_loader(self._batches, plan, self.workers, self._prefetch, self._pin))
        idx = tuple(self.sampler.take(self.n))
        if not self.workers:
            out = self._batches[(self._k, self.sampler.epoch, idx)]
        else:
            out = next(self._it)
            if tuple(out[0][2]) != idx:
                raise RuntimeError(f"BatchLoader: the workers read items {list(out[0][2])[:8]} but the sampler drew "
                                   f"{list(idx)[:8]}: the sampler was moved outside this loader")
        self._k += 1
        return _received(out, self.ds, bool(self.workers))

    def close(self) -> None:
        """Stop the workers (they also stop when the loader is garbage collected)."""
        self._it = None


class FixedBatches:
    """Iterable over collate([ds[i] for i in b]) for each index list b of `index_lists`, read when iterated
    (in `workers` DataLoader processes ahead of the consumer, or here with 0), never all held at once: an
    evaluation set's batches, read again at every evaluation rather than kept in memory all run."""

    def __init__(self, ds, index_lists: list[list[int]], collate: Callable[[list], Any], workers: int = 2,
                 prefetch: int = 2, pin_memory: bool = False):
        self.ds, self.workers = ds, workers
        self._keys = [(k, 0, tuple(b)) for k, b in enumerate(index_lists)]
        self._batches = _Batches(ds, collate, None)
        self._prefetch, self._pin = prefetch, pin_memory

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):
        if not self.workers or not self._keys:
            for key in self._keys:
                yield _received(self._batches[key], self.ds, False)
            return
        workers = min(self.workers, len(self._keys))
        for out in _loader(self._batches, self._keys, workers, self._prefetch, self._pin):
            yield _received(out, self.ds, True)
