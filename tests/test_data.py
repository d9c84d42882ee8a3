"""Tests for data.py: template and masking, tokenizer, CLIP preprocessing against transformers, readers,
batching, the resumable sampler and every bad-input case in both error modes (prepare_data.py's converters,
mixing and check: test_prepare_data.py, which shares the fixtures below).
Everything is built here: a tiny sentencepiece model trained in a temp dir, images drawn with PIL."""
import json
import os
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


def test_tokenizer_ids_and_decode(tok, tok_dir):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 400)
    same = Tokenizer(os.path.join(tok_dir, "tokenizer.model"))
    text = "How many animals are there?\nTwo."
    ids = tok.encode(text)
    assert ids == same.encode(text) and ids and 1 not in ids and 2 not in ids
    assert tok.decode(ids) == text
    # negative ids (image / ignore), pad and bos are dropped
    assert tok.decode([1, IMAGE_TOKEN_INDEX, IGNORE_INDEX] + ids + [0]) == text
    assert tok.decode(torch.tensor(ids)) == text
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
def test_sft_max_len_counts_the_image_as_one_id(tok, n_img, capsys):
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
        fill = tuple(int(m * 255) for m in proc.image_mean)   # LLaVA's expand2square call: truncated
        assert fill == (122, 116, 104)
        ref = proc(Image.fromarray(_pad_square(rgb, fill)), return_tensors="np")["pixel_values"][0]
        ours = data.preprocess_image(img, S)
        assert ours.dtype == torch.float32 and tuple(ours.shape) == (3, S, S)
        assert np.abs(ours.numpy() - ref).max() <= 1e-5
        assert np.abs(data.image_tensor(path, S).numpy() - ref).max() <= 1e-5  # the file -> tensor path
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


def test_padded_size_guarded(tmp_path, monkeypatch):
    # a 1 x 80,000,000 strip has fewer pixels than MAX_IMAGE_PIXELS but pads to a 6.4e15-pixel square:
    # refused from the PNG header, before any decoding
    strip = tmp_path / "strip.png"
    strip.write_bytes(_png_header_only(1, 80_000_000))
    assert 80_000_000 < data.MAX_IMAGE_PIXELS
    for read in (data.load_image, lambda p: data.image_tensor(p, 16)):
        with pytest.raises(DataError) as e:
            read(str(strip))
        assert str(e.value) == (f"refusing a 1x80000000 image: padded to a 80000000x80000000 square it has more "
                                f"than MAX_IMAGE_PIXELS=89478485 pixels (longest side at most 9459); shrink it "
                                f"(image {strip})")
    # a real, readable 10000 x 1 image: 10^4 pixels, 10^8 once padded
    wide = str(tmp_path / "wide.png")
    Image.new("L", (10_000, 1), 7).save(wide)
    with pytest.raises(DataError, match="padded to a 10000x10000 square") as e:
        data.image_tensor(wide, 16)
    assert wide in str(e.value)
    with pytest.raises(DataError, match="padded to a 10000x10000 square"):  # an image made in memory too
        data.preprocess_image(Image.new("RGB", (10_000, 1)), 16)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)  # the limit is the padded square's pixels
    assert data.preprocess_image(Image.new("RGB", (10, 1)), 4).shape == (3, 4, 4)
    with pytest.raises(DataError, match="padded to a 11x11 square"):
        data.preprocess_image(Image.new("RGB", (11, 1)), 4)


def test_missing_corrupt_truncated_images(tmp_path):
    for read in (data.load_image, lambda p: data.image_tensor(p, 16)):
        with pytest.raises(DataError, match="not found") as e:
            read(str(tmp_path / "nope.png"))
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


def test_load_captions(tmp_path):
    caps = {"a.png": ["A red cat."]}
    assert data.load_captions(_write(tmp_path / "c.json", caps)) == caps == data.load_captions(caps)
    assert data.load_captions("") == {} == data.load_captions(None)  # no captions file: no facts
    with pytest.raises(DataError, match="nope.json: file not found"):
        data.load_captions(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="should be a list of strings"):
        data.load_captions(_write(tmp_path / "bad.json", {"a.png": "A red cat."}))
    with pytest.raises(DataError, match="should map image"):
        data.load_captions(_write(tmp_path / "list.json", [caps]))


