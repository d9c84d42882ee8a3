"""Tests for data.py: template and masking, tokenizer, CLIP preprocessing against transformers, readers,
converters, batching, the resumable sampler and every bad-input case in both error modes.
Everything is built here: a tiny sentencepiece model trained in a temp dir, images drawn with PIL."""
import json
import os
import pickle
import random
import socket
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
from data import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, DataError, ResumableSampler, SFTDataset, Skips, Template,  # noqa: E402
                  Tokenizer, TruncationError, collate_left, collate_right, encode_text, left_pad, right_pad,
                  tokenize_conversation, tokenize_prompt)

T = Template()
N_IMG = 4  # image tokens per image in these tests

SINGLE = [{"from": "human", "value": "<image>\nWhat color is the cat?"},
          {"from": "gpt", "value": "The cat is red."}]
MULTI = [{"from": "human", "value": "What is in the picture?\n<image>"},
         {"from": "gpt", "value": "A dog and a cat."},
         {"from": "human", "value": "How many animals are there?"},
         {"from": "gpt", "value": "There are 2 animals.\nOne is on the left."},
         {"from": "human", "value": "Is the dog blue?"},
         {"from": "gpt", "value": "No."}]
TEXT_ONLY = [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there!"}]


# ----------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A LLaMA-like sentencepiece model (BPE, byte fallback, identity normalisation) in a folder."""
    d = tmp_path_factory.mktemp("tok")
    rnd = random.Random(0)
    words = ("the a cat dog red blue green circle square triangle is are there how many what color yes no "
             "left right top bottom image picture animals one two in on of and say hello describe photo "
             "caption answer question option correct because USER ASSISTANT").split()
    lines = [data.VICUNA_V1_SYSTEM] * 50 + [
        " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 14))) + rnd.choice([".", "?", "!", ":", "\n"])
        for _ in range(3000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return str(d)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(tok_dir)


@pytest.fixture(scope="module")
def clip():
    import transformers
    transformers.logging.set_verbosity_error()
    from transformers import CLIPImageProcessor

    def make(S):
        return CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    return make


def _draw(path, size=(12, 9), color=(200, 30, 30)):
    img = Image.new("RGB", size, (20, 120, 20))
    img.paste(color, (2, 2, size[0] // 2 + 1, size[1] // 2 + 1))
    img.save(path)
    return path


def _write(path, obj):
    with open(path, "w") as f:
        if str(path).endswith(".jsonl"):
            for r in obj:
                f.write(json.dumps(r) + "\n")
        else:
            json.dump(obj, f)
    return str(path)


def _spans(labels):
    """Contiguous runs of supervised positions as (start, end)."""
    spans, start = [], None
    for i, lab in enumerate(list(labels) + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


# ----------------------------------------------------------------------------------------------------
# template, tokenizer, masking

def test_render_vicuna_v1():
    sys_ = data.VICUNA_V1_SYSTEM
    assert T.render(SINGLE) == f"{sys_} USER: <image>\nWhat color is the cat? ASSISTANT: The cat is red.</s>"
    assert T.render(SINGLE[:1], add_generation_prompt=True) == f"{sys_} USER: <image>\nWhat color is the cat? ASSISTANT:"
    assert T.render(TEXT_ONLY[:1] + TEXT_ONLY[1:]) == f"{sys_} USER: Say hello. ASSISTANT: Hello there!</s>"
    conv = data.normalize_conversation(MULTI)
    assert T.render(conv) == (f"{sys_} USER: <image>\nWhat is in the picture? ASSISTANT: A dog and a cat.</s>"
                              "USER: How many animals are there? ASSISTANT: There are 2 animals.\nOne is on the left.</s>"
                              "USER: Is the dog blue? ASSISTANT: No.</s>")
    # the system sentence is a setting (checkpoint compatibility)
    assert Template(system="Be brief.").render(TEXT_ONLY).startswith("Be brief. USER: Say hello.")


def test_tokenizer_ids_decode_and_pickle(tok, tok_dir):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 400)
    same = Tokenizer(os.path.join(tok_dir, "tokenizer.model"))
    text = "How many animals are there?\nTwo."
    ids = tok.encode(text)
    assert ids == same.encode(text) and ids and 1 not in ids and 2 not in ids
    assert tok.decode(ids) == text
    # negative ids (image / ignore), pad and bos are dropped
    assert tok.decode([1, IMAGE_TOKEN_INDEX, IGNORE_INDEX] + ids + [0]) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ids
    with pytest.raises(FileNotFoundError):
        Tokenizer(os.path.join(tok_dir, "nope"))


def test_encode_text(tok):
    ids = encode_text("<image>\nHi</s>USER: ok", tok, N_IMG)
    assert ids == [1] + [IMAGE_TOKEN_INDEX] * N_IMG + tok.encode("\nHi") + [2] + tok.encode("USER: ok")
    assert encode_text("a cat", tok, N_IMG, bos=False) == tok.encode("a cat")


@pytest.mark.parametrize("conv", [SINGLE, MULTI, TEXT_ONLY], ids=["single", "multi", "text_only"])
def test_masking_supervises_exactly_the_answers(tok, conv):
    ids, labels = tokenize_conversation(conv, tok, T, N_IMG)
    assert len(ids) == len(labels) and ids[0] == tok.bos_id
    answers = [t["value"] for t in conv if t["from"] == "gpt"]
    spans = _spans(labels)
    assert len(spans) == len(answers)
    for (s, e), ans in zip(spans, answers):
        assert ids[s:e] == tok.encode(ans) + [tok.eos_id]  # the answer and its </s>, nothing more
        assert labels[s:e] == ids[s:e]
        assert tok.decode(ids[s:e]) == ans
        assert tok.decode(ids[:s]).endswith("ASSISTANT:")  # what precedes is the prompt
    n_sup = sum(lab != IGNORE_INDEX for lab in labels)
    assert n_sup == sum(len(tok.encode(a)) + 1 for a in answers)
    img = [i for i, x in enumerate(ids) if x == IMAGE_TOKEN_INDEX]
    has_image = "<image>" in conv[0]["value"]
    assert len(img) == (N_IMG if has_image else 0)
    if img:
        assert img == list(range(img[0], img[0] + N_IMG)) and all(labels[i] == IGNORE_INDEX for i in img)
    # LLaVA tokenises the whole rendered string (cut at <image> and </s>): same ids for a tokenizer
    # that splits at whitespace, as this one does
    assert encode_text(T.render(data.normalize_conversation(conv)), tok, N_IMG) == ids


@pytest.mark.parametrize("conv", [SINGLE, MULTI, TEXT_ONLY], ids=["single", "multi", "text_only"])
def test_prompt_is_prefix_of_training_ids(tok, conv):
    ids, labels = tokenize_conversation(conv, tok, T, N_IMG)
    has_image = "<image>" in conv[0]["value"]
    # the PPO reader hands over the question without the placeholder; tokenize_prompt puts it back
    question = conv[0]["value"].replace("<image>", "").strip()
    p = tokenize_prompt(question, tok, T, N_IMG, has_image=has_image)
    assert ids[:len(p)] == p
    assert all(lab == IGNORE_INDEX for lab in labels[:len(p)]) and labels[len(p)] != IGNORE_INDEX
    assert tok.decode(p).endswith("ASSISTANT:")
    # passing the question with its placeholder gives the same prompt
    assert tokenize_prompt(conv[0]["value"], tok, T, N_IMG, has_image=has_image) == p


def test_tokenize_prompt_image_handling(tok):
    with_img = tokenize_prompt("What is this?", tok, T, N_IMG)
    assert with_img.count(IMAGE_TOKEN_INDEX) == N_IMG
    no_img = tokenize_prompt("What is this?", tok, T, N_IMG, has_image=False)
    assert IMAGE_TOKEN_INDEX not in no_img
    assert no_img == encode_text(f"{data.VICUNA_V1_SYSTEM} USER: What is this? ASSISTANT:", tok, N_IMG)
    with pytest.raises(DataError, match="has_image=False"):
        tokenize_prompt("<image>\nWhat?", tok, T, N_IMG, has_image=False)
    with pytest.raises(DataError, match="2 times"):
        tokenize_prompt("<image> <image> What?", tok, T, N_IMG)


def test_plain_template(tok):
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red cat"}]
    ids, labels = tokenize_conversation(conv, tok, data.PLAIN_TEMPLATE, N_IMG)
    assert ids == [1] + [IMAGE_TOKEN_INDEX] * N_IMG + tok.encode("a red cat\n")
    assert labels[:1 + N_IMG] == [IGNORE_INDEX] * (1 + N_IMG) and labels[1 + N_IMG:] == ids[1 + N_IMG:]


def test_truncation(tok):
    ids, _ = tokenize_conversation(SINGLE, tok, T, N_IMG)
    prompt = tokenize_prompt("What color is the cat?", tok, T, N_IMG)
    prompt_len, prompt_text = len(prompt), data.text_len(prompt)     # max_len counts the image as one id
    assert prompt_text == prompt_len - N_IMG + 1
    # cut inside the answer: the kept part stays supervised
    ids3, labels3 = tokenize_conversation(SINGLE, tok, T, N_IMG, max_len=prompt_text + 2)
    assert ids3 == ids[:prompt_len + 2] and [x for x in labels3 if x != IGNORE_INDEX] == ids[prompt_len:prompt_len + 2]
    with pytest.raises(TruncationError, match="no supervised"):
        tokenize_conversation(SINGLE, tok, T, N_IMG, max_len=prompt_text)
    first_img = ids.index(IMAGE_TOKEN_INDEX)
    with pytest.raises(TruncationError, match="image tokens"):       # the image would be id first_img + 1
        tokenize_conversation(SINGLE, tok, T, N_IMG, max_len=first_img)
    with pytest.raises(TruncationError, match="no supervised"):      # the whole image, nothing after it
        tokenize_conversation(SINGLE, tok, T, N_IMG, max_len=first_img + 1)
    # a dataset drops (and counts) such samples in both error modes
    recs = [{"id": "a", "image": None, "conversations": TEXT_ONLY},
            {"id": "b", "image": None,
             "conversations": [{"from": "human", "value": "how many " * 40}, {"from": "gpt", "value": "two"}]}]
    max_len = len(tokenize_conversation(TEXT_ONLY, tok, T, N_IMG)[0])
    for mode in ("raise", "skip"):
        skips = Skips()
        ds = SFTDataset(recs, tok, T, None, 16, N_IMG, max_len, on_error=mode, skips=skips)
        assert len(ds) == 1 and ds.dropped == 1 and skips.count == 1 and "record 1" in skips.reasons[0]
        assert ds[0]["input_ids"].tolist() == tokenize_conversation(TEXT_ONLY, tok, T, N_IMG)[0]


def _question_with_prompt_len(tok, target):
    """A question whose PPO prompt is `target` ids long with the image counted as one."""
    for j in range(200):
        q = "What color is the cat?" + " a" * j
        if data.text_len(tokenize_prompt(q, tok, T, 1)) == target:
            return q
    raise AssertionError(f"no question gives a {target}-id prompt")


@pytest.mark.parametrize("n_img", [256, 576])
def test_prompt_dataset_counts_the_image_as_one_id(tok, n_img):
    # the paper's geometry (SPEC §5/§9): max_prompt_len 128 counts the image as a single placeholder
    short = "What color is the cat?"
    recs = [{"id": "short", "image": "a.png", "question": short},
            {"id": "at128", "image": "a.png", "question": _question_with_prompt_len(tok, 128)},
            {"id": "at129", "image": "a.png", "question": _question_with_prompt_len(tok, 129)},
            {"id": "text", "image": None, "question": "Say hello."}]
    ds = data.PromptDataset(recs, tok, T, None, 16, n_img, max_prompt_len=128)
    assert ds.keep == [0, 1, 3] and ds.dropped == 1
    assert data.text_len(tokenize_prompt(short, tok, T, n_img)) < 128
    for ids, i in zip(ds.prompts, ds.keep):
        assert ids.count(IMAGE_TOKEN_INDEX) == (n_img if recs[i]["image"] else 0)
    assert len(ds.prompts[1]) == 128 + n_img - 1          # the expanded prompt is far longer than 128


def _long_conv(answer_ids):
    """An image conversation whose answer is about answer_ids ids long (7 per sentence)."""
    answer = "the cat is red. " * (answer_ids // 7 + 1)
    return [{"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": answer}]


@pytest.mark.parametrize("n_img", [256, 576])
def test_sft_max_len_counts_the_image_as_one_id(tok, n_img, tmp_path, capsys):
    # SPEC §9: SFT's model_max_length 1280 counts text ids, the image as one
    fits = _long_conv(1000)
    full, full_labels = tokenize_conversation(fits, tok, T, n_img)
    assert data.text_len(full) <= 1280 < len(full)
    ids, labels = tokenize_conversation(fits, tok, T, n_img, max_len=1280)
    assert ids == full and labels == full_labels                          # kept whole, not truncated
    long = _long_conv(1400)
    lfull, _ = tokenize_conversation(long, tok, T, n_img)
    assert data.text_len(lfull) > 1280
    ids, labels = tokenize_conversation(long, tok, T, n_img, max_len=1280)
    # cut at 1280 ids so counted, never through the image; the kept answer stays supervised
    assert data.text_len(ids) == 1280 and len(ids) == 1280 + n_img - 1 and ids == lfull[:len(ids)]
    assert ids.count(IMAGE_TOKEN_INDEX) == n_img and labels[-1] == ids[-1]
    # a record cut so early that no answer is left is dropped; truncated-but-kept records are counted
    prompt = tokenize_prompt("Describe the picture.", tok, T, n_img)
    recs = [{"id": "fits", "image": None, "conversations": fits}, {"id": "long", "image": None, "conversations": long}]
    capsys.readouterr()
    ds = SFTDataset(recs, tok, T, None, 16, n_img, 1280)
    assert len(ds) == 2 and ds.dropped == 0 and ds.truncated == 1
    assert "kept 2 of 2 records (0 dropped by truncation to max_len=1280, 1 kept truncated" in capsys.readouterr().err
    ds = SFTDataset(recs, tok, T, None, 16, n_img, data.text_len(prompt), skips=Skips())
    assert len(ds) == 0 and ds.dropped == 2 and ds.truncated == 0
    # `data.py check --max_len` counts the same way
    path = _write(tmp_path / "sft.json", [{"id": "fits", "image": "a.png", "conversations": fits},
                                          {"id": "long", "image": "a.png", "conversations": long}])
    res = data.check_dataset(path, None, tok, num_image_tokens=n_img, max_len=1280, check_images=False,
                             out=open(os.devnull, "w"))
    assert res["too_long"] == 1 and res["lengths"] == [len(full), len(lfull)]


# ----------------------------------------------------------------------------------------------------
# images

_EXIF_ROT = {2: lambda a: a[:, ::-1], 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1),
             8: lambda a: np.rot90(a, 1)}


def _image_case(kind, tmp_path, rng):
    """Write an image of the given kind; return (path, the upright 8-bit RGB pixels it should give)."""
    from transformers.image_transforms import convert_to_rgb  # transformers' own mode conversion

    def rand(h, w, c):
        return rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)
    p = str(tmp_path / f"{kind}.png")
    if kind == "RGB":
        Image.fromarray(rand(23, 41, 3)).save(p)
    elif kind == "RGB_big":
        Image.fromarray(rand(333, 500, 3)).save(p)
    elif kind == "RGB_1px_wide":
        Image.fromarray(rand(37, 1, 3)).save(p)
    elif kind == "RGB_1px_tall":
        Image.fromarray(rand(1, 64, 3)).save(p)
    elif kind == "RGB_1x1":
        Image.fromarray(rand(1, 1, 3)).save(p)
    elif kind in ("RGBA", "LA"):
        Image.fromarray(rand(17, 40, 4)).convert(kind).save(p)
    elif kind == "L":
        Image.fromarray(rand(30, 1, 0)).save(p)
    elif kind == "1":
        Image.fromarray(rand(15, 22, 0)).convert("1").save(p)
    elif kind == "P":
        Image.fromarray(rand(20, 33, 3)).quantize(16).save(p)
    elif kind == "P_transparent":
        Image.fromarray(rand(20, 33, 3)).quantize(16).save(p, transparency=3)
    elif kind == "CMYK":
        p = str(tmp_path / "cmyk.tif")
        Image.fromarray(rand(26, 18, 4), "CMYK").save(p)
    elif kind == "I16":
        a16 = rng.integers(0, 65536, (26, 19), dtype=np.uint16)
        Image.fromarray(a16).save(p)
        assert Image.open(p).mode == "I;16"
        # 16 bits -> 8 bits by scaling, computed directly
        return p, np.repeat(np.round(a16 / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    elif kind.startswith("EXIF"):
        orient = int(kind.split("_")[1])
        p = str(tmp_path / f"{kind}.jpg")
        exif = Image.Exif()
        exif[0x0112] = orient
        Image.fromarray(rand(20, 30, 3)).save(p, exif=exif, quality=95)
        stored = np.asarray(Image.open(p).convert("RGB"))  # the pixels as stored, not rotated
        return p, np.ascontiguousarray(_EXIF_ROT[orient](stored))
    else:
        raise ValueError(kind)
    return p, convert_to_rgb(Image.open(p), return_numpy=True)


def _pad_square(rgb, fill):
    h, w, _ = rgb.shape
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = fill
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = rgb
    return canvas


IMAGE_KINDS = ["RGB", "RGB_big", "RGB_1px_wide", "RGB_1px_tall", "RGB_1x1", "RGBA", "LA", "L", "1", "P",
               "P_transparent", "CMYK", "I16", "EXIF_2", "EXIF_3", "EXIF_6", "EXIF_8"]


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_preprocess_matches_clip_image_processor(kind, tmp_path, clip):
    rng = np.random.default_rng(IMAGE_KINDS.index(kind))
    path, rgb = _image_case(kind, tmp_path, rng)
    img = data.load_image(path)
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), rgb)
    for S in (24, 224):
        proc = clip(S)
        fill = tuple(int(round(m * 255)) for m in proc.image_mean)
        ref = proc(Image.fromarray(_pad_square(rgb, fill)), return_tensors="np")["pixel_values"][0]
        ours = data.preprocess_image(img, S)
        assert ours.dtype == torch.float32 and tuple(ours.shape) == (3, S, S)
        assert np.abs(ours.numpy() - ref).max() <= 1e-5
        # without padding: transformers' shortest-edge resize + centre crop on the raw image
        ref2 = proc(Image.fromarray(rgb), return_tensors="np")["pixel_values"][0]
        assert np.abs(data.preprocess_image(img, S, pad_to_square=False).numpy() - ref2).max() <= 1e-5


def test_16bit_is_scaled_not_clipped(tmp_path, clip):
    a16 = np.full((8, 8), 30000, np.uint16)
    Image.fromarray(a16).save(tmp_path / "g.png")
    img = data.load_image(str(tmp_path / "g.png"))
    assert np.asarray(img)[0, 0].tolist() == [117, 117, 117]  # round(30000 / 257); PIL's convert gives 255


def test_expand2square_centres():
    img = Image.new("RGB", (3, 6), (255, 0, 0))
    sq = data.expand2square(img, (1, 2, 3))
    a = np.asarray(sq)
    assert sq.size == (6, 6)
    assert (a[:, 1:4] == [255, 0, 0]).all() and (a[:, [0, 4, 5]] == [1, 2, 3]).all()
    assert data.expand2square(img.resize((5, 5)), (0, 0, 0)).size == (5, 5)


def _png_header_only(w, h):
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))  # 10 gigapixels declared in 60 bytes
    with pytest.raises(DataError, match="bomb") as e:
        data.load_image(str(bomb))
    assert str(bomb) in str(e.value)
    small = _draw(str(tmp_path / "small.png"), (20, 20))
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(DataError, match="MAX_IMAGE_PIXELS"):
        data.load_image(small)


def test_missing_corrupt_truncated_images(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        data.load_image(str(tmp_path / "nope.png"))
    assert "nope.png" in str(e.value)
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(DataError, match="cannot read image"):
        data.load_image(str(tmp_path / "junk.png"))
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    raw = full.read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(DataError, match="cannot read image"):
        data.load_image(str(tmp_path / "cut.png"))


# ----------------------------------------------------------------------------------------------------
# readers

@pytest.mark.parametrize("ext", [".json", ".jsonl"])
def test_read_sft(tmp_path, ext):
    recs = [{"id": 7, "image": "a.png", "conversations": MULTI},
            {"image": "b.png", "conversations": [{"from": "human", "value": "Describe it."}, SINGLE[1]]},
            {"id": "t", "conversations": TEXT_ONLY}]
    out = data.read_sft(_write(tmp_path / f"sft{ext}", recs))
    assert [r["id"] for r in out] == ["7", "1", "t"]  # ids are strings; a missing id is the record index
    assert [r["image"] for r in out] == ["a.png", "b.png", None]
    assert out[0]["conversations"][0]["value"] == "<image>\nWhat is in the picture?"  # image moved first
    assert out[1]["conversations"][0]["value"] == "<image>\nDescribe it."  # image without placeholder
    assert out[2]["conversations"] == TEXT_ONLY
    assert [r["index"] for r in out] == [0, 1, 2] and out[0]["source"].endswith(ext)


@pytest.mark.parametrize("ext", [".json", ".jsonl"])
def test_read_preferences(tmp_path, ext):
    base = {"id": "p0", "image": "a.png", "output_1": {"value": "A red cat."}, "output_2": {"value": "A blue dog."}}
    recs = [dict(base, conversations=[SINGLE[0], {"from": "gpt", "value": "slot"}], preference=2, hallucination=1),
            dict(base, id="p1", conversations=MULTI[:4] + [MULTI[4]], preference=1)]
    out = data.read_preferences(_write(tmp_path / f"pref{ext}", recs))
    assert out[0]["conversations"] == [SINGLE[0]]  # the trailing gpt slot of the file is dropped
    assert out[0]["preference"] == 2 and out[0]["hallucination"] is True and out[1]["hallucination"] is None
    assert out[0]["output_1"] == {"value": "A red cat."}
    assert out[1]["conversations"][-1] == MULTI[4] and len(out[1]["conversations"]) == 5
    full = data.with_response(out[0]["conversations"], out[0]["output_2"]["value"])
    assert full[-1] == {"from": "gpt", "value": "A blue dog."} and full[:-1] == out[0]["conversations"]


def test_read_preferences_keeps_inline_facts(tmp_path):
    base = {"image": "a.png", "conversations": [SINGLE[0]], "output_1": {"value": "A red cat."},
            "output_2": {"value": "A blue dog."}, "preference": 1}
    out = data.read_preferences(_write(tmp_path / "p.json", [dict(base, id="a", facts=["The cat is red."]),
                                                             dict(base, id="b")]))
    assert out[0]["facts"] == ["The cat is red."] and "facts" not in out[1]
    for bad in ("The cat is red.", ["ok", ""], [3]):
        with pytest.raises(data.DataError, match="'facts' should be a list of non-empty strings"):
            data.read_preferences(_write(tmp_path / "bad.json", [dict(base, id="c", facts=bad)]))


@pytest.mark.parametrize("ext", [".json", ".jsonl"])
def test_read_ppo_prompts(tmp_path, ext):
    caps = {"a.png": ["A red cat.", "A cat on a mat."], "b.png": ["Two dogs."]}
    recs = [{"id": "q0", "image": "a.png", "conversations": [SINGLE[0], SINGLE[1]]},
            {"id": "q1", "image": "coco/b.png", "question": "Which animal?\nA. cat\nB. dog",
             "answer_type": "multiple-choice", "answer": "b.", "length_bonus": 0.5},
            {"id": "q2", "image": "b.png", "question": "Is it red?", "answer_type": "yes_no", "answer": "No",
             "facts": ["It is blue."]},
            {"id": "q3", "question": "Say hi.", "answer_type": "mc", "correct_choice_idx": 2},
            {"id": "q4", "image": "zzz.png", "question": "What is it?"}]
    path = _write(tmp_path / f"ppo{ext}", recs)
    capfile = _write(tmp_path / "caps.json", caps)
    for c in (capfile, caps):
        out = data.read_ppo_prompts(path, captions=c)
        assert [r["question"] for r in out[:2]] == ["What color is the cat?", "Which animal?\nA. cat\nB. dog"]
        assert out[0]["facts"] == caps["a.png"] and out[0]["answer_type"] == "general" and out[0]["answer"] is None
        assert out[1]["facts"] == caps["b.png"]  # matched by base name
        assert (out[1]["answer_type"], out[1]["answer"], out[1]["length_multiplier"]) == ("multiple_choice", "B", 0.5)
        assert (out[2]["answer_type"], out[2]["answer"], out[2]["facts"]) == ("yes_no", "no", ["It is blue."])
        assert (out[3]["image"], out[3]["answer"], out[3]["facts"]) == (None, "C", [])
        assert out[4]["facts"] == [] and out[0]["length_multiplier"] == 1.0
    assert data.read_ppo_prompts(path)[0]["facts"] == []


def test_read_mmhal_shared_template():
    path = os.path.join(ROOT, "..", "shared", "data", "mmhal", "response_template.json")
    if not os.path.exists(path):
        pytest.skip("shared MMHal template not present")
    out = data.read_mmhal(path)
    assert len(out) == 96
    assert [r["question_type"] for r in out[:8]] == list(data.MMHAL_TYPES)
    assert all(r["question_type"] == data.MMHAL_TYPES[r["index"] % 8] for r in out)
    raw = json.load(open(path))
    assert out[0]["question"] == raw[0]["question"] and out[0]["image_content"] == raw[0]["image_content"]
    assert out[0]["image"] == raw[0]["image_src"].rsplit("/", 1)[1]


def test_read_mmhal_small_and_bad(tmp_path):
    rec = {"question_type": "counting", "question_topic": "animal", "image_id": "x1",
           "image_src": "https://example.org/img/abc.jpg", "image_content": ["Cat", "Dog"],
           "question": "How many?", "gt_answer": "Two.", "model_answer": ""}
    out = data.read_mmhal(_write(tmp_path / "m.jsonl", [rec]))
    assert out[0]["image"] == "abc.jpg" and out[0]["image_content"] == ["Cat", "Dog"]
    bad = dict(rec, image_content="Cat")
    with pytest.raises(DataError, match="record 1"):
        data.read_mmhal(_write(tmp_path / "m2.json", [rec, bad]))


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        data.read_sft(str(tmp_path / "none.json"))
    with pytest.raises(DataError, match="expected a JSON list"):
        data.read_sft(_write(tmp_path / "d.json", {"conversations": []}))
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    with pytest.raises(DataError, match="invalid JSON"):
        data.read_sft(str(tmp_path / "broken.json"))
    with pytest.raises(ValueError, match="on_error"):
        data.read_sft(_write(tmp_path / "ok.json", []), on_error="ignore")


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
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "convert", "vqav2", "--questions", qf,
                        "--annotations", af, "--out", out], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    recs = data.read_sft(out)  # the output is valid SFT data
    assert [x["id"] for x in recs] == ["vqav2_90", "vqav2_50", "vqav2_91"]
    assert recs[0]["image"] == "coco/train2017/000000000009.jpg"
    assert recs[0]["conversations"] == [
        {"from": "human", "value": f"<image>\nWhat color is the cat?\n{data.VQA_INSTRUCTION}"},
        {"from": "gpt", "value": "red"}]
    grouped = data.convert_vqav2(qf, af, per_image=True)
    assert len(grouped) == 2 and [t["value"] for t in grouped[0]["conversations"][2:]] == \
        [f"How many cats?\n{data.VQA_INSTRUCTION}", "2"]
    assert grouped[0]["conversations"][2]["value"].count("<image>") == 0
    ppo = data.convert_vqav2(qf, af, fmt="ppo")
    assert [(p["answer_type"], p["answer"]) for p in ppo] == [("general", "red"), ("yes_no", "yes"), ("general", "2")]
    ppo_path = _write(tmp_path / "vqa_ppo.jsonl", ppo)
    assert [p["answer_type"] for p in data.read_ppo_prompts(ppo_path)] == ["general", "yes_no", "general"]


def test_convert_vqav2_missing_annotation(tmp_path):
    qf, af = _vqa_files(tmp_path)
    a = json.load(open(af))
    a["annotations"] = a["annotations"][:2]
    af2 = _write(tmp_path / "a2.json", a)
    with pytest.raises(DataError, match="record 2.*no annotation"):
        data.convert_vqav2(qf, af2)
    skips = Skips()
    assert len(data.convert_vqav2(qf, af2, on_error="skip", skips=skips)) == 2 and skips.count == 1


def test_convert_aokvqa(tmp_path):
    items = [{"question_id": "k1", "image_id": 3, "question": "What is the cat doing?",
              "choices": ["sleeping", "eating", "running", "jumping"], "correct_choice_idx": 1,
              "direct_answers": ["eating"] * 10, "rationales": ["It has food in front of it.", "Bowl."]},
             {"question_id": "k2", "image_id": 4, "question": "Weather?", "choices": ["sun", "rain", "snow", "fog"],
              "correct_choice_idx": 3, "direct_answers": [], "rationales": ["It is hazy."]}]
    path = _write(tmp_path / "aok.json", items)
    recs = data.convert_aokvqa(path)
    q = recs[0]["conversations"][0]["value"]
    assert q == ("<image>\nWhat is the cat doing?\nA. sleeping\nB. eating\nC. running\nD. jumping\n"
                 + data.MC_INSTRUCTION)
    assert recs[0]["conversations"][1]["value"] == "B. eating\nIt has food in front of it."
    cot = data.convert_aokvqa(path, style="rationale_first")
    assert cot[1]["conversations"][1]["value"] == "It is hazy. So the correct option is D."
    ppo = data.read_ppo_prompts(_write(tmp_path / "aok_ppo.json", data.convert_aokvqa(path, fmt="ppo")))
    assert [(p["answer_type"], p["answer"]) for p in ppo] == [("multiple_choice", "B"), ("multiple_choice", "D")]
    assert ppo[0]["facts"] == ["The answer is eating.", "It has food in front of it.", "Bowl."]
    items[1]["correct_choice_idx"] = 7
    with pytest.raises(DataError, match="record 1.*out of range"):
        data.convert_aokvqa(_write(tmp_path / "aok2.json", items))


def test_convert_flickr30k(tmp_path):
    token = tmp_path / "results.token"
    lines = [f"{img}.jpg#{k}\t{img} caption number {k} ." for img in ("100", "200") for k in range(3)]
    token.write_text("\n".join(lines) + "\n")
    a = data.convert_flickr30k(str(token), seed=1)
    assert len(a) == 2 and a == data.convert_flickr30k(str(token), seed=1)
    assert a[0]["image"] == "flickr30k/100.jpg" and a[0]["conversations"][0]["value"].startswith("<image>\n")
    assert a[0]["conversations"][1]["value"] in [f"100 caption number {k} ." for k in range(3)]
    assert a[0]["conversations"][0]["value"][len("<image>\n"):] in data.CAPTION_INSTRUCTIONS
    assert len(data.convert_flickr30k(str(token), all_captions=True)) == 6
    karpathy = {"images": [{"filename": "100.jpg", "split": "train", "sentences": [{"raw": "A cat."}]},
                           {"filename": "300.jpg", "split": "test", "sentences": [{"raw": "A dog."}]}]}
    kp = _write(tmp_path / "dataset_flickr30k.json", karpathy)
    k = data.convert_flickr30k(kp, split="train")
    assert [r["conversations"][1]["value"] for r in k] == ["A cat."]
    out, caps = str(tmp_path / "f.json"), str(tmp_path / "caps.json")
    assert data.main(["convert", "flickr30k", "--input", str(token), "--out", out, "--captions_out", caps]) == 0
    assert len(data.read_sft(out)) == 2 and json.load(open(caps))["200.jpg"][2] == "200 caption number 2 ."


def test_mix(tmp_path):
    a = _write(tmp_path / "a.json", [{"id": f"a{i}", "conversations": TEXT_ONLY} for i in range(6)])
    b = _write(tmp_path / "b.jsonl", [{"id": f"b{i}", "image": "x.png", "conversations": SINGLE} for i in range(4)])
    m1 = data.mix_sft([a, b], seed=0)
    assert sorted(r["id"] for r in m1) == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(4)])
    assert m1 == data.mix_sft([a, b], seed=0) and m1 != data.mix_sft([a, b], seed=1)
    assert all("source" not in r and "index" not in r for r in m1)
    out = str(tmp_path / "m.json")
    assert data.main(["mix", "--inputs", a, b, "--out", out, "--seed", "0", "--counts", "2", "3"]) == 0
    ids = [r["id"] for r in data.read_sft(out)]
    assert len(ids) == 5 and sum(i.startswith("a") for i in ids) == 2


