"""The tiny world: a synthetic visual world small enough that the whole LLaVA-RLHF pipeline runs on a CPU
in minutes, and simple enough that every answer can be checked against the truth.

Each image is 64x64 pixels: one to three shapes of distinct kinds (circle, square, triangle), each in its
own quadrant, in one of five colours and two sizes, on one of four backgrounds. Its scene graph is the
ground truth. Answers are short templated sentences ("The circle is red.", "There is no triangle."), so
`extract_claims` can parse them back into claims and `check_claims` can test those against the scene.
That checker stands in for the humans of the paper twice: as the annotator that labels which of two
responses hallucinates less, and as the MMHal judge that rates answers 0-6 (`rule_judge`).

Commands:
    python tinyworld.py make --out DIR [--seed 0] [--n_sft_images 3000] [--n_sft 20000] [--n_read 6000] ...
        writes images, captions, scenes, SFT conversations, PPO prompts, preference prompts,
        the 96-item MMHal-style evaluation set, a sentencepiece tokenizer and meta.json.
    python tinyworld.py annotate --data DIR --responses FILE --out FILE [--noise 0.0] [--seed 0]
        labels pairs of sampled responses (records with output_1/output_2) by checking their claims
        against the scene graph: the preference format of SPEC section 3.
    python tinyworld.py collect --data DIR --model runs/sft/final --out prefs.json
        samples the two responses per preference prompt from the SFT model, then labels them.
    python tinyworld.py eval --model_path DIR --template DATA/eval/mmhal_tiny.json --out FILE
        [--image_folder DATA/eval/images, any other eval_mmhal.py flag]
        eval_mmhal.py's evaluation with the rule judge below (eval_mmhal.main(argv, rule_judge=rule_judge)).
    python tinyworld.py pipeline --out tiny_out [--size full|smoke] [--seed 0] [--seeds 1] [--reuse true]
                                     [--side_by_side true]
        the whole paper in miniature with the real stage scripts, per seed in tiny_out/seed{s}/: make ->
        sft -> collect -> RL-init (LoRA) -> reward model with and without facts -> PPO from RL-init with
        each (held-out proxy and gold every 10 steps) -> evaluation of SFT, RL-init and both RLHF models,
        paired tests; with --seeds K, each seed and the pooled result. Finished stages are reused. The two
        reward models, and then the two PPO arms, run side by side in two processes (Stages.run_side_by_side).

The model trained is model.PRESETS["tiny"] with the tokenizer's vocabulary (SPEC section 7); the
stages' tiny settings are their own PRESETS["tiny"].

Layout written by `make` (DIR/):
    images/*.png                training images (SFT, PPO and preference pools, disjoint)
    captions.json               image file name -> list of captions (the "facts" for the reward model)
    scenes.json                 image file name -> scene graph
    sft.json                    LLaVA conversations, some multi-turn, plus n_read text-only reading
                                ones (answer from captions / does a statement agree with them)
    ppo_prompts.json            prompts with answer_type / answer / length_multiplier
    preference_prompts.json     same format, own images, for the simulated annotator
    heldout_prompts.json        same format, own images no stage trains on (evaluate_model, gold_judge)
    eval/mmhal_tiny.json        96 items, MMHal template fields plus "scene"
    eval/images/<image_id>.png  evaluation images
    eval/pope_<split>.jsonl     POPE questions (random / popular / adversarial) about the held-out images
    rm_request.txt              the reward model's rating request (reward_model.py --request_file)
    rm_facts_intro.txt          the sentence before the captions in it (--facts_intro_file)
    tokenizer.model             sentencepiece (unk 0, bos 1, eos 2, byte fallback)
    meta.json                   seed, counts, vocabulary size, the tiny model's config
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image, ImageDraw

import common
import data
import eval_mmhal
import eval_pope
import model
import plots
import ppo
import report
import reward_model
import sft

# ----------------------------------------------------------------------------------------------------
# The world's vocabulary. Everything below is built from these lists, so the parser and the generator
# cannot drift apart.

IMAGE_SIZE = 64
KINDS = ["circle", "square", "triangle"]
COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "yellow": (245, 210, 30),
          "purple": (140, 50, 180), "black": (25, 25, 25)}
SIZES = ["small", "large"]
# Quadrant name -> (column, row). Reading order, which is also the order of shapes in a scene graph.
QUADS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
# Backgrounds chosen so that no shape colour blends into any of them (hence no white shapes, no green).
BACKGROUNDS = {"grass": (70, 140, 60), "sand": (205, 175, 115), "snow": (232, 236, 240),
               "stone": (120, 120, 125)}
NUM_WORDS = ["no", "one", "two", "three", "four"]
NUMBERS = {"no": 0, "zero": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
           "0": 0, "1": 1, "2": 2, "3": 3, "4": 4, "5": 5}
RELATIONS = {"to the left of": "left", "left of": "left", "to the right of": "right",
             "right of": "right", "above": "above", "below": "below"}
REL_TEXT = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}

MMHAL_TOPICS = ["outdoor", "vehicle", "person", "animal", "food", "sports", "kitchen", "accessory",
                "electronic", "furniture", "indoor", "appliance"]


# ----------------------------------------------------------------------------------------------------
# Scenes and images

def sample_scene(rng: random.Random, min_shapes: int = 1, background: str | None = None,
                 must_have: str | None = None) -> dict:
    """A random scene graph: distinct kinds in distinct quadrants; colours may repeat (so that counting
    by colour is not trivial). Plain JSON types only."""
    n = rng.randint(min_shapes, len(KINDS))
    kinds = rng.sample(KINDS, n)
    if must_have is not None and must_have not in kinds:
        kinds[0] = must_have
    quads = rng.sample(list(QUADS), n)
    shapes = []
    for kind, quad in zip(kinds, quads):
        size = rng.choice(SIZES)
        extent = rng.randint(20, 26) if size == "large" else rng.randint(10, 14)
        col, row = QUADS[quad]
        slack = max(0, (32 - extent) // 2 - 2)  # keep a 2-pixel margin inside the quadrant
        cx = col * 32 + 16 + rng.randint(-slack, slack)
        cy = row * 32 + 16 + rng.randint(-slack, slack)
        x0, y0 = cx - extent // 2, cy - extent // 2
        shapes.append({"kind": kind, "color": rng.choice(list(COLORS)), "size": size, "quadrant": quad,
                       "box": [x0, y0, x0 + extent - 1, y0 + extent - 1]})
    order = list(QUADS)
    shapes.sort(key=lambda s: order.index(s["quadrant"]))
    return {"background": background or rng.choice(list(BACKGROUNDS)), "shapes": shapes,
            "seed": rng.getrandbits(31)}


def render(scene: dict) -> Image.Image:
    """Draw a scene. Texture and colour jitter come from the scene's own seed, so a scene graph always
    gives the same pixels."""
    rng = np.random.default_rng(scene["seed"])
    base = np.array(BACKGROUNDS[scene["background"]], dtype=np.float32) + rng.integers(-10, 11, size=3)
    # Texture as 4x4-pixel blocks of brightness: looks like a surface, and keeps a PNG under 1 KB
    # (per-pixel noise would make each one 9 KB and the data set 80 MB).
    blocks = rng.normal(0.0, 8.0, size=(IMAGE_SIZE // 4, IMAGE_SIZE // 4, 1)).astype(np.float32)
    pix = base + np.kron(blocks, np.ones((4, 4, 1), dtype=np.float32))
    img = Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        jitter = rng.integers(-12, 13, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[s["color"]]) + jitter, 0, 255))
        x0, y0, x1, y1 = s["box"]
        if s["kind"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=rgb)
        elif s["kind"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=rgb)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)
    return img


# ----------------------------------------------------------------------------------------------------
# Saying things about a scene. Every sentence produced here must parse back with `extract_claims`.

def _np(s: dict, size: bool = False, color: bool = True) -> str:
    words = ([s["size"]] if size else []) + ([s["color"]] if color else []) + [s["kind"]]
    return " ".join(words)


def _count_sentence(n: int, noun: str) -> str:
    if n == 1:
        return f"There is one {noun}."
    return f"There are {NUM_WORDS[n]} {noun}s."


def _rel(a: dict, b: dict) -> list[str]:
    """The relations that hold from a to b, horizontal first."""
    (ca, ra), (cb, rb) = QUADS[a["quadrant"]], QUADS[b["quadrant"]]
    out = []
    if ca != cb:
        out.append("left" if ca < cb else "right")
    if ra != rb:
        out.append("above" if ra < rb else "below")
    return out


def _rel_sentences(a: dict, b: dict) -> str:
    return " ".join(f"The {_np(a)} is {REL_TEXT[r]} the {_np(b)}." for r in _rel(a, b))


def describe(scene: dict) -> str:
    """The holistic description: how many shapes on what, then each shape with size, colour and place."""
    shapes = scene["shapes"]
    n = len(shapes)
    head = (f"There is one shape on {scene['background']}." if n == 1
            else f"There are {NUM_WORDS[n]} shapes on {scene['background']}.")
    parts = [head] + [f"There is a {_np(s, size=True)} in the {s['quadrant']}." for s in shapes]
    return " ".join(parts)


def make_captions(scene: dict, rng: random.Random) -> list[str]:
    """COCO-like facts: several short true sentences per image (the reward model's captions)."""
    shapes = scene["shapes"]
    caps = [describe(scene).split(". ")[0] + "."]
    caps += [f"There is a {_np(s, size=True)} in the {s['quadrant']}." for s in shapes]
    if len(shapes) >= 2:
        a, b = rng.sample(shapes, 2)
        caps.append(f"The {_np(a)} is {REL_TEXT[_rel(a, b)[0]]} the {_np(b)}.")
    absent = [k for k in KINDS if k not in {s["kind"] for s in shapes}]
    if absent:
        caps.append(f"There is no {rng.choice(absent)}.")
    caps.append(f"The background is {scene['background']}.")
    return caps


# ----------------------------------------------------------------------------------------------------
# Questions and answers. Each generator returns a QA dict:
#   {"question", "answer", "answer_type": "general"|"yes_no"|"multiple_choice", "key"}
# where key is "yes"/"no" for yes/no questions, the correct letter for multiple choice, else None.
# A generator returns None when the scene cannot support its question type (e.g. comparison needs two
# shapes); callers sample another type or scene.

def _qa(question: str, answer: str, answer_type: str = "general", key: str | None = None) -> dict:
    return {"question": question, "answer": answer, "answer_type": answer_type, "key": key}


def _yn(question: str, truth: bool, yes: str, no: str) -> dict:
    """A yes/no QA whose answer is `yes` when `truth` holds, else `no`."""
    return _qa(question, yes if truth else no, "yes_no", "yes" if truth else "no")


def _pick(scene: dict, rng: random.Random, focus: str | None) -> dict:
    shapes = scene["shapes"]
    focused = [s for s in shapes if s["kind"] == focus]
    return focused[0] if focused else rng.choice(shapes)


def _other_color(rng: random.Random, color: str) -> str:
    return rng.choice([c for c in COLORS if c != color])


def _yes_no_color(scene: dict, rng: random.Random, focus: str | None = None) -> dict:
    s = _pick(scene, rng, focus)
    c = s["color"] if rng.random() < 0.5 else _other_color(rng, s["color"])
    return _yn(f"Is the {s['kind']} {c}?", c == s["color"], f"Yes, the {s['kind']} is {c}.",
               f"No, the {s['kind']} is {s['color']}.")


def qa_attribute(scene: dict, rng: random.Random, focus: str | None = None) -> dict | None:
    s = _pick(scene, rng, focus)
    r = rng.random()
    if r < 0.5:
        return _qa(f"What color is the {s['kind']}?", f"The {s['kind']} is {s['color']}.")
    if r < 0.8:
        q = rng.choice(["What size is the {}?", "How big is the {}?"]).format(_np(s))
        return _qa(q, f"The {_np(s)} is {s['size']}.")
    return _yes_no_color(scene, rng, focus)


def qa_adversarial(scene: dict, rng: random.Random, focus: str | None = None) -> dict | None:
    """Questions that presuppose something absent; the right answer denies it (MMHal 'adversarial')."""
    absent = [k for k in KINDS if k not in {s["kind"] for s in scene["shapes"]}]
    r = rng.random()
    if absent and r < 0.5:
        k = rng.choice(absent)
        q = rng.choice(["What color is the {}?", "Where is the {}?", "How big is the {}?"]).format(k)
        return _qa(q, f"There is no {k}.")
    s = _pick(scene, rng, focus)
    c = _other_color(rng, s["color"])
    if r < 0.8:
        q = rng.choice(["Where is the {} {}?", "How big is the {} {}?"]).format(c, s["kind"])
        return _qa(q, f"There is no {c} {s['kind']}. The {s['kind']} is {s['color']}.")
    return _qa(f"Is there a {c} {s['kind']} in the image?", f"No, there is no {c} {s['kind']}.",
               "yes_no", "no")


def qa_comparison(scene: dict, rng: random.Random, focus: str | None = None) -> dict | None:
    if len(scene["shapes"]) < 2:
        return None
    a = _pick(scene, rng, focus)
    b = rng.choice([s for s in scene["shapes"] if s is not a])
    if rng.random() < 0.5:
        a, b = b, a
    r = rng.random()
    if r < 0.7:
        bigger = r < 0.4
        q = f"Which is {'larger' if bigger else 'smaller'}, the {_np(a)} or the {_np(b)}?"
        if a["size"] == b["size"]:
            return _qa(q, f"The {_np(a)} and the {_np(b)} are the same size.")
        big, small = (a, b) if a["size"] == "large" else (b, a)
        if bigger:
            return _qa(q, f"The {_np(big)} is larger than the {_np(small)}.")
        return _qa(q, f"The {_np(small)} is smaller than the {_np(big)}.")
    colors = f"the {a['kind']} is {a['color']}. The {b['kind']} is {b['color']}."
    return _yn(f"Do the {a['kind']} and the {b['kind']} have the same color?", a["color"] == b["color"],
               "Yes, " + colors, "No, " + colors)


def qa_counting(scene: dict, rng: random.Random, focus: str | None = None) -> dict | None:
    shapes = scene["shapes"]
    r = rng.random()
    if r < 0.35:
        return _qa("How many shapes are there?", _count_sentence(len(shapes), "shape"))
    if r < 0.85:
        attr, values = ("color", list(COLORS)) if r < 0.7 else ("size", SIZES)
        v = rng.choice(values)
        n = sum(s[attr] == v for s in shapes)
        return _qa(f"How many {v} shapes are there?", _count_sentence(n, f"{v} shape"))
    k = focus if focus and rng.random() < 0.5 else rng.choice(KINDS)
    n = sum(s["kind"] == k for s in shapes)
    return _qa(f"How many {k}s are there?", _count_sentence(n, k))


def qa_relation(scene: dict, rng: random.Random, focus: str | None = None) -> dict | None:
    shapes = scene["shapes"]
    if len(shapes) < 2:
        return None
    a = _pick(scene, rng, focus)
    b = rng.choice([s for s in shapes if s is not a])
    r = rng.random()
    if r < 0.45:
        return _qa(f"Where is the {_np(a)} relative to the {_np(b)}?", _rel_sentences(a, b))
    rel = rng.choice(list(REL_TEXT))
    if r < 0.75:
        hits = [s for s in shapes if s is not b and rel in _rel(s, b)]
        q = f"What is {REL_TEXT[rel]} the {_np(b)}?"
        if not hits:
            return _qa(q, f"There is nothing {REL_TEXT[rel]} the {_np(b)}.")
        return _qa(q, " ".join(f"The {_np(s)} is {REL_TEXT[rel]} the {_np(b)}." for s in hits))
    # "No" states the relations that hold: "The red circle is above the blue square." -> "No, the red ..."
    return _yn(f"Is the {_np(a)} {REL_TEXT[rel]} the {_np(b)}?", rel in _rel(a, b),
               f"Yes, the {_np(a)} is {REL_TEXT[rel]} the {_np(b)}.", "No, t" + _rel_sentences(a, b)[1:])


def qa_environment(scene: dict, rng: random.Random, focus: str | None = None) -> dict | None:
    bg = scene["background"]
    r = rng.random()
    if r < 0.6:
        q = rng.choice(["What is the background of the image?", "Where is this picture taken?",
                        "What is the ground in this picture?"])
        return _qa(q, f"The background is {bg}.")
    if r < 0.8:
        if len(scene["shapes"]) == 1:
            return _qa("What are the shapes on?", f"The {_np(scene['shapes'][0])} is on {bg}.")
        return _qa("What are the shapes on?", f"The shapes are on {bg}.")
    other = bg if rng.random() < 0.5 else rng.choice([b for b in BACKGROUNDS if b != bg])
    return _yn(f"Is the background {other}?", other == bg, f"Yes, the background is {bg}.",
               f"No, the background is {bg}.")


def qa_holistic(scene: dict, rng: random.Random, focus: str | None = None) -> dict | None:
    q = rng.choice(["Describe the image in detail.", "What do you see in this image?",
                    "Give a short description of the image.", "What is in this picture?"])
    return _qa(q, describe(scene))


def qa_other(scene: dict, rng: random.Random, focus: str | None = None) -> dict | None:
    """Position questions: what is where, which quadrant is empty."""
    shapes = scene["shapes"]
    by_quad = {s["quadrant"]: s for s in shapes}
    r = rng.random()
    if r < 0.45:
        quad = rng.choice(list(QUADS))
        q = rng.choice(["What is in the {} of the image?", "What is in the {}?"]).format(quad)
        if quad not in by_quad:
            return _qa(q, f"There is nothing in the {quad}.")
        return _qa(q, f"There is a {_np(by_quad[quad], size=True)} in the {quad}.")
    if r < 0.8:
        s = _pick(scene, rng, focus)
        q = rng.choice(["Where is the {}?", "Which part of the image is the {} in?"]).format(s["kind"])
        return _qa(q, f"The {_np(s)} is in the {s['quadrant']}.")
    empty = [quad for quad in QUADS if quad not in by_quad]
    return _qa("Which part of the image is empty?", " ".join(f"There is nothing in the {e}." for e in empty))


def qa_yes_no(scene: dict, rng: random.Random, focus: str | None = None) -> dict | None:
    """Existence and attribute yes/no questions, half of them true."""
    r = rng.random()
    if r < 0.6:
        if rng.random() < 0.5:
            s = rng.choice(scene["shapes"])
            ref = _np(s, size=rng.random() < 0.3)
            return _qa(f"Is there a {ref} in the image?", f"Yes, there is a {ref}.", "yes_no", "yes")
        present = {(s["color"], s["kind"]) for s in scene["shapes"]}
        c, k = rng.choice([(c, k) for c in COLORS for k in KINDS if (c, k) not in present])
        return _qa(f"Is there a {c} {k} in the image?", f"No, there is no {c} {k}.", "yes_no", "no")
    return _yes_no_color(scene, rng, focus)


def _mc(stem: str, options: list[str], correct: str, sentence: str) -> dict:
    letter = "ABCD"[options.index(correct)]
    q = stem + "".join(f"\n{L}. {o}" for L, o in zip("ABCD", options))
    return _qa(q, f"{letter}. {sentence}", "multiple_choice", letter)


def qa_multiple_choice(scene: dict, rng: random.Random, focus: str | None = None) -> dict | None:
    """A-OKVQA style: four lettered options; the answer starts with the letter ("B. ...")."""
    shapes = scene["shapes"]
    s = _pick(scene, rng, focus)
    r = rng.random()
    if r < 0.25:
        opts = rng.sample([c for c in COLORS if c != s["color"]], 3) + [s["color"]]
        rng.shuffle(opts)
        return _mc(f"What color is the {s['kind']}?", opts, s["color"], f"The {s['kind']} is {s['color']}.")
    if r < 0.45:
        n = len(shapes)
        opts = ["one", "two", "three", "four"]
        rng.shuffle(opts)  # shuffled everywhere so that no letter is right more often than another
        return _mc("How many shapes are there?", opts, NUM_WORDS[n], _count_sentence(n, "shape"))
    if r < 0.6:
        c = rng.choice(list(COLORS))
        n = sum(x["color"] == c for x in shapes)
        opts = ["zero", "one", "two", "three"]
        right = opts[n]
        rng.shuffle(opts)
        return _mc(f"How many {c} shapes are there?", opts, right, _count_sentence(n, f"{c} shape"))
    if r < 0.75:
        opts = list(QUADS)
        rng.shuffle(opts)
        return _mc(f"Where is the {s['kind']}?", opts, s["quadrant"], f"The {_np(s)} is in the {s['quadrant']}.")
    if r < 0.87:
        opts = list(BACKGROUNDS)
        rng.shuffle(opts)
        bg = scene["background"]
        return _mc("What is the background of the image?", opts, bg, f"The background is {bg}.")
    quad = rng.choice(list(QUADS))
    hit = [x for x in shapes if x["quadrant"] == quad]
    opts = KINDS + ["nothing"]
    rng.shuffle(opts)
    if hit:
        return _mc(f"What is in the {quad}?", opts, hit[0]["kind"],
                   f"There is a {_np(hit[0], size=True)} in the {quad}.")
    return _mc(f"What is in the {quad}?", opts, "nothing", f"There is nothing in the {quad}.")


def qa_caption(scene: dict, rng: random.Random, focus: str | None = None) -> dict | None:
    q = rng.choice(["Write a short caption for the image.", "Describe the image briefly."])
    return _qa(q, rng.choice(make_captions(scene, rng)[:2]))


GENERATORS = {"attribute": qa_attribute, "adversarial": qa_adversarial, "comparison": qa_comparison,
              "counting": qa_counting, "relation": qa_relation, "environment": qa_environment,
              "holistic": qa_holistic, "other": qa_other, "yes_no": qa_yes_no,
              "multiple_choice": qa_multiple_choice, "caption": qa_caption}

# SFT mixture. Adversarial questions are rarer than the rest on purpose: the paper's SFT data has few
# questions about absent things, which is why SFT models invent them and RLHF has something to fix.
SFT_WEIGHTS = {"attribute": 1.0, "adversarial": 0.4, "comparison": 0.8, "counting": 1.0, "relation": 0.8,
               "environment": 0.6, "holistic": 0.8, "other": 0.8, "yes_no": 1.0, "multiple_choice": 0.8,
               "caption": 0.4}
# PPO prompts: open questions of all eight MMHal types, plus multiple choice and yes/no items whose
# symbolic correctness rewards PPO uses (SPEC 5).
PPO_WEIGHTS = {**{t: 1.0 for t in data.MMHAL_TYPES}, "multiple_choice": 2.0, "yes_no": 2.0}


def ask(scene: dict, qtype: str, rng: random.Random, focus: str | None = None) -> dict | None:
    """One QA of `qtype` (an MMHal type, "yes_no", "multiple_choice" or "caption") about `scene`."""
    qa = GENERATORS[qtype](scene, rng, focus)
    if qa is not None:
        qa["qtype"] = qtype
    return qa


def ask_weighted(scene: dict, weights: dict[str, float], rng: random.Random) -> dict:
    types, w = list(weights), list(weights.values())
    while True:
        qa = ask(scene, rng.choices(types, w)[0], rng)
        if qa is not None:
            return qa


# ----------------------------------------------------------------------------------------------------
# Claims. A claim is a hashable tuple; a reference to shapes ("the large red circle") is a tuple
# ref = (size|None, color|None, kind|None). Claim forms:
#   ("count", ref, n, exact)      exact: exactly n shapes match ref; else at least n ("there is a ...")
#   ("at", ref, quad)             a shape matching ref is in quad
#   ("empty", quad)               nothing is in quad
#   ("color", ref, color)  ("size", ref, size)
#   ("rel", ref_a, rel, ref_b)    rel in left/right/above/below
#   ("none_rel", rel, ref_b)      no shape is rel of b
#   ("cmp", ref_a, op, ref_b)     op in larger/smaller/same
#   ("same_color", ref_a, ref_b, flag)
#   ("background", name)
#   ("not", claim)
# A sentence that does not parse gives no claim: it is uninformative, never a hallucination.

_KIND_WORDS = {**{k: k for k in KINDS}, **{k + "s": k for k in KINDS}, "shape": None, "shapes": None,
               "object": None, "objects": None}
_DETS = {"a", "an", "the", "any", "some"} | set(NUMBERS)
_COLOR_RE = "|".join(COLORS)
_SIZE_RE = "|".join(SIZES)
_QUAD_RE = "|".join(QUADS)
_BG_RE = "|".join(BACKGROUNDS)
_REL_RE = "|".join(sorted(RELATIONS, key=len, reverse=True))
_SIZE_OPS = {"larger": "larger", "bigger": "larger", "smaller": "smaller"}


def parse_ref(text: str) -> tuple[tuple, str | None] | None:
    """'two large red circles' -> ((large, red, circle), 'two'); None if it is not a shape phrase."""
    words = text.split()
    det = words.pop(0) if words and words[0] in _DETS else None
    if not words or words[-1] not in _KIND_WORDS:
        return None
    size = color = None
    for w in words[:-1]:
        if w in SIZES and size is None:
            size = w
        elif w in COLORS and color is None:
            color = w
        else:
            return None
    return (size, color, _KIND_WORDS[words[-1]]), det


def _ref(text: str) -> tuple | None:
    p = parse_ref(text)
    return None if p is None else p[0]


def _count_claim(ref: tuple, det: str | None) -> tuple:
    if det in (None, "a", "an", "some", "any", "the"):
        return ("count", ref, 1, False)
    return ("count", ref, NUMBERS[det], True)


# Sentence patterns, tried in order; each handler returns a list of claims or None (no parse).
def _h_there(m: re.Match) -> list | None:
    p = parse_ref(m["np"])
    if p is None:
        return None
    ref, det = p
    c = _count_claim(ref, det)
    if m["quad"]:
        at = ("at", ref, m["quad"])
        return [("not", at)] if c[2] == 0 else [at]
    out = [c]
    if m["bg"]:
        out.append(("background", m["bg"]))
    return out


def _h_refs(groups: str, claims):
    """A handler for a sentence about shapes, one per named group ("ab": groups a and b): claims(m, *refs)
    once every one of them parses as a shape phrase."""
    def h(m):
        refs = [_ref(m[g]) for g in groups]
        return None if None in refs else claims(m, *refs)
    return h


_h_at = _h_refs("a", lambda m, a: [("at", a, m["quad"])])
_h_none_rel = _h_refs("b", lambda m, b: [("none_rel", RELATIONS[m["rel"]], b)])
_h_rel = _h_refs("ab", lambda m, a, b: [("rel", a, RELATIONS[m["rel"]], b)])
_h_cmp = _h_refs("ab", lambda m, a, b: [("cmp", a, _SIZE_OPS[m["op"]], b)])
_h_same_size = _h_refs("ab", lambda m, a, b: [("cmp", a, "same", b)])
_h_same_color = _h_refs("ab", lambda m, a, b: [("same_color", a, b, not m["neg"])])
_h_both = _h_refs("ab", lambda m, a, b: [("color", a, m["color"]), ("color", b, m["color"])])


def _h_attr(name: str):
    def claim(m, a):
        c = (name, a, m["val"])
        return [("not", c) if m["neg"] else c]
    return _h_refs("a", claim)


def _h_on(m):
    if m["a"] in ("shapes", "objects"):
        return [("background", m["bg"])]
    p = parse_ref(m["a"])
    return p and [_count_claim(p[0], None), ("background", m["bg"])]


_SENTENCE_PATTERNS = [
    (rf"^there (?:is|are) nothing in the (?P<quad>{_QUAD_RE})$", lambda m: [("empty", m["quad"])]),
    (rf"^the (?P<quad>{_QUAD_RE}) is empty$", lambda m: [("empty", m["quad"])]),
    (rf"^there (?:is|are) nothing (?P<rel>{_REL_RE}) (?P<b>.+)$", _h_none_rel),
    (rf"^there (?:is|are) (?P<np>.+?)(?: in the (?P<quad>{_QUAD_RE}))?(?: on (?:the )?(?P<bg>{_BG_RE}))?$",
     _h_there),
    (rf"^(?:the )?(?P<a>.+?) (?:is|are) in the (?P<quad>{_QUAD_RE})$", _h_at),
    (rf"^(?:the )?(?P<a>.+?) (?:is|are) (?P<rel>{_REL_RE}) (?P<b>.+)$", _h_rel),
    (r"^(?:the )?(?P<a>.+?) (?:is|are) (?P<op>larger|bigger|smaller) than (?P<b>.+)$", _h_cmp),
    (r"^(?:the )?(?P<a>.+?) and (?P<b>.+?) are the same size$", _h_same_size),
    (r"^(?:the )?(?P<a>.+?) and (?P<b>.+?) (?:are|have) (?P<neg>not )?the same colou?r$", _h_same_color),
    (rf"^(?:the )?(?P<a>.+?) and (?P<b>.+?) are (?:both )?(?P<color>{_COLOR_RE})$", _h_both),
    (rf"^(?:the )?(?P<a>.+?) (?:is|are) (?P<neg>not )?(?P<val>{_COLOR_RE})$", _h_attr("color")),
    (rf"^(?:the )?(?P<a>.+?) (?:is|are) (?P<neg>not )?(?P<val>{_SIZE_RE})$", _h_attr("size")),
    (rf"^the background is (?P<neg>not )?(?P<val>{_BG_RE})$",
     lambda m: [("not", ("background", m["val"])) if m["neg"] else ("background", m["val"])]),
    (rf"^(?:this picture is taken|it is) on (?:the )?(?P<bg>{_BG_RE})$", lambda m: [("background", m["bg"])]),
    (rf"^(?:the )?(?P<a>.+?) (?:is|are) on (?:the )?(?P<bg>{_BG_RE})$", _h_on),
]
_SENTENCE_PATTERNS = [(re.compile(p), h) for p, h in _SENTENCE_PATTERNS]


def _norm(text: str) -> str:
    t = text.lower().strip()
    t = re.sub(r"\s+(?:in|of) (?:the|this) (?:image|picture)\b", "", t)
    return re.sub(r"\s+", " ", t).strip(" .!?,;:")


def _parse_sentence(s: str) -> list | None:
    s = _norm(s)
    for pat, handler in _SENTENCE_PATTERNS:
        m = pat.match(s)
        if m:
            out = handler(m)
            if out:
                return out
    return None


# Question frames: how a bare "Yes"/"No", an option letter or a one-word answer becomes a claim.
# A yes/no frame gives the claim that "Yes" asserts ("No" asserts its negation); a wh-frame turns the
# asked-for value (an option's text or a bare answer) into a claim. Both reuse the sentence handlers.

def _first(claims: list | None) -> tuple | None:
    return claims[0] if claims else None


def _yn_frames() -> list:
    def exists(m):
        r = _ref(m["a"])
        if r is None:
            return None
        return ("at", r, m["quad"]) if m["quad"] else ("count", r, 1, False)

    pats = [
        (rf"^(?:is|are) there (?P<a>.+?)(?: in the (?P<quad>{_QUAD_RE}))?$", exists),
        (rf"^is (?:the )?(?P<a>.+?) in the (?P<quad>{_QUAD_RE})$", lambda m: _first(_h_at(m))),
        (rf"^is (?:the )?(?P<a>.+?) (?P<rel>{_REL_RE}) (?P<b>.+)$", lambda m: _first(_h_rel(m))),
        (r"^is (?:the )?(?P<a>.+?) (?P<op>larger|bigger|smaller) than (?P<b>.+)$", lambda m: _first(_h_cmp(m))),
        (r"^do (?:the )?(?P<a>.+?) and (?P<b>.+?) have the same colou?r(?P<neg>)$",
         lambda m: _first(_h_same_color(m))),
        (rf"^is the background (?P<val>{_BG_RE})$", lambda m: ("background", m["val"])),
        (rf"^is (?:the )?(?P<a>.+?) (?P<neg>)(?P<val>{_COLOR_RE})$", lambda m: _first(_h_attr("color")(m))),
        (rf"^is (?:the )?(?P<a>.+?) (?P<neg>)(?P<val>{_SIZE_RE})$", lambda m: _first(_h_attr("size")(m))),
    ]
    return [(re.compile(p), f) for p, f in pats]


def _wh_frames() -> list:
    def slot(tag, values):
        def f(m, opt):
            r = _ref(m["a"])
            return r and opt in values and (tag, r, opt)
        return f

    def count(m, opt):
        r = _ref(m["a"])
        return r and opt in NUMBERS and ("count", r, NUMBERS[opt], True)

    def what_in(m, opt):
        if opt in ("nothing", "none"):
            return ("empty", m["quad"])
        r = _ref(opt)
        return r and ("at", r, m["quad"])

    pats = [
        (r"^what colou?r is (?:the )?(?P<a>.+)$", slot("color", COLORS)),
        (r"^(?:what size is|how big is) (?:the )?(?P<a>.+)$", slot("size", SIZES)),
        (r"^how many (?P<a>.+?) are there$", count),
        (r"^where is (?:the )?(?P<a>.+)$", slot("at", QUADS)),
        (r"^which part(?: of the image)? is (?:the )?(?P<a>.+?) in$", slot("at", QUADS)),
        (r"^(?:what is the background|where is this picture taken|what is the ground|what are the shapes on)$",
         lambda m, o: o in BACKGROUNDS and ("background", o)),
        (rf"^what is in the (?P<quad>{_QUAD_RE})$", what_in),
    ]
    return [(re.compile(p), f) for p, f in pats]


_YN_FRAMES = _yn_frames()
_WH_FRAMES = _wh_frames()


def _split_question(question: str) -> tuple[str, dict[str, str]]:
    """Stem (first line, normalised) and lettered options {'A': 'red', ...}."""
    lines = [ln.strip() for ln in question.replace("<image>", "").strip().split("\n") if ln.strip()]
    stem = _norm(lines[0]) if lines else ""
    opts = {}
    for ln in lines[1:]:
        m = re.match(r"^\(?([A-Da-d])[.):]\s*(.+)$", ln)
        if m:
            opts[m.group(1).upper()] = _norm(m.group(2))
    return stem, opts


def _frame_claim(frames: list, stem: str, *value: str) -> tuple | None:
    """The claim of the first frame that matches the question stem and yields one (value: the wh-slot)."""
    for pat, f in frames:
        m = pat.match(stem)
        if m:
            c = f(m, *value)
            if c:
                return c
    return None


def extract_claims(answer: str, question: str | None = None) -> list[tuple]:
    """Parse a templated answer into claims (deduplicated, in order). With the question, a leading
    "Yes"/"No", an option letter ("B.") or a bare one-word answer ("red") also counts as a claim."""
    text = answer.strip()
    claims: list[tuple] = []
    stem, opts = _split_question(question) if question else ("", {})
    # Multiple choice: "B. ..." or "... the correct option is B."
    letter = None
    m = re.match(r"^\(?([A-D])[.):](?:\s+|$)", text)
    if m:
        letter, text = m.group(1), text[m.end():]
    else:
        m = re.search(r"(?:correct option|answer) is \(?([A-D])\b[.)]?", text, flags=re.I)
        if m:
            letter, text = m.group(1).upper(), text[:m.start()] + text[m.end():]
    if letter and letter in opts:
        c = _frame_claim(_WH_FRAMES, stem, opts[letter])
        if c:
            claims.append(c)
    # Yes/No head: "No, there is no red circle." - the head answers the question's own claim.
    m = re.match(r"^(yes|no)(?:[,.!]\s*|\s*$)", text, flags=re.I)
    if m:
        text = text[m.end():]
        c = _frame_claim(_YN_FRAMES, stem) if stem else None
        if c:
            claims.append(c if m.group(1).lower() == "yes" else ("not", c))
    parsed_any = False
    for sent in re.split(r"[.!?;\n]+|,\s*(?=(?:and\s+)?(?:the|there)\b)", text):
        if not sent.strip():
            continue
        cs = _parse_sentence(sent)
        if cs:
            parsed_any = True
            claims.extend(cs)
    # A bare short answer to a wh-question ("red", "two", "top left").
    if not parsed_any and stem and not claims:
        c = _frame_claim(_WH_FRAMES, stem, _norm(text))
        if c:
            claims.append(c)
    return list(dict.fromkeys(claims))


# Truth of claims against a scene graph.

def _matches(scene: dict, ref: tuple) -> list[int]:
    size, color, kind = ref
    return [i for i, s in enumerate(scene["shapes"])
            if (size is None or s["size"] == size) and (color is None or s["color"] == color)
            and (kind is None or s["kind"] == kind)]


def _pairs(scene: dict, a: tuple, b: tuple):
    return [(i, j) for i in _matches(scene, a) for j in _matches(scene, b) if i != j]


def claim_true(scene: dict, c: tuple) -> bool:
    """Whether a claim holds in the scene. References to shapes are existential: "the red circle is in
    the top left" is false when there is no red circle."""
    shapes, tag = scene["shapes"], c[0]
    if tag == "not":
        return not claim_true(scene, c[1])
    if tag == "count":
        k = len(_matches(scene, c[1]))
        return k == c[2] if c[3] else k >= c[2]
    if tag == "at":
        return any(shapes[i]["quadrant"] == c[2] for i in _matches(scene, c[1]))
    if tag == "empty":
        return all(s["quadrant"] != c[1] for s in shapes)
    if tag == "color":
        return any(shapes[i]["color"] == c[2] for i in _matches(scene, c[1]))
    if tag == "size":
        return any(shapes[i]["size"] == c[2] for i in _matches(scene, c[1]))
    if tag == "rel":
        return any(c[2] in _rel(shapes[i], shapes[j]) for i, j in _pairs(scene, c[1], c[3]))
    if tag == "none_rel":
        return any(not any(c[1] in _rel(s, shapes[j]) for s in shapes if s is not shapes[j])
                   for j in _matches(scene, c[2]))
    if tag == "cmp":
        rank = {"small": 0, "large": 1}
        sign = {"larger": 1, "smaller": -1, "same": 0}[c[2]]
        return any(np.sign(rank[shapes[i]["size"]] - rank[shapes[j]["size"]]) == sign
                   for i, j in _pairs(scene, c[1], c[3]))
    if tag == "same_color":
        return any((shapes[i]["color"] == shapes[j]["color"]) == c[3] for i, j in _pairs(scene, c[1], c[2]))
    if tag == "background":
        return scene["background"] == c[1]
    raise ValueError(f"unknown claim {c!r}")


def claim_atoms(scene: dict, c: tuple) -> set:
    """The facts of the scene a true claim conveys, so that different wordings of the same fact
    ("There is no triangle." / "There are no triangles.") count once when measuring coverage."""
    shapes, tag = scene["shapes"], c[0]

    def shape_atoms(ref, idx):
        out = {("present", idx)}
        if ref[0]:
            out.add(("size", idx))
        if ref[1]:
            out.add(("color", idx))
        return out

    if tag == "count":
        out = {("count", c[1])}
        if c[1][2] is not None and c[2] >= 1:  # a named kind is a single shape: say which facts it gives
            for i in _matches(scene, c[1]):
                out |= shape_atoms(c[1], i)
        return out
    if tag == "at":
        out = {("quadcontent", c[2])}
        for i in _matches(scene, c[1]):
            if shapes[i]["quadrant"] == c[2]:
                out |= shape_atoms(c[1], i) | {("quad", i)}
        return out
    if tag == "empty":
        return {("quadcontent", c[1])}
    if tag in ("color", "size"):
        out = set()
        for i in _matches(scene, c[1]):
            out |= shape_atoms(c[1], i) | {(tag, i), ("present", i)}
        return out
    if tag in ("rel", "cmp", "same_color"):
        a, b = (c[1], c[3]) if tag != "same_color" else (c[1], c[2])
        out = set()
        for i, j in _pairs(scene, a, b):
            axis = {"left": "h", "right": "h", "above": "v", "below": "v"}.get(c[2], "")
            out |= {("present", i), ("present", j), (tag, min(i, j), max(i, j), axis)}
        return out
    if tag == "none_rel":
        return {("none_rel", c[1], j) for j in _matches(scene, c[2])}
    if tag == "background":
        return {("background",)}
    return {c}  # negations: the claim itself is the fact


@dataclass
class Verdict:
    claims: list = field(default_factory=list)
    true: list = field(default_factory=list)
    false: list = field(default_factory=list)
    atoms: set = field(default_factory=set)  # facts conveyed by the true claims

    @property
    def n_true(self) -> int:
        return len(self.true)

    @property
    def n_false(self) -> int:
        return len(self.false)


def verify(scene: dict, answer: str, question: str | None = None) -> Verdict:
    """Parse `answer` and check every claim against `scene`."""
    v = Verdict(claims=extract_claims(answer, question))
    for c in v.claims:
        if claim_true(scene, c):
            v.true.append(c)
            v.atoms |= claim_atoms(scene, c)
        else:
            v.false.append(c)
    return v


def check_claims(scene: dict, answer: str, question: str | None = None) -> tuple[int, int]:
    """(number of true claims, number of false claims) in `answer`."""
    v = verify(scene, answer, question)
    return v.n_true, v.n_false


def claim_text(c: tuple) -> str:
    """A short readable rendering of a claim, for judge explanations and debugging."""
    def r(ref):
        return " ".join(w for w in ref if w) if any(ref) else "shape"
    tag = c[0]
    if tag == "not":
        return "not (" + claim_text(c[1]) + ")"
    if tag == "count":
        return f"{'exactly' if c[3] else 'at least'} {c[2]} {r(c[1])}"
    if tag == "at":
        return f"{r(c[1])} in the {c[2]}"
    if tag == "empty":
        return f"nothing in the {c[1]}"
    if tag in ("color", "size"):
        return f"{r(c[1])} is {c[2]}"
    if tag in ("rel", "cmp"):
        return f"{r(c[1])} {c[2]} {r(c[3])}"
    if tag == "none_rel":
        return f"nothing {c[1]} {r(c[2])}"
    if tag == "same_color":
        return f"{r(c[1])} and {r(c[2])} {'same' if c[3] else 'different'} color"
    return f"background is {c[1]}"


# ----------------------------------------------------------------------------------------------------
# Rule judge (MMHal 0-6) and simulated annotator.

def informativeness(gt_atoms: set, answer_atoms: set) -> tuple[float, int]:
    """(share of the reference answer's facts the answer conveys, number of further true facts)."""
    if not gt_atoms:
        return (1.0 if answer_atoms else 0.0), len(answer_atoms)
    return len(gt_atoms & answer_atoms) / len(gt_atoms), len(answer_atoms - gt_atoms)


def rule_judge(record: dict, answer: str) -> tuple[str, int]:
    """Rate `answer` for an evaluation record (MMHal fields plus "scene") on the MMHal 0-6 scale.

    Hallucination = any claim the scene contradicts. Informativeness = coverage of the facts in the
    reference answer (gt_answer): all of them plus at least one further true fact -> 6 (good analysis);
    at least 3/4 -> very informative (5, or 2 with hallucination); some -> somewhat (4 / 1); none -> not
    informative (3 / 0). Text that makes no checkable claim is uninformative, not hallucinated, so it
    gets 3. An empty answer gets 0: it is a failed response, and treating it as a cautious one would let a
    policy lower its hallucination rate (share below 3) by saying nothing.
    Returns (reply text ending with a line "Rating: N", N)."""
    if "scene" not in record:
        raise ValueError("the rule judge needs the item's scene graph: use the tiny world's eval file "
                         "(eval/mmhal_tiny.json), not the real MMHal-Bench")
    scene, question = record["scene"], record["question"]
    if not answer.strip():
        return "Explanation: the response is empty, so it answers nothing.\nRating: 0", 0
    gt = verify(scene, record["gt_answer"], question)
    v = verify(scene, answer, question)
    cov, extra = informativeness(gt.atoms, v.atoms)
    halluc = v.n_false > 0
    if cov >= 1.0 and extra > 0 and not halluc:
        level, score = "very informative with further correct detail", 6
    elif cov >= 0.75:
        level, score = "very informative", 2 if halluc else 5
    elif cov > 0:
        level, score = "somewhat informative", 1 if halluc else 4
    else:
        level, score = "not informative", 0 if halluc else 3
    lines = [f"Explanation: the response makes {len(v.claims)} checkable claims; {v.n_true} agree with the "
             f"image contents and {v.n_false} contradict them."]
    if halluc:
        lines.append("Contradicted: " + "; ".join(claim_text(c) for c in v.false[:3]) + ".")
    n_gt = max(1, len(gt.atoms))
    lines.append(f"It conveys {round(cov * n_gt)} of the {n_gt} facts in the standard human-generated "
                 f"answer and {extra} further correct facts. The response is {level}, "
                 f"{'with' if halluc else 'without'} hallucination.")
    lines.append(f"Rating: {score}")
    return "\n".join(lines), score


def evaluate(argv: list[str]) -> dict | None:
    """eval_mmhal.py's evaluation (any of its flags) rated by rule_judge: `python tinyworld.py eval ...`."""
    return eval_mmhal.main([*argv, "--judge", "rule"], rule_judge=rule_judge)


def label_pair(scene: dict, question: str, output_1: str, output_2: str, rng: random.Random | None = None,
               noise: float = 0.0) -> dict:
    """The simulated human annotator: prefer the response with fewer false claims; on a tie, the one
    conveying more true facts; on a full tie, a coin flip. With probability `noise` the label is flipped
    (human annotators disagree too). Returns {"preference": 1|2, "hallucination": 0|1, ...}; hallucination
    is 1 when either response contains a claim the scene contradicts."""
    rng = rng or random.Random(0)
    v1, v2 = verify(scene, output_1, question), verify(scene, output_2, question)
    k1, k2 = (-v1.n_false, len(v1.atoms)), (-v2.n_false, len(v2.atoms))
    pref = 1 if k1 > k2 else 2 if k2 > k1 else rng.choice([1, 2])
    if noise > 0 and rng.random() < noise:
        pref = 3 - pref
    return {"preference": pref, "hallucination": int(v1.n_false > 0 or v2.n_false > 0),
            "n_false_1": v1.n_false, "n_false_2": v2.n_false, "tie": k1 == k2}


# ----------------------------------------------------------------------------------------------------
# Paired tests. Two models answer the same questions, so their outcomes are compared question by
# question: only the discordant questions (one model right, the other wrong) carry evidence, and under
# "no difference" each falls either way with probability 1/2.

def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p of a split at least as uneven as k : n - k in n fair coin flips."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def mcnemar(x: list[bool], y: list[bool]) -> dict:
    """Exact McNemar test of paired yes/no outcomes (x[i], y[i] for question i, True = the event, e.g.
    a false claim). b: questions where only x has it, c: only y. -> {"b", "c", "p"}."""
    if len(x) != len(y):
        raise ValueError(f"paired outcomes of different lengths: {len(x)} and {len(y)}")
    b = sum(bool(u) and not v for u, v in zip(x, y))
    c = sum(bool(v) and not u for u, v in zip(x, y))
    return {"b": b, "c": c, "p": binomial_two_sided_p(b, b + c)}


def sign_test(x: list[float], y: list[float]) -> dict:
    """Exact sign test of paired scores: b questions where x scores higher, c where y does (ties carry no
    evidence and are dropped). -> {"b", "c", "p"}."""
    if len(x) != len(y):
        raise ValueError(f"paired scores of different lengths: {len(x)} and {len(y)}")
    b = sum(u > v for u, v in zip(x, y))
    c = sum(v > u for u, v in zip(x, y))
    return {"b": b, "c": c, "p": binomial_two_sided_p(b, b + c)}


def pooled(tests: list[dict]) -> dict:
    """Seeds are independent worlds with their own questions: their discordant counts add up."""
    b, c = sum(t["b"] for t in tests), sum(t["c"] for t in tests)
    return {"b": b, "c": c, "p": binomial_two_sided_p(b, b + c)}


def gold_judge(data_dir: str, prompts_file: str = "heldout_prompts.json"):
    """The world's ground truth as ppo.main's gold_fn: for each answer to a prompt of data_dir/prompts_file
    (records as data.read_ppo_prompts reads them), the rule judge's 0-6 rating against the prompt's
    reference answer ("rating") and whether the answer makes a claim the scene contradicts ("false_claim", 0/1)."""
    gt = {str(r["id"]): r["gt_answer"] for r in data.load_json(os.path.join(data_dir, prompts_file))}
    scenes = data.load_json(os.path.join(data_dir, "scenes.json"))

    def gold(records: list[dict], texts: list[str]) -> dict[str, list[float]]:
        rating, false = [], []
        for rec, text in zip(records, texts):
            scene, question = scenes[rec["image"]], rec["question"]
            rating.append(float(rule_judge({"scene": scene, "question": question, "gt_answer": gt[str(rec["id"])]}, text)[1]))
            false.append(float(verify(scene, text, question).n_false > 0))
        return {"rating": rating, "false_claim": false}
    return gold


# ----------------------------------------------------------------------------------------------------
# Writing the dataset

def _human(question: str, first: bool) -> dict:
    return {"from": "human", "value": ("<image>\n" if first else "") + question}


def _pool(seed: int, name: str, n: int, start: int) -> list[tuple[str, dict]]:
    """n scenes of one pool. Each scene depends only on (seed, pool, index), so changing one pool's
    size never changes another pool's images."""
    return [(f"{start + i:06d}.png", sample_scene(random.Random(f"{seed}-{name}-{i}"))) for i in range(n)]


def build_sft(scenes: list[tuple[str, dict]], n_examples: int, seed: int, multi_turn: float = 0.15) -> list[dict]:
    rng = random.Random(f"{seed}-sft")
    out = []
    for k in range(n_examples):
        name, scene = scenes[k % len(scenes)]
        turns = 1 if rng.random() >= multi_turn else rng.randint(2, 3)
        conv = []
        for t in range(turns):
            qa = ask_weighted(scene, SFT_WEIGHTS, rng)
            conv += [_human(qa["question"], t == 0), {"from": "gpt", "value": qa["answer"]}]
        out.append({"id": f"sft_{k:06d}", "image": name, "conversations": conv})
    rng.shuffle(out)
    return out


# Reading. A real LLaVA's LLM arrived from text pretraining able to read: to answer from a passage and
# to tell whether a sentence agrees with it. That is the skill a Fact-RM leans on when it compares a
# response with the captions; our tiny LLM starts from random weights and, trained on image questions
# alone, never acquires it (the Fact-RM then learns the prompt's shape and ignores the captions' content).
# These text-only conversations stand in for that pretraining: no image, so the answer can only come
# from reading. Captions are of SFT scenes; the wording is generic, not the reward model's prompt.
_SWAPS = [list(COLORS), SIZES, list(QUADS), NUM_WORDS[2:], list(BACKGROUNDS), KINDS]  # "one" stays: "There is one"


def _perturb(text: str, rng: random.Random) -> str:
    """Replace one world word (colour, size, place, number, background, kind) by another of its class."""
    spots = []
    for cls in _SWAPS:
        for w in cls:
            spots += [(m.start(), m.end(), cls) for m in re.finditer(rf"\b{w}\b", text)]
    if not spots:
        return text
    a, b, cls = rng.choice(spots)
    return text[:a] + rng.choice([w for w in cls if w != text[a:b]]) + text[b:]


def _caption_block(captions: list[str], rng: random.Random) -> str:
    caps = list(captions)
    rng.shuffle(caps)
    return "".join(f"\n  - {c}" for c in caps)


def build_reading(scenes: list[tuple[str, dict]], n: int, seed: int) -> list[dict]:
    """n text-only conversations, half answering a question from captions, half judging whether a
    statement (a true answer, or one with a word swapped) agrees with the captions; the label comes from
    checking the statement against the scene graph, the same checker the annotator uses."""
    rng = random.Random(f"{seed}-read")
    out = []
    for k in range(n):
        name, scene = scenes[rng.randrange(len(scenes))]
        caps = make_captions(scene, rng)
        qa = ask_weighted(scene, {t: 1.0 for t in data.MMHAL_TYPES}, rng)
        if k % 2 == 0:
            user = "Read these captions of a picture:" + _caption_block(caps, rng) + "\n" + qa["question"]
            reply = qa["answer"]
        else:
            stmt = re.sub(r"^(Yes|No), (\w)", lambda m: m.group(2).upper(), qa["answer"])  # a claim, not a reply
            stmt = stmt if rng.random() < 0.5 else _perturb(stmt, rng)
            ok = verify(scene, stmt).n_false == 0
            user = (f"Statement: {stmt}\nCaptions of the picture:" + _caption_block(caps, rng)
                    + "\nDo the captions agree with the statement?")
            reply = "Yes, the captions agree with it." if ok else "No, the captions contradict it."
        out.append({"id": f"read_{k:06d}", "conversations": [{"from": "human", "value": user},
                                                            {"from": "gpt", "value": reply}]})
    return out


def build_rlinit(data_dir: str, prefs: list[dict], n_mc: int, seed: int) -> list[dict]:
    """The RL-init data (SPEC section 3: the preference prompts with their answers, plus A-OKVQA in
    chain-of-thought form): each labelled pair's preferred response to its prompt, and n_mc multiple-choice
    questions about the preference images answered reasoning first ("The circle is red. So the correct
    option is B.", the form PPO's correctness bonus reads)."""
    scenes = data.load_json(os.path.join(data_dir, "scenes.json"))
    out = [{"id": f"rlinit_{r['id']}", "image": r["image"],
            "conversations": [r["conversations"][0], {"from": "gpt", "value": r[f"output_{r['preference']}"]["value"]}]}
           for r in prefs]
    images = sorted({r["image"] for r in data.load_json(os.path.join(data_dir, "preference_prompts.json"))})
    rng = random.Random(f"{seed}-rlinit")
    for k in range(n_mc):
        qa = ask(scenes[images[k % len(images)]], "multiple_choice", rng)
        sentence = qa["answer"].split(". ", 1)[1]     # "B. The circle is red." -> "The circle is red."
        out.append({"id": f"rlinit_mc_{k:06d}", "image": images[k % len(images)],
                    "conversations": [_human(qa["question"], True),
                                      {"from": "gpt", "value": f"{sentence} So the correct option is {qa['key']}."}]})
    rng.shuffle(out)
    return out


def build_prompts(scenes: list[tuple[str, dict]], n: int, weights: dict[str, float], seed: int,
                  tag: str) -> list[dict]:
    rng = random.Random(f"{seed}-{tag}")
    out = []
    for k in range(n):
        name, scene = scenes[k % len(scenes)]
        qa = ask_weighted(scene, weights, rng)
        answer = qa["key"] if qa["answer_type"] != "general" else qa["answer"]
        out.append({"id": f"{tag}_{k:06d}", "image": name,
                    "conversations": [_human(qa["question"], True)],
                    "answer_type": qa["answer_type"], "answer": answer,
                    "question_type": qa["qtype"], "gt_answer": qa["answer"], "length_multiplier": 1.0})
    return out


def build_eval(seed: int) -> list[dict]:
    """96 items in the official MMHal order (topic-major, the 8 types within). A topic fixes the
    background and a shape kind that is present (the 'object topic'); 4 backgrounds x 3 kinds give
    12 distinct combinations, one per topic. Each record carries its scene graph for the rule judge."""
    items = []
    for t, topic in enumerate(MMHAL_TOPICS):
        bg, kind = list(BACKGROUNDS)[t % 4], KINDS[t % 3]
        for qtype in data.MMHAL_TYPES:
            rng = random.Random(f"{seed}-eval-{topic}-{qtype}")
            min_shapes = 2 if qtype in ("comparison", "relation") else 1
            while True:
                scene = sample_scene(rng, min_shapes=min_shapes, background=bg, must_have=kind)
                qa = ask(scene, qtype, rng, focus=kind)
                if qa is not None:
                    break
            image_id = f"tiny{len(items):03d}"
            content = [f"{s['size'].capitalize()} {s['color']} {s['kind']}" for s in scene["shapes"]]
            content.append(bg.capitalize())
            items.append({"question_type": qtype, "question_topic": topic, "image_id": image_id,
                          "image_src": f"{image_id}.png", "image_content": content, "question": qa["question"],
                          "gt_answer": qa["answer"], "model_answer": "", "scene": scene})
    return items


def build_pope(scenes: list[tuple[str, dict]], seed: int, n_per_split: int) -> dict[str, list[dict]]:
    """POPE's three splits over these images, in the official question format {"question_id", "image",
    "text", "label"}: for each image, one "yes" question per object it holds and as many "no" questions
    about objects it does not hold, until n_per_split questions (half yes, half no; fewer when the images
    run out). All splits ask about the same images and the same present objects; they differ in which
    absent objects are asked about.

    An object is a coloured shape, (colour, kind), e.g. "red circle" (len(COLORS) x len(KINDS) = 15): the
    unit of the world's existence questions ("Is there a red circle in the image?", what SFT teaches),
    and the unit at which this world hallucinates: a model that sees "red" and "circle" on two different
    shapes may bind them wrongly.
      random       absent objects drawn uniformly.
      popular      POPE's rule: the absent objects most frequent over these images' scene graphs. Colours
                   and kinds are drawn uniformly, so the frequencies differ by sampling noise only: there
                   is no object prior to exploit here and popular behaves like random. It is kept so the
                   pipeline reports POPE's three rows; the measurement is real, the prior is absent.
      adversarial  absent objects that co-occur most with the present ones, where co-occurring means
                   sharing a part with the image: its colour and its kind both in the image on different
                   shapes first (a red square and a blue circle: "red circle?"), then one part (the same
                   kind in another colour, or a present colour on an absent kind), ties broken by
                   frequency then at random. Co-occurrence counted between whole objects would be the
                   easiest negatives in this world: a scene holds distinct kinds, so "blue circle" never
                   occurs with "red circle"."""
    if n_per_split < 2 or n_per_split % 2:
        raise ValueError(f"n_per_split must be an even number >= 2 (half yes, half no), got {n_per_split}")
    objects = [(c, k) for k in KINDS for c in COLORS]
    freq = Counter(o for _, scene in scenes for o in {(s["color"], s["kind"]) for s in scene["shapes"]})
    rngs = {split: random.Random(f"{seed}-pope-{split}") for split in eval_pope.SPLITS}
    out: dict[str, list[dict]] = {split: [] for split in rngs}
    n_pairs = 0
    for name, scene in scenes:
        if n_pairs == n_per_split // 2:
            break
        present = list(dict.fromkeys((s["color"], s["kind"]) for s in scene["shapes"]))
        present = present[:n_per_split // 2 - n_pairs]
        n_pairs += len(present)
        colors, kinds = {s["color"] for s in scene["shapes"]}, {s["kind"] for s in scene["shapes"]}
        held = {(s["color"], s["kind"]) for s in scene["shapes"]}   # all of them: `present` may be cut
        absent = [o for o in objects if o not in held]
        for split, rng in rngs.items():
            tie = {o: rng.random() for o in absent}
            if split == "random":
                negatives = rng.sample(absent, len(present))
            elif split == "popular":
                negatives = sorted(absent, key=lambda o: (-freq[o], tie[o]))[:len(present)]
            else:
                negatives = sorted(absent, key=lambda o: (-((o[0] in colors) + (o[1] in kinds)), -freq[o], tie[o]))
                negatives = negatives[:len(present)]
            for (c, k), label in [(o, "yes") for o in present] + [(o, "no") for o in negatives]:
                out[split].append({"question_id": len(out[split]) + 1, "image": name,
                                   "text": f"Is there a {c} {k} in the image?", "label": label})
    return out


# Generic English for the tokenizer: the reward model's rating prompt is encoded with the same
# tokenizer, so its likely words need pieces too (else they fall back to letters and bytes and eat the
# context). Our own wording; the reward-model stage may phrase its prompt differently.
_GENERIC_TEXT = [
    "Rate the response. Score the answer. The rating is high when the answer is correct and helpful.",
    "The correct option is A. The correct option is B. The correct option is C. The correct option is D.",
    "Answer the question about the image. Describe the image. Look at the image and answer accurately.",
]


# The tiny world's rating request (make writes it as rm_request.txt / rm_facts_intro.txt; the pipeline
# passes them as reward_model.py --request_file / --facts_intro_file): the official request's shape (the
# facts slot inside the accuracy criterion, the score read at the end) in one sentence, because every
# reward-model and PPO-scoring forward carries it and the long default costs the tiny world a quarter of
# its reward-model compute.
RM_REQUEST = ("USER: Now rate your previous answer: it must be true of the image and answer the question. "
              "{factual_prompt}ASSISTANT: The quality score of my last response is")
RM_FACTS_INTRO = "It must agree with these captions of the image:\n"


def _rating_prompt_lines() -> list[str]:
    """Both rating requests (the tiny world's and reward_model.DEFAULT_REQUEST), so they encode to whole words."""
    text = (reward_model.RatingRequest.read().fill([]) + " " + reward_model.DEFAULT_FACTS_INTRO + "\n"
            + reward_model.RatingRequest(" " + RM_REQUEST, RM_FACTS_INTRO).fill([]) + "\n" + RM_FACTS_INTRO)
    return [ln for ln in text.split("\n") if ln.strip()]


_ASCII = "".join(chr(c) for c in range(33, 127))  # so every printable character has its own piece


def _vicuna_lines(conversations: list[dict]) -> list[str]:
    """A conversation as the trainer renders it (data.Template), without the image placeholder and with
    "</s>" (a special id, not text) as a line break, so that piece frequencies match what it will encode."""
    prompt = conversations[-1]["from"] == "human"
    text = data.Template().render(conversations, add_generation_prompt=prompt)
    return text.replace("<image>\n", "").replace("</s>", "\n ").split("\n")


def tokenizer_corpus(sft: list[dict], captions: dict, prompts: list[dict], eval_items: list[dict]) -> list[str]:
    lines = [_ASCII] * 50
    for r in sft + prompts:
        lines += _vicuna_lines(r["conversations"])
    # Every reward-model call carries the rating prompt; weighted below the world's own text so that
    # world words win the merges when the vocabulary is small.
    lines += (_GENERIC_TEXT + _rating_prompt_lines()) * max(1, len(prompts) // 5)
    for caps in captions.values():
        lines += caps
    for r in eval_items:
        lines += [r["question"], r["gt_answer"]]
    return [ln for ln in lines if ln.strip()]


def train_tokenizer(lines: list[str], path: str, vocab_size: int = 1024) -> None:
    """LLaMA-style sentencepiece: BPE, byte fallback (any text encodes), digits split, no normalisation
    (so decode(encode(x)) == x), unk 0 / bos 1 / eos 2 and no pad piece (pad = unk).
    Byte fallback takes 256 ids, so 1024 leaves ~670 learned pieces after the characters: enough for
    every world word, the system sentence and the rating prompt to be one piece per word (SFT examples
    average ~57 text tokens). 768 keeps world words whole but splits the rating prompt (~340 tokens
    instead of ~240); 512 splits world words too."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2,
        input_sentence_size=0, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _dump(obj, path: str, indent: int | None = None) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)


@dataclass
class MakeConfig:
    out: str = ""                 # the folder to write (required)
    seed: int = 0
    eval_seed: int = 0            # fixed by default so all runs share one eval set
    n_sft_images: int = 3000
    n_sft: int = 20000
    n_ppo_images: int = 2000
    n_ppo: int = 4000
    n_pref_images: int = 1500
    n_pref: int = 1500
    vocab_size: int = 1024        # 256 of these are byte-fallback pieces; see train_tokenizer
    multi_turn: float = 0.15      # share of multi-turn SFT conversations
    n_heldout: int = 400          # held-out images, one open question each
    n_read: int = 6000            # text-only reading conversations added to sft.json (see build_reading)


def make(cfg: MakeConfig) -> dict:
    """Write the whole tiny dataset to cfg.out; returns the meta dict."""
    t0, out, seed = time.time(), cfg.out, cfg.seed
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "eval", "images"), exist_ok=True)
    sft_pool = _pool(seed, "sft", cfg.n_sft_images, 0)
    ppo_pool = _pool(seed, "ppo", cfg.n_ppo_images, cfg.n_sft_images)
    pref_pool = _pool(seed, "pref", cfg.n_pref_images, cfg.n_sft_images + cfg.n_ppo_images)
    # images no stage trains on: one open question each, for a hallucination rate with a small error bar
    held_pool = _pool(seed, "heldout", cfg.n_heldout, cfg.n_sft_images + cfg.n_ppo_images + cfg.n_pref_images)
    scenes, captions = {}, {}
    for name, scene in sft_pool + ppo_pool + pref_pool + held_pool:
        scenes[name] = scene
        captions[name] = make_captions(scene, random.Random(f"{seed}-cap-{name}"))
    eval_recs = build_eval(cfg.eval_seed)
    jobs = [(scene, os.path.join(out, "images", name)) for name, scene in scenes.items()]
    jobs += [(r["scene"], os.path.join(out, "eval", "images", r["image_src"])) for r in eval_recs]
    # Creating thousands of small files is system-call bound: threads overlap them (2-3x faster).
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda job: render(job[0]).save(job[1], compress_level=1), jobs))
    sft_convs = build_sft(sft_pool, cfg.n_sft, seed, cfg.multi_turn)
    if cfg.n_read:
        sft_convs += build_reading(sft_pool, cfg.n_read, seed)
        random.Random(f"{seed}-mix").shuffle(sft_convs)
    ppo_prompts = build_prompts(ppo_pool, cfg.n_ppo, PPO_WEIGHTS, seed, "ppo")
    # Preference prompts are open questions, like the paper's LLaVA instruction prompts.
    pref_prompts = build_prompts(pref_pool, cfg.n_pref, {t: 1.0 for t in data.MMHAL_TYPES}, seed, "pref")
    held_prompts = build_prompts(held_pool, cfg.n_heldout, {t: 1.0 for t in data.MMHAL_TYPES}, seed, "heldout")
    for name, obj in (("captions.json", captions), ("scenes.json", scenes), ("sft.json", sft_convs),
                      ("ppo_prompts.json", ppo_prompts), ("preference_prompts.json", pref_prompts),
                      ("heldout_prompts.json", held_prompts)):
        _dump(obj, os.path.join(out, name))
    _dump(eval_recs, os.path.join(out, "eval", "mmhal_tiny.json"), indent=1)
    # POPE over the held-out images (DATA/images/, which no stage trains on), at most 600 questions a split
    for split, questions in build_pope(held_pool, cfg.eval_seed, 600).items():
        with open(os.path.join(out, "eval", f"pope_{split}.jsonl"), "w") as f:
            f.write("".join(json.dumps(q) + "\n" for q in questions))
    with open(os.path.join(out, "rm_request.txt"), "w") as f:
        f.write(RM_REQUEST + "\n")
    with open(os.path.join(out, "rm_facts_intro.txt"), "w") as f:
        f.write(RM_FACTS_INTRO)
    corpus = tokenizer_corpus(sft_convs, captions, ppo_prompts + pref_prompts, eval_recs)
    train_tokenizer(corpus, os.path.join(out, "tokenizer.model"), cfg.vocab_size)
    meta = {"seed": seed, "eval_seed": cfg.eval_seed, "vocab_size": cfg.vocab_size,
            "counts": {"images": len(scenes), "sft_images": cfg.n_sft_images, "ppo_images": cfg.n_ppo_images,
                       "preference_images": cfg.n_pref_images, "sft": len(sft_convs),
                       "ppo_prompts": len(ppo_prompts), "preference_prompts": len(pref_prompts),
                       "heldout_prompts": len(held_prompts), "eval": len(eval_recs), "sft_reading": cfg.n_read},
            "ppo_answer_types": dict(Counter(r["answer_type"] for r in ppo_prompts)),
            "system_prompt": data.VICUNA_V1_SYSTEM,
            # what sft.py --preset tiny builds with this tokenizer
            "model": asdict(model.ModelConfig.preset("tiny", vocab_size=cfg.vocab_size)),
            "seconds": round(time.time() - t0, 2)}
    _dump(meta, os.path.join(out, "meta.json"), indent=1)
    return meta


# ----------------------------------------------------------------------------------------------------
# Annotation from already sampled responses. Sampling two responses per prompt from the SFT model is
# the pipeline's job; it writes the records (preference format without "preference") and calls this.

def annotate(data_dir: str, records: list[dict], noise: float = 0.0, seed: int = 0) -> list[dict]:
    """Add "preference" and "hallucination" to records holding "image", "conversations" (the prompt),
    "output_1" and "output_2" ({"value": text}); the scene comes from data_dir/scenes.json."""
    scenes = data.load_json(os.path.join(data_dir, "scenes.json"))
    rng = random.Random(seed)
    out = []
    for r in records:
        question = r["conversations"][0]["value"].replace("<image>", "").strip()
        lab = label_pair(scenes[r["image"]], question, r["output_1"]["value"], r["output_2"]["value"],
                         rng, noise)
        out.append({**r, "preference": lab["preference"], "hallucination": lab["hallucination"], "tie": lab["tie"]})
    return out


# ----------------------------------------------------------------------------------------------------
# Sampling from a trained model (the annotator's pairs, the SFT gate) and the whole pipeline.

def sample_responses(model_dir: str, records: list[dict], image_folder: str, n: int = 2, temperature: float = 1.0,
                     max_new_tokens: int = 48, batch: int = 64, seed: int = 0) -> list[list[str]]:
    """`n` responses per prompt record (data.read_ppo_prompts records) from a saved model."""
    m = model.LLaVA.from_pretrained(model_dir).eval()
    tok = data.Tokenizer(os.path.join(model_dir, "tokenizer.model"))
    ds = data.PromptDataset(records, tok, data.Template(), image_folder, m.config.image_size, m.num_image_tokens)
    gen = torch.Generator().manual_seed(seed)
    out: list[list[str]] = [[] for _ in records]
    bar = common.Progress(n * ((len(ds) + batch - 1) // batch), "sampling")
    for _ in range(n):
        for i in range(0, len(ds), batch):
            b = data.collate_left([ds[j] for j in range(i, min(i + batch, len(ds)))], tok.pad_id)
            new = m.generate(b["input_ids"], b["images"], b["attention_mask"], max_new_tokens=max_new_tokens,
                             temperature=temperature, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, generator=gen)
            for row, idx in zip(new, b["index"].tolist()):
                out[idx].append(tok.decode_response(row))
            bar.update(1)
    bar.close()
    return out


def collect_preferences(data_dir: str, model_dir: str, out_path: str, noise: float = 0.0, seed: int = 0,
                        limit: int = 0, drop_ties: bool = True) -> dict:
    """The simulated annotator end to end: two samples per preference prompt from the SFT model, labelled
    against the scene graph, written in the preference format (SPEC section 3)."""
    prompts_path = os.path.join(data_dir, "preference_prompts.json")
    records = data.read_ppo_prompts(prompts_path)
    raw = data.load_json(prompts_path)
    if limit:
        records, raw = records[:limit], raw[:limit]
    samples = sample_responses(model_dir, records, os.path.join(data_dir, "images"), n=2, seed=seed)
    # an empty response is no answer to compare (and the preference reader refuses it): counted, dropped
    pairs = [{"id": r["id"], "image": r["image"], "conversations": r["conversations"][:1],
              "output_1": {"value": s[0]}, "output_2": {"value": s[1]}} for r, s in zip(raw, samples) if s[0] and s[1]]
    labelled = annotate(data_dir, pairs, noise, seed)
    # a full tie (same false claims, same information) would be labelled by a coin flip: the annotator
    # says "no preference" and the pair is dropped, as it carries no signal, only label noise
    kept = [r for r in labelled if not r.pop("tie") or not drop_ties]
    _dump(kept, out_path)
    return {"pairs": len(kept), "with_hallucination": sum(bool(r["hallucination"]) for r in kept),
            "dropped_tie": len(labelled) - len(kept), "dropped_empty": len(raw) - len(pairs)}


def _greedy_claim_counts(data_dir: str, model_dir: str, prompts_file: str, n: int = 0) -> list[tuple[int, int]]:
    """(n_true, n_false) of the model's greedy answer to each prompt of data_dir/prompts_file (the last n)."""
    records = data.read_ppo_prompts(os.path.join(data_dir, prompts_file))[-n:]
    scenes = data.load_json(os.path.join(data_dir, "scenes.json"))
    answers = sample_responses(model_dir, records, os.path.join(data_dir, "images"), n=1, temperature=0.0)
    return [check_claims(scenes[r["image"]], a[0], r["question"]) for r, a in zip(records, answers)]


def grounding_accuracy(data_dir: str, model_dir: str, n: int = 96) -> float:
    """Share of greedy answers to held-out PPO prompts with no false claim: the SFT gate (SPEC section 7:
    some seeds never learn to look at the image)."""
    counts = _greedy_claim_counts(data_dir, model_dir, "ppo_prompts.json", n)
    ok = [n_false == 0 and n_true > 0 for n_true, n_false in counts]
    return sum(ok) / max(1, len(ok))


def rm_heldout(rm_facts: str, rm_plain: str, prefs_path: str, data_dir: str, work_dir: str) -> dict:
    """Both reward models on the same held-out pairs (the Fact-RM's eval split): per-pair outcomes for
    the paired test, and whether the Fact-RM reads the facts (its accuracy with the right captions, with
    another image's, with none), by reward_model.py eval."""
    meta = reward_model.read_rm_config(rm_facts)
    prefs = data.load_json(prefs_path)
    _, idx = reward_model.heldout_split(len(prefs), int(meta["n_eval"]), meta["split"], meta["split_seed"])
    caps = data.load_json(os.path.join(data_dir, "captions.json"))
    keys = sorted(caps)
    wrong = {k: caps[o] for k, o in zip(keys, keys[1:] + keys[:1])}   # every image gets its neighbour's captions
    os.makedirs(work_dir, exist_ok=True)
    heldout_path, wrong_path = os.path.join(work_dir, "heldout_pairs.json"), os.path.join(work_dir, "captions_shifted.json")
    _dump([prefs[i] for i in idx], heldout_path)
    _dump(wrong, wrong_path)

    def run(rm_dir: str, captions: str) -> dict:
        return reward_model.main(["eval", "--rm_dir", rm_dir, "--data_path", heldout_path, "--image_folder",
                                  os.path.join(data_dir, "images"), "--captions", captions, "--batch", "32",
                                  "--device", "cpu"])
    right, other = run(rm_facts, os.path.join(data_dir, "captions.json")), run(rm_facts, wrong_path)
    plain = run(rm_plain, os.path.join(data_dir, "captions.json"))["none"]   # it was trained without facts
    facts = right["captions"]
    return {"n": len(idx), "facts": facts["accuracy"], "plain": plain["accuracy"],
            "right": facts["accuracy"], "other_image": other["captions"]["accuracy"], "none": right["none"]["accuracy"],
            # a pair the Fact-RM gets wrong is the "event": b = only the Fact-RM wrong, c = only the plain RM
            "test": mcnemar([not c for c in facts["correct"]], [not c for c in plain["correct"]])}


def merge_adapter_dir(base_dir: str, adapter_dir: str, out: str) -> str:
    """base_dir's model with adapter_dir merged into its weights, saved as a plain model folder (what the
    evaluations load): the RL-init model."""
    m = model.LLaVA.from_pretrained(base_dir)
    m.load_adapter(adapter_dir, "merged")
    m.merge_adapter("merged")
    common.save_model_dir(m, out, os.path.join(base_dir, "tokenizer.model"))
    return out


def evaluate_model(d: str, mdir: str, out: str, eval_limit: int = 0, pope_limit: int = 0) -> dict:
    """One model on everything the table shows: the MMHal-style set (rule judge), the held-out open
    questions (greedy; per question: a false claim or not, the rule judge's rating, words) and POPE."""
    argv = ["--model_path", mdir, "--template", f"{d}/eval/mmhal_tiny.json", "--image_folder", f"{d}/eval/images",
            "--out", f"{out}_mmhal.json", "--max_new_tokens", "64", "--batch_size", "32"]
    res = evaluate(argv + (["--limit", str(eval_limit)] if eval_limit else []))
    records = data.read_ppo_prompts(os.path.join(d, "heldout_prompts.json"))
    texts = [a[0] for a in sample_responses(mdir, records, os.path.join(d, "images"), n=1, temperature=0.0)]
    gold = gold_judge(d)(records, texts)
    false = [int(v) for v in gold["false_claim"]]
    n = max(1, len(false))
    p = sum(false) / n
    res["heldout"] = {"rate": p, "stderr": (p * (1 - p) / n) ** 0.5, "n": len(false), "false_claim": false,
                      "rating": gold["rating"], "mean_rating": sum(gold["rating"]) / n,
                      "mean_words": sum(len(t.split()) for t in texts) / n}
    _dump([{"id": r["id"], "question": r["question"], "answer": t, "false_claim": f, "rating": g}
           for r, t, f, g in zip(records, texts, false, gold["rating"])], f"{out}_heldout.json")
    # the tiny SFT data never carries the short-answer instruction, and its answers are short
    pope_files = {s: f"{d}/eval/pope_{s}.jsonl" for s in eval_pope.SPLITS}
    if pope_limit:
        for s, path in list(pope_files.items()):
            with open(path) as f:
                lines = f.readlines()[:pope_limit]
            pope_files[s] = f"{out}_pope_{s}_first{pope_limit}.jsonl"
            with open(pope_files[s], "w") as f:
                f.writelines(lines)
    res["pope"] = eval_pope.evaluate_splits(mdir, pope_files, f"{d}/images", f"{out}_pope", batch_size=32,
                                            instruction="", max_new_tokens=16, plot=False)
    return res


PIPELINE_SIZES = {
    # minutes on 2 CPU cores; "make" sets MakeConfig fields, each other stage's flags are the real scripts' own
    # SFT's own held-out loss twice (the grounding gate is what decides)
    # n_read 12000 (twice make's default): with 6000 the Fact-RM of some draws never learned to read (README)
    "full": {"make": {"n_pref": 6000, "n_read": 12000}, "sft": ["--max_steps", "900", "--eval_every", "450"], "pref_limit": 0,
             "rlinit": ["--max_steps", "120"], "rlinit_mc": 1000,
             # 400 held-out pairs: the facts / no-facts gap is a few points, 200 pairs cannot resolve it.
             # One evaluation, at the end: the model used is the last, not the best on the test pairs.
             # 300 steps (about 4 epochs of the ~2300 training pairs): at 100 the Fact-RM of some draws had
             # not yet learned to read the captions (README)
             "rm": ["--max_steps", "300", "--eval_size", "400", "--eval_every", "300"],
             # both arms' proxy and gold flatten after ~10 steps (measured at 40)
             "ppo": ["--max_steps", "30", "--eval_every", "10", "--eval_size", "200"],
             "eval_limit": 0, "pope_limit": 0, "gate": 0.3, "sft_tries": 3, "drop_ties": True},
    "smoke": {"make": {"n_sft_images": 100, "n_sft": 400, "n_ppo_images": 40, "n_ppo": 128, "n_pref_images": 40,
                       "n_pref": 96, "n_read": 100, "n_heldout": 32},
              "sft": ["--max_steps", "20", "--eval_size", "32", "--global_batch", "16", "--micro_batch", "16"],
              "pref_limit": 96, "rlinit": ["--max_steps", "3", "--global_batch", "16", "--micro_batch", "16"],
              "rlinit_mc": 32,
              "rm": ["--max_steps", "4", "--eval_size", "32", "--eval_every", "4", "--global_batch", "16",
                     "--micro_batch", "16"],
              "ppo": ["--max_steps", "2", "--rollout_batch", "16", "--step_batch", "16", "--micro_batch", "16",
                      "--eval_every", "1", "--eval_size", "16"],
              # an SFT model of 20 steps makes no claims: every pair is a tie, kept here (plumbing only)
              "eval_limit": 16, "pope_limit": 24, "gate": 0.0, "sft_tries": 1, "drop_ties": False},
}
ARMS = {"Fact-RLHF": "rm_facts", "RLHF": "rm_plain"}   # PPO arm -> the reward model it optimises
MODELS = ["SFT", "RL-init", *ARMS]


class Stages:
    """Each stage's result saved as DIR/stages/NAME.json beside the settings it ran with. A rerun with the
    same settings reuses the finished stages, up to the first that changed or never finished (it and every
    later stage run again): a killed pipeline resumes at the stage it was in, and a change to PPO reuses
    the world, SFT and the reward models. Stages that do not depend on each other can run side by side
    (run_side_by_side)."""

    def __init__(self, root: str, reuse: bool, side_by_side: bool = True):
        self.dir, self.reuse, self.side_by_side, self.times = os.path.join(root, "stages"), reuse, side_by_side, {}
        os.makedirs(self.dir, exist_ok=True)

    def _path(self, name: str, ext: str = ".json") -> str:
        return os.path.join(self.dir, name.replace(" ", "_") + ext)

    def _saved(self, name: str, settings) -> dict | None:
        """The saved result of `name` when it may be reused: same settings, and no earlier stage ran."""
        path = self._path(name)
        if self.reuse and os.path.exists(path):
            saved = data.load_json(path)
            if saved.get("settings") == json.loads(json.dumps(settings)):
                print(f"\n=== {name}: finished before, reused ({path}) ===", flush=True)
                self.times[name] = 0.0
                return saved
        return None

    def _execute(self, name: str, settings, fn) -> dict:
        t = time.time()
        result = fn()
        seconds = round(time.time() - t, 1)
        saved = {"settings": settings, "result": result, "seconds": seconds}
        common.atomic_write_text(json.dumps(saved), self._path(name))
        return saved

    def run(self, name: str, settings, fn):
        return self.run_side_by_side([(name, settings, fn)])[0]

    def run_side_by_side(self, stages: list[tuple[str, object, Callable]]) -> list:
        """Independent stages (name, settings, fn), each reused when _saved allows, else run; the results in order.
        Those to run go side by side in forked processes, at most one per thread of this process, the
        threads split among them: these matrices are too small for two threads to halve a step, so on 2
        cores two single-threaded stages finish sooner than the same two one after the other. Each writes
        its own stage file, and its output to DIR/stages/NAME.log, printed whole when it ends. One after
        another instead when there is one to run, one thread, no fork (Windows) or CUDA already in use
        (a forked child cannot use it), or side_by_side is off."""
        saved = {name: self._saved(name, settings) for name, settings, _ in stages}
        todo = [(n, s, f) for n, s, f in stages if saved[n] is None]
        width = min(len(todo), torch.get_num_threads())
        if todo:
            self.reuse = False          # a stage runs: every later stage must too
        if width < 2 or not self.side_by_side or not hasattr(os, "fork") or torch.cuda.is_initialized():
            for n, s, f in todo:
                print(f"\n=== {n} ===", flush=True)
                saved[n] = self._execute(n, s, f)
        else:
            threads = torch.get_num_threads() // width
            ctx = multiprocessing.get_context("fork")
            for k in range(0, len(todo), width):
                wave = todo[k:k + width]
                print(f"\n=== side by side, {threads} thread(s) each: {', '.join(n for n, _, _ in wave)} ===", flush=True)
                procs = [ctx.Process(target=self._child, args=(n, s, f, threads)) for n, s, f in wave]
                for p in procs:
                    p.start()
                for p in procs:             # all of the wave, so a failure leaves no stage running behind it
                    p.join()
                for p, (n, s, _) in zip(procs, wave):
                    log = self._path(n, ".log")
                    print(f"\n=== {n} (output of its process, {log}) ===", flush=True)
                    with open(log, errors="replace") as f:
                        sys.stdout.write(f.read())
                    if p.exitcode != 0:
                        raise RuntimeError(f"stage {n!r} failed in its own process (exit code {p.exitcode}); "
                                           f"its output, traceback included, is above and in {log}")
                    saved[n] = data.load_json(self._path(n))
        for n, _, _ in todo:
            self.times[n] = saved[n]["seconds"]
        return [saved[n]["result"] for n, _, _ in stages]

    def _child(self, name: str, settings, fn, threads: int) -> None:
        """In the forked process: its output to the stage's log, its own thread count, then the stage."""
        torch.set_num_threads(threads)
        fd = os.open(self._path(name, ".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(fd, 1), os.dup2(fd, 2)
        os.close(fd)
        # sys.stdout may not be fd 1 (pytest's capture, a notebook): print to the log whatever it was
        sys.stdout = open(1, "w", buffering=1, errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, errors="replace", closefd=False)
        self._execute(name, settings, fn)
        sys.stdout.flush(), sys.stderr.flush()


def pipeline_seed(root: str, size: str, seed: int, reuse: bool = True, side_by_side: bool = True) -> dict:
    """One seed of the tiny paper: make -> SFT (gated) -> annotate -> RL-init -> Fact-RM and plain RM ->
    PPO from RL-init with each (held-out proxy and gold every few steps) -> evaluation of all four
    models. -> everything the table and the paired tests need, per question where they pair."""
    cfg = PIPELINE_SIZES[size]
    d, runs = os.path.join(root, "data"), os.path.join(root, "runs")
    st = Stages(root, reuse, side_by_side)
    key = {"size": size, "seed": seed}
    st.run("make", {**key, **cfg["make"]}, lambda: make(MakeConfig(out=d, seed=seed, **cfg["make"]))["counts"])

    def train_sft() -> dict:
        for s in range(seed, seed + cfg["sft_tries"]):
            run = os.path.join(runs, "sft")
            sft.main(["--preset", "tiny", "--data_path", f"{d}/sft.json", "--image_folder", f"{d}/images",
                      "--tokenizer", f"{d}/tokenizer.model", "--out_dir", run, "--seed", str(s), "--overwrite", "true"] + cfg["sft"])
            grounding = grounding_accuracy(d, os.path.join(run, "final"))
            print(f"SFT seed {s}: greedy answers with no false claim on held-out prompts: {grounding:.2f}")
            if grounding >= cfg["gate"]:
                break
            print(f"SFT seed {s} is below the gate ({cfg['gate']}): it did not learn to use the image; next seed")
        return {"seed": s, "grounding": grounding}
    sft_res = st.run("sft", {**key, "flags": cfg["sft"], "gate": cfg["gate"]}, train_sft)
    sft_dir = os.path.join(runs, "sft", "final")

    prefs = os.path.join(root, "preferences.json")
    ann = st.run("annotate", {**key, "limit": cfg["pref_limit"], "drop_ties": cfg["drop_ties"]},
                 lambda: collect_preferences(d, sft_dir, prefs, seed=seed, limit=cfg["pref_limit"],
                                             drop_ties=cfg["drop_ties"]))
    print(f"annotated {ann['pairs']} pairs ({ann['with_hallucination']} with a hallucination); dropped "
          f"{ann['dropped_tie']} ties and {ann['dropped_empty']} pairs with an empty response")

    def train_rlinit() -> dict:
        path = os.path.join(root, "rlinit.json")
        _dump(build_rlinit(d, data.load_json(prefs), cfg["rlinit_mc"], seed), path)
        res = sft.main(["--mode", "lora", "--model_path", sft_dir, "--data_path", path, "--image_folder", f"{d}/images",
                        "--out_dir", os.path.join(runs, "rlinit"), "--seed", str(seed), "--overwrite", "true",
                        "--lr", "3e-4", "--warmup_ratio", "0.05", "--global_batch", "32", "--micro_batch", "32",
                        "--max_len", "193", "--lora_r", "16", "--lora_alpha", "32", "--save_every", "100000",
                        "--log_every", "20"] + cfg["rlinit"])
        merge_adapter_dir(sft_dir, os.path.join(runs, "rlinit", "final_adapter"), os.path.join(runs, "rlinit", "final"))
        return {"loss": res["loss"], "steps": res["step"]}
    st.run("rl-init", {**key, "flags": cfg["rlinit"], "mc": cfg["rlinit_mc"]}, train_rlinit)

    rm_flags = ["--preset", "tiny", "--model_path", sft_dir, "--data_path", prefs, "--image_folder", f"{d}/images",
                "--captions", f"{d}/captions.json", "--request_file", f"{d}/rm_request.txt", "--facts_intro_file",
                f"{d}/rm_facts_intro.txt", "--seed", str(seed), "--overwrite", "true"] + cfg["rm"]
    st.run_side_by_side([(f"reward model {name}", {**key, "flags": cfg["rm"] + extra},
                          lambda name=name, extra=extra: reward_model.main(rm_flags + ["--out_dir", os.path.join(runs, name)] + extra))
                         for name, extra in (("rm_facts", []), ("rm_plain", ["--facts", "none"]))])
    rm = st.run("reward models on held-out pairs", key,
                lambda: rm_heldout(os.path.join(runs, "rm_facts", "final"), os.path.join(runs, "rm_plain", "final"),
                                   prefs, d, os.path.join(runs, "rm_heldout")))

    def train_ppo(rm_name: str) -> dict:
        return _slim_ppo(ppo.main(
            ["--preset", "tiny", "--model_path", sft_dir, "--policy_adapter", os.path.join(runs, "rlinit", "final_adapter"),
             "--rm_dir", os.path.join(runs, rm_name, "final"), "--prompts_path", f"{d}/ppo_prompts.json",
             "--image_folder", f"{d}/images", "--captions", f"{d}/captions.json", "--eval_prompts",
             f"{d}/heldout_prompts.json", "--out_dir", os.path.join(runs, f"ppo_{rm_name}"), "--seed", str(seed),
             "--overwrite", "true"] + cfg["ppo"], gold_fn=gold_judge(d)))
    ppo_res = dict(zip(ARMS, st.run_side_by_side([(f"ppo {arm}", {**key, "flags": cfg["ppo"], "rm": rm_name},
                                                   lambda rm_name=rm_name: train_ppo(rm_name))
                                                  for arm, rm_name in ARMS.items()])))

    dirs = {"SFT": sft_dir, "RL-init": os.path.join(runs, "rlinit", "final"),
            **{arm: os.path.join(runs, f"ppo_{rm_name}", "final") for arm, rm_name in ARMS.items()}}
    evals = {name: st.run(f"evaluate {name}", {**key, "limit": cfg["eval_limit"], "pope": cfg["pope_limit"]},
                          lambda: evaluate_model(d, mdir, os.path.join(root, "eval", name), cfg["eval_limit"],
                                                 cfg["pope_limit"]))
             for name, mdir in dirs.items()}
    return {"seed": seed, "sft": sft_res, "annotation": ann, "rm": rm, "ppo": ppo_res, "eval": evals,
            "times": st.times}


def _slim_ppo(res: dict) -> dict:
    """What the table and the plot keep of a PPO run: the per-step history and the held-out evaluations."""
    return {"history": res["history"], "evals": res["evals"]}


def paired_tests(evals: dict) -> dict:
    """Per model against SFT and between the two arms: McNemar on the held-out false claims, the sign test
    on the rule judge's ratings (b: the first model's count, as in mcnemar/sign_test)."""
    h = {m: evals[m]["heldout"] for m in evals}
    out = {}
    for m in MODELS[1:]:
        out[f"{m} vs SFT"] = {"false_claim": mcnemar(h["SFT"]["false_claim"], h[m]["false_claim"]),
                              "rating": sign_test(h[m]["rating"], h["SFT"]["rating"])}
    out["Fact-RLHF vs RLHF"] = {"false_claim": mcnemar(h["RLHF"]["false_claim"], h["Fact-RLHF"]["false_claim"]),
                                "rating": sign_test(h["Fact-RLHF"]["rating"], h["RLHF"]["rating"])}
    return out


def pipeline(out: str, size: str = "full", seed: int = 0, seeds: int = 1, reuse: bool = True,
             side_by_side: bool = True) -> dict:
    """`seeds` independent tiny papers (world, SFT, reward models, PPO; seeds seed..seed+seeds-1), each in
    OUT/seed{s}/, then one table: each seed's numbers, and over seeds the mean +- sd with the paired tests
    pooled (the seeds' discordant counts added). Writes pipeline_table.txt, pipeline_summary.json,
    gold_vs_proxy.png and report.html in OUT."""
    t_start = time.time()
    per_seed = []
    for s in range(seed, seed + seeds):
        per_seed.append(pipeline_seed(os.path.join(out, f"seed{s}"), size, s, reuse, side_by_side))
        per_seed[-1]["tests"] = paired_tests(per_seed[-1]["eval"])
    table = format_pipeline_table(per_seed)
    total = time.time() - t_start
    print("\n" + table)
    for r in per_seed:
        print(f"seed {r['seed']} stage times (s): " + ", ".join(f"{n} {t:.0f}" for n, t in r["times"].items()))
    print(f"total {total:.0f} s")
    summary = {"seeds": per_seed, "pooled": pooled_summary(per_seed), "total_seconds": total}
    _dump(summary, os.path.join(out, "pipeline_summary.json"))
    with open(os.path.join(out, "pipeline_table.txt"), "w") as f:
        f.write(table + "\n")
    plot_gold_vs_proxy(per_seed, os.path.join(out, "gold_vs_proxy.png"))
    print(f"report: {report.write_report(out)}")
    return summary


def pooled_summary(per_seed: list[dict]) -> dict:
    """Over seeds: the paired tests with their discordant counts added."""
    names = list(per_seed[0]["tests"])
    return {name: {k: pooled([r["tests"][name][k] for r in per_seed]) for k in ("false_claim", "rating")}
            for name in names} | {"rm": pooled([r["rm"]["test"] for r in per_seed])}


def _mean_sd(xs: list[float]) -> str:
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{m:.3f} +- {sd:.3f}"


def _p(t: dict) -> str:
    return f"{t['b']}:{t['c']} p={t['p']:.2g}"


def format_pipeline_table(per_seed: list[dict]) -> str:
    """One block per seed, then (with several seeds) the mean +- sd and the pooled paired tests."""
    lines = []
    for r in per_seed:
        rm, ev, tests = r["rm"], r["eval"], r["tests"]
        h = {m: ev[m]["heldout"] for m in MODELS}
        lines += [f"seed {r['seed']}",
                  f"  reward model accuracy, {rm['n']} held-out pairs: Fact-RM {rm['facts']:.3f}, plain RM "
                  f"{rm['plain']:.3f}   McNemar (pairs only one gets wrong, Fact-RM:plain) {_p(rm['test'])}",
                  f"  Fact-RM scored with right / another image's / no captions: "
                  f"{rm['right']:.3f} / {rm['other_image']:.3f} / {rm['none']:.3f}",
                  f"  {'':<34}" + "".join(f"{m:>12}" for m in MODELS),
                  f"  {'held-out false-claim rate (' + str(h['SFT']['n']) + ')':<34}"
                  + "".join(f"{h[m]['rate']:>12.3f}" for m in MODELS),
                  f"  {'  +- standard error':<34}" + "".join(f"{h[m]['stderr']:>12.3f}" for m in MODELS),
                  f"  {'  vs SFT, McNemar (SFT:model) p':<34}{'':>12}"
                  + "".join(f"{tests[m + ' vs SFT']['false_claim']['p']:>12.2g}" for m in MODELS[1:]),
                  f"  {'held-out gold rating (0-6)':<34}" + "".join(f"{h[m]['mean_rating']:>12.2f}" for m in MODELS),
                  f"  {'  vs SFT, sign test p':<34}{'':>12}"
                  + "".join(f"{tests[m + ' vs SFT']['rating']['p']:>12.2g}" for m in MODELS[1:]),
                  f"  {'held-out mean length (words)':<34}" + "".join(f"{h[m]['mean_words']:>12.1f}" for m in MODELS),
                  f"  {'MMHal-style score (rule judge)':<34}" + "".join(f"{ev[m]['average']:>12.2f}" for m in MODELS),
                  f"  {'MMHal-style hallucination rate':<34}"
                  + "".join(f"{ev[m]['hallucination_rate']:>12.2f}" for m in MODELS),
                  f"  {'POPE mean F1 / yes-ratio':<34}"
                  + "".join(f"{ev[m]['pope']['mean']['f1']:>6.2f}/{ev[m]['pope']['mean']['yes_ratio']:.2f}" for m in MODELS)]
        for arm in ARMS:
            evs = r["ppo"][arm]["evals"]
            if evs:
                lines.append(f"  PPO {arm:<10} held-out proxy (RM) {evs[0]['eval_proxy_rm']:+.3f} -> "
                             f"{evs[-1]['eval_proxy_rm']:+.3f}   gold rating {evs[0]['eval_gold_rating']:.2f} -> "
                             f"{evs[-1]['eval_gold_rating']:.2f}   false claims {evs[0]['eval_gold_false_claim']:.3f} -> "
                             f"{evs[-1]['eval_gold_false_claim']:.3f}")
        t = tests["Fact-RLHF vs RLHF"]
        lines += [f"  Fact-RLHF vs RLHF: false claims McNemar (RLHF:Fact-RLHF) {_p(t['false_claim'])}; "
                  f"gold rating sign test (Fact-RLHF:RLHF) {_p(t['rating'])}", ""]
    if len(per_seed) > 1:
        pool = pooled_summary(per_seed)
        col = lambda f: "".join(f"{_mean_sd([f(r, m) for r in per_seed]):>18}" for m in MODELS)   # noqa: E731
        lines += [f"{len(per_seed)} seeds: mean +- sd over seeds; paired tests pooled (discordant counts added)",
                  f"  reward model accuracy: Fact-RM {_mean_sd([r['rm']['facts'] for r in per_seed])}, plain RM "
                  f"{_mean_sd([r['rm']['plain'] for r in per_seed])}   McNemar {_p(pool['rm'])}",
                  f"  {'':<28}" + "".join(f"{m:>18}" for m in MODELS),
                  f"  {'held-out false-claim rate':<28}" + col(lambda r, m: r["eval"][m]["heldout"]["rate"]),
                  f"  {'held-out gold rating':<28}" + col(lambda r, m: r["eval"][m]["heldout"]["mean_rating"]),
                  f"  {'held-out length (words)':<28}" + col(lambda r, m: r["eval"][m]["heldout"]["mean_words"]),
                  f"  {'MMHal-style score':<28}" + col(lambda r, m: r["eval"][m]["average"]),
                  f"  {'POPE mean F1':<28}" + col(lambda r, m: r["eval"][m]["pope"]["mean"]["f1"])]
        for name, t in pool.items():
            if name != "rm":
                lines.append(f"  {name:<22} false claims McNemar {_p(t['false_claim'])}   gold rating sign test {_p(t['rating'])}")
        lines.append("")
    lines += ["the paper's claims, as targets (issue #16)"] + [f"  [{'x' if ok else ' '}] {text}" for ok, text in claims(per_seed)]
    return "\n".join(lines).rstrip()


def claims(per_seed: list[dict], alpha: float = 0.01) -> list[tuple[bool, str]]:
    """The paper's claims as yes/no checks on the pooled paired tests and on every seed."""
    pool = pooled_summary(per_seed)        # one seed: its own tests
    k = len(per_seed)
    rm, fc = pool["rm"], pool["Fact-RLHF vs SFT"]["false_claim"]
    rm_ok = rm["c"] > rm["b"] and rm["p"] < alpha          # c: pairs only the plain RM gets wrong

    def lower(t: dict) -> bool:                            # b: questions only SFT makes a false claim on
        return t["b"] > t["c"] and t["p"] < alpha
    fc_ok = lower(fc)
    every = sum(lower(r["tests"]["Fact-RLHF vs SFT"]["false_claim"]) for r in per_seed)
    gold = sum(r["eval"]["Fact-RLHF"]["heldout"]["mean_rating"] > r["eval"]["RLHF"]["heldout"]["mean_rating"]
               for r in per_seed)
    return [(rm_ok, f"the Fact-RM is more accurate than the plain RM, paired p < {alpha} (pooled: {_p(rm)})"),
            (fc_ok, f"Fact-RLHF lowers the held-out false-claim rate against SFT, p < {alpha} pooled ({_p(fc)})"),
            (every == k, f"... and in every seed: {every} of {k}"),
            (gold == k, f"Fact-RLHF's held-out gold rating ends above RLHF's: {gold} of {k} seeds")]


def plot_gold_vs_proxy(per_seed: list[dict], path: str) -> str:
    """Reward hacking made visible: against PPO step, each arm's held-out proxy reward (what its RM says)
    and gold (the rule judge's rating, the false-claim rate), averaged over seeds."""
    charts = []
    for key, title in (("eval_proxy_rm", "proxy: the arm's own RM score"), ("eval_gold_rating", "gold: rule-judge rating (0-6)"),
                       ("eval_gold_false_claim", "gold: false-claim rate")):
        series = {}
        for arm in ARMS:
            runs = [r["ppo"][arm]["evals"] for r in per_seed if r["ppo"][arm]["evals"]]
            if runs:
                steps = [e["step"] for e in runs[0]]
                series[arm] = (steps, [sum(run[i][key] for run in runs) / len(runs) for i in range(len(steps))])
        charts.append(plots.LineChart(title, series, xlabel="PPO step"))
    return plots.save(charts, path, cols=3, size=(420, 320))


# ----------------------------------------------------------------------------------------------------
# Command line: one config dataclass per command (MakeConfig sits beside make), parsed like the stages'
# (common.parse_config).

@dataclass
class AnnotateConfig:
    data: str = ""                # the folder written by `make` (required)
    responses: str = ""           # JSON list with output_1/output_2 per prompt (required)
    out: str = ""                 # the labelled preferences to write (required)
    noise: float = 0.0            # probability of flipping a label
    seed: int = 0


@dataclass
class CollectConfig:
    data: str = ""                # the folder written by `make` (required)
    model: str = ""               # an SFT model folder (sft.py's final/) (required)
    out: str = ""                 # the labelled preferences to write (required)
    noise: float = 0.0            # probability of flipping a label
    seed: int = 0
    limit: int = 0                # > 0: only the first `limit` preference prompts


@dataclass
class PipelineConfig:
    out: str = ""                 # the run folder (required); seed s writes OUT/seed{s}/
    size: str = "full"            # full | smoke (seconds, for tests)
    seed: int = 0                 # the first seed
    seeds: int = 1                # independent seeds seed .. seed + seeds - 1 (world, SFT, RMs, PPO), pooled
    reuse: bool = True            # reuse stages finished before with the same settings (OUT/seed{s}/stages/)
    side_by_side: bool = True     # the two reward models, and then the two PPO arms, in parallel processes


def _required(cfg, *keys: str) -> None:
    for k in keys:
        if not getattr(cfg, k):
            raise common.ConfigError(f"--{k} is required")


def run_make(cfg: MakeConfig) -> dict:
    _required(cfg, "out")
    meta = make(cfg)
    print(json.dumps({"out": cfg.out, **meta["counts"], "vocab_size": meta["vocab_size"], "seconds": meta["seconds"]}))
    return meta


def run_annotate(cfg: AnnotateConfig) -> list[dict]:
    _required(cfg, "data", "responses", "out")
    labelled = annotate(cfg.data, data.load_json(cfg.responses), cfg.noise, cfg.seed)
    _dump(labelled, cfg.out)
    n_h = sum(r["hallucination"] for r in labelled)
    print(f"wrote {len(labelled)} preference records to {cfg.out} ({n_h} with a hallucination)")
    return labelled


def run_collect(cfg: CollectConfig) -> dict:
    _required(cfg, "data", "model", "out")
    res = collect_preferences(cfg.data, cfg.model, cfg.out, cfg.noise, cfg.seed, cfg.limit)
    print(json.dumps(res))
    return res


def run_pipeline(cfg: PipelineConfig) -> dict:
    _required(cfg, "out")
    if cfg.size not in PIPELINE_SIZES:
        raise common.ConfigError(f"--size must be one of {sorted(PIPELINE_SIZES)}, got {cfg.size!r}")
    if cfg.seeds < 1:
        raise common.ConfigError(f"--seeds must be >= 1, got {cfg.seeds}")
    return pipeline(cfg.out, cfg.size, cfg.seed, cfg.seeds, cfg.reuse, cfg.side_by_side)


COMMANDS = {"make": (MakeConfig, run_make), "annotate": (AnnotateConfig, run_annotate),
            "collect": (CollectConfig, run_collect), "pipeline": (PipelineConfig, run_pipeline)}


def main(argv: list[str] | None = None):
    """`python tinyworld.py COMMAND --key value ...`; `eval` passes eval_mmhal.py's own flags through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, rest = (argv[0], argv[1:]) if argv else ("", [])
    if cmd == "eval":
        return evaluate(rest)
    if cmd in ("", "-h", "--help"):
        print(__doc__)
        return None
    if cmd not in COMMANDS:
        raise common.ConfigError(f"unknown command {cmd!r}: make, annotate, collect, eval or pipeline")
    cls, run = COMMANDS[cmd]
    if "-h" in rest or "--help" in rest:
        print(common.config_help(cls, prog=f"python tinyworld.py {cmd}"))
        return None
    return run(common.parse_config(cls, rest))


if __name__ == "__main__":
    common.run_cli(main)