# ----------------------------------------------------------------------------------------------------
# the released LLaVA-RLHF files, in their exact shapes (SPEC §9; RLHF/data_utils, RLHF/models/ppo_trainer.py)

# the official AnswerType enum (RLHF/data_utils/constants.py), written out independently of data.py
ANSWER_TYPE_ENUM = {"GENERAL": 1, "A_IN_ABCD": 2, "B_IN_ABCD": 3, "C_IN_ABCD": 4, "D_IN_ABCD": 5,
                    "NO_IN_YESNO": 6, "YES_IN_YESNO": 7}


def _official_key(image, caption_type):
    """ppo_trainer.py's facts key: the id int(file.split(".")[0]) back as a 12-digit .jpg name, "aok_" for
    the four multiple-choice types."""
    name = str(int(image.split(".")[0])).zfill(12) + ".jpg"
    return ("aok_" + name) if caption_type in (2, 3, 4, 5) else name


def _released_ppo():
    """Records as llava_ppo50k-aokvqa12k-vqa10k.json holds them: a first exchange (the gpt turn is replaced
    by the loader), caption_type and length_bonus."""
    def rec(rid, image, question, answer, ct, lb):
        return {"id": rid, "image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                             {"from": "gpt", "value": answer}],
                "caption_type": ct, "length_bonus": lb}
    return [rec("000000123456", "000000123456.jpg", "What is the man doing?", "He is surfing.", 1, 1.0),
            rec("aok_1", "000000123456.jpg", "Why is he wet?\nA. rain\nB. sea\nC. sweat\nD. hose", "B.", 3, 0.0),
            rec("vqa_1", "000000000077.jpg", "Is the dog asleep?", "no", 6, 0.5),
            rec("vqa_2", "000000000077.jpg", "Is there a dog?", "yes", 7, 0.5),
            rec("aok_2", "000000000077.jpg", "Which animal?\nA. dog\nB. cat\nC. cow\nD. fox", "A.", 2, 0.0)]


RELEASED_CAPTIONS = {"000000123456.jpg": ["A man surfs a wave.", "A surfer in the ocean."],
                     "aok_000000123456.jpg": ["He is in the sea.", "Surfers get wet."],
                     "000000000077.jpg": ["A dog lies on a couch."],
                     "aok_000000000077.jpg": ["The animal is a dog."]}


def test_caption_types_map_to_answer_types():
    for name, ct in ANSWER_TYPE_ENUM.items():
        at, ans = data.CAPTION_TYPES[ct]
        if name == "GENERAL":
            assert (at, ans) == ("general", None)
        elif name.endswith("_IN_ABCD"):
            assert (at, ans) == ("multiple_choice", name[0])  # the official bonus expects "<letter>."
        else:
            assert (at, ans) == ("yes_no", name.split("_")[0].lower())
        assert data.caption_type(at, ans) == ct
    assert set(data.CAPTION_TYPES) == set(ANSWER_TYPE_ENUM.values())
    assert data.caption_type("general", "red") == 1


@pytest.mark.parametrize("image", ["000000123456.jpg", "123456.jpg", "000000000009.png", "42"])
def test_facts_key_is_the_official_rule(image):
    for ct, (at, _) in data.CAPTION_TYPES.items():
        assert data.facts_key(image, at) == _official_key(image, ct)
    assert data.facts_key("000000123456.jpg", "multiple_choice") == "aok_000000123456.jpg"


def test_facts_key_of_names_without_a_number():
    # int("COCO_train2014_000000123456") raises in the official trainer; here: the base name
    assert data.facts_key("COCO_train2014_000000123456.jpg", "general") == "COCO_train2014_000000123456.jpg"
    assert data.facts_key("imgs/cat.png", "multiple_choice") == "aok_cat.png"
    assert data.facts_key("coco/train2017/000000000009.jpg", "yes_no") == "000000000009.jpg"  # a path: its name