# ----------------------------------------------------------------------------------------------------
# batching

def test_pad_functions():
    ids, mask = right_pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_collate_right_images_in_row_order(tok, tmp_path):
    for name in ("a.png", "b.png"):
        _draw(str(tmp_path / name), (10 + len(name), 7), (10 * len(name), 50, 200))
    recs = [{"id": "0", "image": "a.png", "conversations": data.normalize_conversation(SINGLE, True)},
            {"id": "1", "image": None, "conversations": TEXT_ONLY},
            {"id": "2", "image": "b.png", "conversations": data.normalize_conversation(MULTI, True)}]
    ds = SFTDataset(recs, tok, T, str(tmp_path), 16, N_IMG, None)
    items = [ds[i] for i in range(3)]
    batch = collate_right(items, tok.pad_id)
    B, L = batch["input_ids"].shape
    lens = [len(it["input_ids"]) for it in items]
    assert B == 3 and L == max(lens)
    for b, it in enumerate(items):
        n = lens[b]
        assert batch["input_ids"][b, :n].tolist() == it["input_ids"].tolist()
        assert (batch["input_ids"][b, n:] == tok.pad_id).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (L - n)
    assert batch["images"].shape == (2, 3, 16, 16)
    assert torch.equal(batch["images"][0], items[0]["image"]) and torch.equal(batch["images"][1], items[2]["image"])
    expected = data.preprocess_image(data.load_image(str(tmp_path / "b.png")), 16)
    assert torch.equal(items[2]["image"], expected)
    assert collate_right([items[1]], tok.pad_id)["images"] is None
    with pytest.raises(DataError, match="image tokens but no image"):
        collate_right([dict(items[0], image=None)], tok.pad_id)
    with pytest.raises(DataError, match="an image but no image tokens"):
        collate_right([dict(items[1], image=items[0]["image"])], tok.pad_id)
    # a DataLoader end to end
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=lambda b: collate_right(b, tok.pad_id))
    assert [x["input_ids"].shape[0] for x in loader] == [2, 1]