def test_read_released_ppo_file(tmp_path, capsys):
    path = _write(tmp_path / "llava_ppo50k-aokvqa12k-vqa10k.json", _released_ppo())
    caps = _write(tmp_path / "image_to_caption.json", RELEASED_CAPTIONS)
    out = data.read_ppo_prompts(path, captions=caps)
    assert [(r["answer_type"], r["answer"]) for r in out] == [
        ("general", None), ("multiple_choice", "B"), ("yes_no", "no"), ("yes_no", "yes"), ("multiple_choice", "A")]
    assert [r["length_multiplier"] for r in out] == [1.0, 0.0, 0.5, 0.5, 0.0]
    assert out[1]["question"] == "Why is he wet?\nA. rain\nB. sea\nC. sweat\nD. hose"  # the first turn only
    for raw, r in zip(_released_ppo(), out):  # facts: the entry the official trainer reads
        assert r["facts"] == RELEASED_CAPTIONS[_official_key(raw["image"], raw["caption_type"])]
    assert out[1]["facts"] == ["He is in the sea.", "Surfers get wet."] and out[0]["facts"][0] == "A man surfs a wave."
    assert capsys.readouterr().err == ""
    # no caption_type and no length_bonus (the official defaults: GENERAL, 1.0)
    bare = [{k: v for k, v in r.items() if k not in ("caption_type", "length_bonus")} for r in _released_ppo()]
    out = data.read_ppo_prompts(_write(tmp_path / "bare.json", bare), captions=caps)
    assert {(r["answer_type"], r["length_multiplier"]) for r in out} == {("general", 1.0)}
    assert out[1]["facts"] == RELEASED_CAPTIONS["000000123456.jpg"]


def test_released_ppo_facts_fallbacks(tmp_path, capsys):
    recs = _released_ppo()
    recs[0]["image"] = recs[1]["image"] = "COCO_train2014_000000123456.jpg"  # no number: the official crashes
    path = _write(tmp_path / "p.json", recs)
    caps = {"COCO_train2014_000000123456.jpg": ["Captions by file name."],
            "aok_COCO_train2014_000000123456.jpg": ["Facts by file name."],
            "000000000077.jpg": ["A dog lies on a couch."]}
    out = data.read_ppo_prompts(path, captions=caps)
    assert out[0]["facts"] == ["Captions by file name."] and out[1]["facts"] == ["Facts by file name."]
    # "aok_000000000077.jpg" is missing: the image's captions are used, and said so
    assert out[4]["facts"] == ["A dog lies on a couch."]
    assert "p.json: 1 multiple-choice prompt(s) have no 'aok_' facts entry" in capsys.readouterr().err
    # the official key wins over an exact image key
    recs = _released_ppo()[:2]
    for r in recs:
        r["image"] = "123456.jpg"
    caps = {"123456.jpg": ["by the name"], "000000123456.jpg": ["by the id"], "aok_000000123456.jpg": ["aok"]}
    out = data.read_ppo_prompts(_write(tmp_path / "q.json", recs), captions=caps)
    assert [r["facts"] for r in out] == [["by the id"], ["aok"]]


@pytest.mark.parametrize("bad, reason", [
    ({"caption_type": 8}, "unknown 'caption_type' 8"),
    ({"caption_type": 0}, "unknown 'caption_type' 0"),
    ({"caption_type": "3"}, "'caption_type' should be int"),
    ({"caption_type": True}, "'caption_type' should be int"),
    ({"caption_type": 3, "answer_type": "yes_no"},
     "'caption_type' 3 (multiple_choice) disagrees with 'answer_type' 'yes_no'"),
    ({"caption_type": 1, "answer_type": "multiple_choice", "answer": "A"}, "disagrees with 'answer_type'"),
    ({"caption_type": 3, "answer_type": "multiple_choice", "answer": "C"},
     "'caption_type' 3 (answer B) disagrees with the answer 'C'"),
    ({"caption_type": 6, "answer": "yes"}, "'caption_type' 6 (answer no) disagrees with the answer 'yes'"),
    ({"length_bonus": -1}, "'length_bonus' must be a finite number >= 0"),
])
def test_released_ppo_bad_records_name_the_record(tmp_path, bad, reason):
    recs = _released_ppo()
    recs[2] = {k: v for k, v in recs[2].items() if k != "caption_type"} | bad
    path = _write(tmp_path / "p.json", recs)
    with pytest.raises(DataError) as e:
        data.read_ppo_prompts(path)
    assert str(e.value).startswith(f"{path}: record 2: ") and reason in str(e.value)
    skips = Skips()
    assert [r["index"] for r in data.read_ppo_prompts(path, on_error="skip", skips=skips)] == [0, 1, 3, 4]


def test_released_ppo_agreeing_fields_accepted(tmp_path):
    recs = _released_ppo()
    recs[1].update(answer_type="multiple_choice", answer="B")
    recs[2].update(answer_type="yes_no", answer="No.")
    out = data.read_ppo_prompts(_write(tmp_path / "p.json", recs))
    assert [(r["answer_type"], r["answer"]) for r in out[1:3]] == [("multiple_choice", "B"), ("yes_no", "no")]


def _released_preferences():
    """Records as llava_7b_v1_preference.json holds them: the conversation ends with the gpt turn the
    official loader overwrites with each output; outputs are {"from", "value"} objects; fields no loader
    reads (their names here are made up) are ignored."""
    return [{"id": "000000123456", "image": "000000123456.jpg",
             "conversations": [{"from": "human", "value": "<image>\nWhat is the man doing?"},
                               {"from": "gpt", "value": "He is surfing on a big wave."}],
             "output_1": {"from": "llava", "value": "He is surfing."},
             "output_2": {"from": "llava", "value": "He is skiing down a hill."},
             "preference": 1, "hallucination": True, "an_unread_field": False, "another": {"x": 0.3}},
            {"id": "000000000077", "image": "000000000077.jpg",
             "conversations": [[{"from": "human", "value": "Describe the picture.\n<image>"},
                                {"from": "gpt", "value": "A dog on a couch."},
                                {"from": "human", "value": "What color is it?"},
                                {"from": "gpt", "value": "Brown."}]],   # wrapped in a list, as the loader allows
             "output_1": {"from": "llava", "value": "It is green."},
             "output_2": {"from": "llava", "value": "It is brown."},
             "preference": 2, "hallucination": False}]