def test_prompt_dataset_and_collate_left(tok, tmp_path):
    _draw(str(tmp_path / "a.png"))
    recs = data.read_ppo_prompts(_write(tmp_path / "p.json", [
        {"id": "0", "image": "a.png", "question": "What color is the cat?"},
        {"id": "1", "question": "Say hello."},
        {"id": "2", "image": "a.png", "question": "how many " * 60}]))
    p0 = tokenize_prompt("What color is the cat?", tok, T, N_IMG)
    p1 = tokenize_prompt("Say hello.", tok, T, N_IMG, has_image=False)
    ds = data.PromptDataset(recs, tok, T, str(tmp_path), 16, N_IMG, max_prompt_len=len(p0) + 10)
    assert len(ds) == 2 and ds.dropped == 1
    batch = collate_left([ds[0], ds[1]], tok.pad_id)
    L = max(len(p0), len(p1))
    assert batch["input_ids"][0, L - len(p0):].tolist() == p0 and batch["input_ids"][1, L - len(p1):].tolist() == p1
    assert batch["attention_mask"][1].tolist() == [0] * (L - len(p1)) + [1] * len(p1)
    assert batch["images"].shape == (1, 3, 16, 16) and batch["index"].tolist() == [0, 1]


# ----------------------------------------------------------------------------------------------------
# sampler

@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_ranks_disjoint_and_covering(drop_last):
    n, w = 23, 2
    shards = [list(ResumableSampler(n, rank=r, world_size=w, seed=5, drop_last=drop_last)) for r in range(w)]
    assert len(shards[0]) == len(shards[1])
    if drop_last:
        assert set(shards[0]).isdisjoint(shards[1]) and len(set(shards[0] + shards[1])) == n // w * w
    else:
        assert set(shards[0] + shards[1]) == set(range(n)) and len(shards[0]) == 12
        assert len(set(shards[0]) & set(shards[1])) <= 1  # only the wrapped padding repeats


def test_sampler_deterministic_from_seed_and_epoch():
    def run(seed, epoch):
        s = ResumableSampler(40, seed=seed)
        s.set_epoch(epoch)
        return list(s)
    assert run(0, 0) == run(0, 0) and sorted(run(0, 0)) == list(range(40))
    assert run(0, 0) != run(0, 1) and run(0, 0) != run(1, 0)
    assert run(0, 1) != run(1, 0)  # (seed, epoch) pairs do not collide like seed + epoch would
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_resume_mid_epoch():
    s = ResumableSampler(50, rank=1, world_size=2, seed=3, drop_last=False)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["position"] == 14
    rest = list(it)
    s2 = ResumableSampler(50, rank=1, world_size=2, seed=3, drop_last=False)
    s2.load_state_dict(state)
    s2.set_epoch(2)  # the training loop calls this again: the position is kept
    assert len(s2) == len(rest) and list(s2) == rest
    fresh = ResumableSampler(50, rank=1, world_size=2, seed=3, drop_last=False)
    fresh.set_epoch(2)
    assert head + rest == list(fresh)
    # a finished pass moves to the next epoch
    assert s.state_dict()["epoch"] == 3 and s.state_dict()["position"] == 0
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(50, seed=4).load_state_dict(state)