def test_read_released_preferences(tmp_path):
    path = _write(tmp_path / "llava_7b_v1_preference.json", _released_preferences())
    out = data.read_preferences(path)
    # the official loader: context = conversations with the last (gpt) turn replaced by output_k
    for raw, r in zip(_released_preferences(), out):
        conv = raw["conversations"][0] if isinstance(raw["conversations"][0], list) else raw["conversations"]
        for k in (1, 2):
            full = data.with_response(r["conversations"], r[f"output_{k}"]["value"])
            assert [t["from"] for t in full] == [t["from"] for t in conv]
            assert full[-1]["value"] == raw[f"output_{k}"]["value"] and full[1:-1] == conv[1:-1]
    assert out[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat is the man doing?"}]
    assert out[1]["conversations"][0]["value"] == "<image>\nDescribe the picture."
    assert [r["output_1"] for r in out] == [{"value": "He is surfing."}, {"value": "It is green."}]
    assert [(r["preference"], r["hallucination"]) for r in out] == [(1, True), (2, False)]
    assert all(k not in r for r in out for k in ("an_unread_field", "another"))  # unknown fields ignored
    bad = _released_preferences()
    bad[1]["conversations"] = [bad[1]["conversations"][0], bad[1]["conversations"][0]]
    with pytest.raises(DataError, match="record 1: 'conversations' should be a list of turns"):
        data.read_preferences(_write(tmp_path / "bad.json", bad))


def test_load_released_image_to_caption(tmp_path):
    caps = data.load_captions(_write(tmp_path / "image_to_caption.json", RELEASED_CAPTIONS))
    assert caps["aok_000000123456.jpg"] == ["He is in the sea.", "Surfers get wet."]
    with pytest.raises(DataError, match="captions for 'aok_000000000077.jpg' should be a list of strings"):
        data.load_captions(_write(tmp_path / "bad.json", {**RELEASED_CAPTIONS, "aok_000000000077.jpg": "a dog"}))


def test_read_released_rlinit_file(tmp_path):
    # llava_reward10k-aokvqa5k.json: SFT conversations (LLaVA prompts with an answer, A-OKVQA in CoT form)
    recs = [{"id": "000000123456", "image": "000000123456.jpg",
             "conversations": [{"from": "human", "value": "<image>\nWhat is the man doing?"},
                               {"from": "gpt", "value": "He is surfing."}]},
            {"id": "aokvqa_x1", "image": "000000000077.jpg",
             "conversations": [[{"from": "human", "value": "Which animal?\nA. dog\nB. cat\n<image>"},
                                {"from": "gpt", "value": "It barks. So the correct option is A."}]]}]
    out = data.read_sft(_write(tmp_path / "llava_reward10k-aokvqa5k.json", recs))
    assert [r["id"] for r in out] == ["000000123456", "aokvqa_x1"]
    assert out[1]["conversations"] == [{"from": "human", "value": "<image>\nWhich animal?\nA. dog\nB. cat"},
                                       {"from": "gpt", "value": "It barks. So the correct option is A."}]


def test_read_mmhal_shared_template():
    path = os.path.join(ROOT, "..", "shared", "data", "mmhal", "response_template.json")
    if not os.path.exists(path):
        pytest.skip("shared MMHal template not present")
    out = data.read_mmhal(path)
    assert len(out) == 96
    assert [r["question_type"] for r in out[:8]] == list(data.MMHAL_TYPES)
    assert all(r["question_type"] == data.MMHAL_TYPES[i % 8] for i, r in enumerate(out))
    raw = json.load(open(path))
    assert out[0]["question"] == raw[0]["question"] and out[0]["image_content"] == raw[0]["image_content"]
    assert out == [{**r, "model_answer": r.get("model_answer") or ""} for r in raw]   # nothing added


def test_read_mmhal_small_and_bad(tmp_path):
    rec = {"question_type": "counting", "question_topic": "animal", "image_id": "x1",
           "image_src": "https://example.org/img/abc.jpg", "image_content": ["Cat", "Dog"],
           "question": "How many?", "gt_answer": "Two.", "model_answer": ""}
    out = data.read_mmhal(_write(tmp_path / "m.jsonl", [rec]))
    assert out == [rec]
    # every field of the file is kept (a tiny-world item's scene graph), model_answer None -> ""
    out = data.read_mmhal(_write(tmp_path / "m1.json", [dict(rec, scene={"shapes": []}, image="local/x1.png",
                                                              model_answer=None)]))
    assert out[0]["scene"] == {"shapes": []} and out[0]["image"] == "local/x1.png" and out[0]["model_answer"] == ""
    assert set(out[0]) == set(rec) | {"scene", "image"}
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


def _latin1(path, text):
    """Write `text` in latin-1 (é -> the single byte 0xE9, not UTF-8); return the path."""
    with open(path, "wb") as f:
        f.write(text.encode("latin-1"))
    return str(path)


def test_non_utf8_text_files_name_the_file_and_byte(tmp_path):
    rec = json.dumps({"id": "1", "conversations": [{"from": "human", "value": "Un café?"},
                                                   {"from": "gpt", "value": "Oui."}]}, ensure_ascii=False)
    at = rec.index("é")
    for name, text, line, off in (("sft.json", "[" + rec + "]", 1, at + 1),
                                  ("sft.jsonl", json.dumps(GOOD_SFT) + "\n" + rec + "\n", 2,
                                   len(json.dumps(GOOD_SFT)) + 1 + at)):
        path = _latin1(tmp_path / name, text)
        with pytest.raises(DataError) as e:
            data.read_sft(path)
        assert str(e.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset {off}, line {line}); save it as UTF-8"
    # a captions map (and every JSON read by load_json), behind a byte-order mark: the offset counts it
    caps = tmp_path / "caps.json"
    caps.write_bytes(b"\xef\xbb\xbf" + '{"a.png": ["A café."]}'.encode("latin-1"))
    msg = f"{caps}: not UTF-8 text (byte 0xe9 at offset 20, line 1); save it as UTF-8"
    for read in (data.load_json, data.load_captions,
                 lambda p: data.read_ppo_prompts(_write(tmp_path / "ppo.json", [GOOD_PPO]), captions=p)):
        with pytest.raises(DataError) as e:
            read(str(caps))
        assert str(e.value) == msg
    # the same files in UTF-8 (with or without the mark) read as before
    caps.write_bytes(b"\xef\xbb\xbf" + '{"a.png": ["A café."]}'.encode())
    assert data.load_captions(str(caps)) == {"a.png": ["A café."]}


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 / U+0085 as they are; they do not end a JSONL line
    answer = "Line one.\u2028Line two.\x85Three."
    p = tmp_path / "s.jsonl"
    conv = [TEXT_ONLY[0], {"from": "gpt", "value": answer}]
    p.write_text("".join(json.dumps(dict(GOOD_SFT, id=str(i), conversations=conv), ensure_ascii=False) + "\r\n"
                         for i in range(2)), encoding="utf-8")
    out = data.read_sft(str(p))
    assert [r["conversations"][1]["value"] for r in out] == [answer, answer]


def _strict_utf8():
    """A text stream that fails like a UTF-8 terminal's stdout on anything not valid Unicode text."""
    import io
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")


def test_undecodable_file_names_are_printed_escaped(tmp_path):
    # an image folder holding b"caf\xe9.png" (not UTF-8): os.listdir gives "caf\udce9.png"
    folder = os.fsencode(tmp_path)
    fd = os.open(folder + b"/caf\xe9.png", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"not an image")
    os.close(fd)
    name = [n for n in os.listdir(tmp_path) if n.startswith("caf")][0]
    assert name == "caf\udce9.png"
    path = _write(tmp_path / "s.json", [{"id": "0", "image": name, "conversations": SINGLE}])
    with pytest.raises(DataError) as e:
        data.read_sft(path, image_folder=str(tmp_path), check_images=True)
    msg = str(e.value)
    assert msg.endswith(f"(image {tmp_path}/caf\\xe9.png)") and "cannot read image" in msg
    print(msg, file=_strict_utf8())  # printable: no UnicodeEncodeError
    # a data file whose own name is not UTF-8
    bad_name = os.fsdecode(folder + b"/d\xe9ta.json")
    with pytest.raises(DataError) as e:
        data.read_sft(bad_name)
    assert str(e.value) == f"{tmp_path}/d\\xe9ta.json: file not found"
    assert data.printable("ok é") == "ok é" and data.printable("\ud800") == "\\ud800"


def test_duplicate_records_refused_or_skipped(tmp_path):
    """An exact copy of an earlier record with the same id is refused (naming the file, the id and both
    records), or skipped and counted; records that only share an id, or have none, are kept."""
    mmhal = {"question_type": "counting", "question_topic": "animal", "image_id": "x1",
             "image_src": "https://example.org/img/abc.jpg", "image_content": ["Cat", "Dog"],
             "question": "How many?", "gt_answer": "Two.", "model_answer": ""}
    no_id = {"sft": {"conversations": TEXT_ONLY}, "preference": {k: v for k, v in GOOD_PREF.items() if k != "id"},
             "ppo": {k: v for k, v in GOOD_PPO.items() if k != "id"}, "mmhal": mmhal}
    other = {"sft": dict(GOOD_SFT, conversations=[TEXT_ONLY[0], {"from": "gpt", "value": "Hi!"}]),
             "preference": dict(GOOD_PREF, preference=2), "ppo": dict(GOOD_PPO, answer="no"),
             "mmhal": dict(mmhal, id="g", gt_answer="Three.")}
    readers = {"sft": data.read_sft, "preference": data.read_preferences, "ppo": data.read_ppo_prompts,
               "mmhal": data.read_mmhal}
    for kind, good in (("sft", GOOD_SFT), ("preference", GOOD_PREF), ("ppo", GOOD_PPO),
                       ("mmhal", dict(mmhal, id="g"))):
        # 0: id g; 1: id g, other content (kept); 2: a copy of 0; 3, 4: no id, equal (not compared)
        path = _write(tmp_path / f"{kind}.json", [good, other[kind], good, no_id[kind], no_id[kind]])
        with pytest.raises(DataError) as e:
            readers[kind](path)
        assert str(e.value) == (f"{path}: record 2: duplicate of record 0 (id 'g', same content); "
                                "delete one copy or give it its own id")
        skips = Skips()
        out = readers[kind](path, on_error="skip", skips=skips)
        kept = [good, other[kind], no_id[kind], no_id[kind]]
        assert out == kept if kind == "mmhal" else [r["index"] for r in out] == [0, 1, 3, 4]
        assert skips.count == 1 and skips.indices == [2] and "duplicate of record 0" in skips.reasons[0]
    # the same id as an int and as a string is the same id
    path = _write(tmp_path / "n.json", [dict(GOOD_SFT, id=7), dict(GOOD_SFT, id="7")])
    with pytest.raises(DataError, match="record 1: duplicate of record 0 .id '7'"):
        data.read_sft(path)


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
    # drawn as the training loops draw a batch
    sampler = ResumableSampler(len(ds), seed=0, drop_last=False)
    assert [collate_right([ds[i] for i in sampler.take(2)], tok.pad_id)["input_ids"].shape[0]
            for _ in range(2)] == [2, 2]


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

def _perm(n, seed, epoch):
    """The reference order of an epoch: numpy's permutation from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_ranks_disjoint_and_covering(drop_last):
    n, w = 23, 2
    per_rank = n // w if drop_last else -(-n // w)
    samplers = [ResumableSampler(n, rank=r, world_size=w, seed=5, drop_last=drop_last) for r in range(w)]
    shards = [s.take(per_rank) for s in samplers]
    order = _perm(n, 5, 0)
    if drop_last:
        assert shards == [order[0:22:2], order[1:22:2]]  # the last item waits for the next epoch
    else:
        assert shards == [order[0::2], order[1::2] + order[:1]]  # the tail wraps to the start of the order
        assert set(shards[0] + shards[1]) == set(range(n))
    # the next take starts the next epoch on every rank
    assert [s.take(1) for s in samplers] == [[_perm(n, 5, 1)[0]], [_perm(n, 5, 1)[1]]]


def test_sampler_deterministic_from_seed_and_epoch():
    def run(seed, epochs):
        s = ResumableSampler(40, seed=seed)
        return [s.take(40) for _ in range(epochs)]
    assert run(0, 2) == [_perm(40, 0, 0), _perm(40, 0, 1)]
    assert run(0, 1) == run(0, 1) and run(0, 1) != run(1, 1)
    assert run(0, 2)[1] != run(1, 1)[0]  # (seed, epoch) pairs do not collide like seed + epoch would
    assert ResumableSampler(5, shuffle=False).take(7) == [0, 1, 2, 3, 4, 0, 1]
    with pytest.raises(ValueError, match="yields nothing"):
        ResumableSampler(1, rank=0, world_size=2).take(1)


def test_sampler_resume_mid_epoch():
    s = ResumableSampler(50, rank=1, world_size=2, seed=3, drop_last=False)
    s.load_state_dict({"epoch": 2, "position": 0})
    head = s.take(7)
    state = s.state_dict()
    assert state == {"epoch": 2, "position": 14, "seed": 3, "num_items": 50}
    rest = s.take(18)
    s2 = ResumableSampler(50, rank=1, world_size=2, seed=3, drop_last=False)
    s2.load_state_dict(state)
    assert s2.take(18) == rest
    assert head + rest == _perm(50, 3, 2)[1::2]
    # a finished epoch moves on to the next one at the next take, from its start
    assert s.state_dict()["epoch"] == 2 and s.take(1) == [_perm(50, 3, 3)[1]] and s.state_dict()["epoch"] == 3
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(50, seed=4).load_state_dict(state)


def test_sampler_resume_with_a_new_world_size():
    s = ResumableSampler(30, rank=0, world_size=1, seed=0)
    got = [s.take(4) for _ in range(3)]
    state = s.state_dict()
    assert state["position"] == 12 and sum(got, []) == _perm(30, 0, 0)[:12]
    # resuming on 3 ranks shares out exactly the remaining items
    parts = []
    for r in range(3):
        sr = ResumableSampler(30, rank=r, world_size=3, seed=0, drop_last=False)
        sr.load_state_dict(state)
        parts.append(sr.take(6))
    assert sorted(sum(parts, [])) == sorted(_perm(30, 0, 0)[12:])


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
        "print(json.dumps([s.rank, s.world_size, s.take(11)]))\n"
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
    # the good record twice, under two ids: an exact copy would be refused as a duplicate
    return _write(tmp_path / f"{kind}{ext}", [good, bad, dict(good, id="g2")])


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
    p.write_text(json.dumps(GOOD_SFT) + "\n{not json\n" + json.dumps(dict(GOOD_SFT, id="g2")) + "\n")
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