def test_sampler_resume_with_dataloader_and_new_world_size():
    ds = list(range(30))
    s = ResumableSampler(30, rank=0, world_size=1, seed=0)
    full = [b.tolist() for b in torch.utils.data.DataLoader(ds, batch_size=4, sampler=s)]
    s = ResumableSampler(30, rank=0, world_size=1, seed=0)
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=4, sampler=s))
    got = [next(loader).tolist() for _ in range(3)]
    state = s.state_dict()
    assert state["position"] == 12 and s.state_dict(consumed=8)["position"] == 8
    s2 = ResumableSampler(30, seed=0)
    s2.load_state_dict(state)
    rest = [b.tolist() for b in torch.utils.data.DataLoader(ds, batch_size=4, sampler=s2)]
    assert got + rest == full
    # resuming on 3 ranks shares out exactly the remaining items
    order = ResumableSampler(30, seed=0).order(0).tolist()
    parts = []
    for r in range(3):
        sr = ResumableSampler(30, rank=r, world_size=3, seed=0, drop_last=False)
        sr.load_state_dict(state)
        parts.append(list(sr))
    assert sorted(sum(parts, [])) == sorted(order[12:])


def test_sampler_under_torch_distributed(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = (
        "import json, sys, torch.distributed as dist\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import data\n"
        "rank = int(sys.argv[1])\n"
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}', rank=rank, world_size=2)\n"
        "s = data.ResumableSampler(21, seed=7, drop_last=False)\n"
        "print(json.dumps([s.rank, s.world_size, list(s)]))\n"
        "dist.destroy_process_group()\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    res = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert [r[:2] for r in res] == [[0, 2], [1, 2]]
    assert set(res[0][2] + res[1][2]) == set(range(21)) and len(res[0][2]) == len(res[1][2]) == 11


# ----------------------------------------------------------------------------------------------------
# bad input: error and skip modes

GOOD_SFT = {"id": "g", "conversations": TEXT_ONLY}
GOOD_PREF = {"id": "g", "conversations": [TEXT_ONLY[0]], "output_1": {"value": "Hi."}, "output_2": {"value": "Yo."},
             "preference": 1}
GOOD_PPO = {"id": "g", "question": "Is it red?", "answer_type": "yes_no", "answer": "yes"}

BAD_CASES = {
    "missing_image": ("sft", {"id": "b", "image": "missing.png", "conversations": SINGLE}, "image file not found"),
    "corrupt_image": ("sft", {"id": "b", "image": "corrupt.png", "conversations": SINGLE}, "cannot read image"),
    "missing_field": ("sft", {"id": "b"}, "missing field 'conversations'"),
    "wrong_type": ("sft", {"id": "b", "conversations": "hello"}, "should be a list"),
    "wrong_value_type": ("sft", {"id": "b", "conversations": [{"from": "human", "value": 3}, TEXT_ONLY[1]]},
                         "should be a string"),
    "wrong_image_type": ("sft", {"id": "b", "image": 5, "conversations": SINGLE}, "'image' should be str"),
    "not_alternating": ("sft", {"id": "b", "conversations": [TEXT_ONLY[0], TEXT_ONLY[0], TEXT_ONLY[1]]},
                        "alternate"),
    "starts_with_gpt": ("sft", {"id": "b", "conversations": [TEXT_ONLY[1], TEXT_ONLY[0]]}, "alternate"),
    "image_without_image": ("sft", {"id": "b", "conversations": SINGLE}, "has no image"),
    "image_twice": ("sft", {"id": "b", "image": "ok.png",
                            "conversations": [{"from": "human", "value": "<image> and <image>"}, SINGLE[1]]},
                    "appears 2 times"),
    "image_in_later_turn": ("sft", {"id": "b", "image": "ok.png", "conversations": [
        TEXT_ONLY[0], TEXT_ONLY[1], {"from": "human", "value": "<image>\nAnd now?"}, TEXT_ONLY[1]]},
        "must be in the first user turn"),
    "malformed_turns": ("preference", dict(GOOD_PREF, conversations=[["human", "hi"]]), "turn 0 should be an object"),
    "empty_answer": ("sft", {"id": "b", "conversations": [TEXT_ONLY[0], {"from": "gpt", "value": "  "}]},
                     "empty answer"),
    "unknown_role": ("sft", {"id": "b", "conversations": [{"from": "system", "value": "x"}]}, "role 'system'"),
    "not_an_object": ("sft", ["a", "list"], "should be an object"),
    "preference_3": ("preference", dict(GOOD_PREF, preference=3), "must be 1 or 2"),
    "preference_str": ("preference", dict(GOOD_PREF, preference="1"), "must be 1 or 2"),
    "preference_missing_output": ("preference", {k: v for k, v in GOOD_PREF.items() if k != "output_2"},
                                  "missing field 'output_2'"),
    "preference_output_type": ("preference", dict(GOOD_PREF, output_1="Hi."), "'output_1' should be an object"),
    "preference_empty_output": ("preference", dict(GOOD_PREF, output_2={"value": ""}), "empty answer"),
    "ppo_bad_letter": ("ppo", dict(GOOD_PPO, answer_type="multiple_choice", answer="E"), "letter A-D"),
    "ppo_bad_yes_no": ("ppo", dict(GOOD_PPO, answer="maybe"), "'yes' or 'no'"),
    "ppo_bad_type": ("ppo", dict(GOOD_PPO, answer_type="essay"), "answer_type"),
    "ppo_image_without_image": ("ppo", dict(GOOD_PPO, question="<image>\nIs it red?"), "has no image"),
    "ppo_bad_multiplier": ("ppo", dict(GOOD_PPO, length_multiplier="big"), "length_multiplier"),
}


def _bad_file(tmp_path, kind, bad, ext=".json"):
    good = {"sft": GOOD_SFT, "preference": GOOD_PREF, "ppo": GOOD_PPO}[kind]
    _draw(str(tmp_path / "ok.png"))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return _write(tmp_path / f"{kind}{ext}", [good, bad, good])


def _reader(kind, tmp_path):
    return {"sft": lambda p, **kw: data.read_sft(p, image_folder=str(tmp_path), check_images=True, **kw),
            "preference": lambda p, **kw: data.read_preferences(p, **kw),
            "ppo": lambda p, **kw: data.read_ppo_prompts(p, **kw)}[kind]


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises_naming_file_and_record(case, tmp_path):
    kind, bad, reason = BAD_CASES[case]
    path = _bad_file(tmp_path, kind, bad)
    with pytest.raises(DataError) as e:
        _reader(kind, tmp_path)(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: record 1: ") and reason in msg
    if case in ("missing_image", "corrupt_image"):
        assert msg.endswith(f"(image {os.path.join(str(tmp_path), bad['image'])})")


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_skipped_and_counted(case, tmp_path, capsys):
    kind, bad, reason = BAD_CASES[case]
    path = _bad_file(tmp_path, kind, bad, ext=".jsonl")
    skips = Skips()
    out = _reader(kind, tmp_path)(path, on_error="skip", skips=skips)
    assert [r["index"] for r in out] == [0, 2]
    assert skips.count == 1 and reason in skips.reasons[0] and "record 1" in skips.reasons[0]
    assert "skipped 1 of 3 records" in capsys.readouterr().err  # reported at the end


def test_bad_jsonl_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(GOOD_SFT) + "\n{not json\n" + json.dumps(GOOD_SFT) + "\n")
    with pytest.raises(DataError, match=r"record 1: invalid JSON on line 2"):
        data.read_sft(str(p))
    skips = Skips()
    assert len(data.read_sft(str(p), on_error="skip", skips=skips)) == 2 and skips.count == 1


def test_default_skips_counter(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SKIPS", Skips())
    data.read_sft(_bad_file(tmp_path, "sft", BAD_CASES["empty_answer"][1]), on_error="skip")
    assert data.SKIPS.count == 1


def test_dataset_broken_image_at_getitem(tok, tmp_path, capsys):
    _draw(str(tmp_path / "ok.png"))
    recs = data.read_sft(_write(tmp_path / "s.json", [{"id": "0", "image": "ok.png", "conversations": SINGLE},
                                                      {"id": "1", "image": "gone.png", "conversations": SINGLE}]))
    ds = SFTDataset(recs, tok, T, str(tmp_path), 16, N_IMG, None)
    with pytest.raises(DataError) as e:
        ds[1]
    assert "s.json: record 1: image file not found" in str(e.value) and "gone.png" in str(e.value)
    skips = Skips()
    ds = SFTDataset(recs, tok, T, str(tmp_path), 16, N_IMG, None, on_error="skip", skips=skips)
    item = ds[1]  # the next good record is served instead, and counted
    assert item["id"] == "0" and item["image"] is not None and skips.count == 1
    prompts = data.read_ppo_prompts(_write(tmp_path / "p.json", [{"id": "0", "image": "ok.png", "question": "Q?"},
                                                                 {"id": "1", "image": "gone.png", "question": "Q?"}]))
    with pytest.raises(DataError, match="p.json: record 1: image file not found"):
        data.PromptDataset(prompts, tok, T, str(tmp_path), 16, N_IMG)[1]
    pds = data.PromptDataset(prompts, tok, T, str(tmp_path), 16, N_IMG, on_error="skip", skips=skips)
    assert pds[1]["index"] == 0 and skips.count == 2


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
    rc = data.main(["check", path, "--image_folder", str(tmp_path), "--tokenizer", tok_dir,
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
    res = data.check_dataset(path, str(tmp_path), tok, num_image_tokens=N_IMG, out=open(os.devnull, "w"))
    assert res["lengths"] == lengths and res["valid"] == 3
    # a clean preference file, kind detected, exit code 0
    pref = _write(tmp_path / "pref.json", [GOOD_PREF, dict(GOOD_PREF, preference=2)])
    assert data.main(["check", pref, "--tokenizer", tok_dir]) == 0
    out = capsys.readouterr().out
    assert "kind: preference" in out and "preference: 1 -> 1, 2 -> 1" in out
