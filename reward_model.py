"""The Factually Augmented reward model (SPEC §4): LoRA + a scalar head on the SFT model, trained with a
Bradley-Terry loss on human preferences, shown the image's facts (captions, ground-truth answers) so that
a response that contradicts them is easy to catch.

Train (tiny world):
    python reward_model.py --preset tiny --model_path runs/sft/final --data_path tiny_out/preferences.json \
        --image_folder tiny_out/images --captions tiny_out/captions.json --out_dir runs/rm
Train (7B, 8 GPUs; --facts none gives the paper's plain RM baseline):
    torchrun --nproc_per_node=8 reward_model.py --preset llava-rlhf-7b --model_path runs/sft7b/final \
        --data_path human_preference_10k.json --image_folder coco/train2017 --captions coco_captions.json \
        --out_dir runs/rm7b
Evaluate accuracy with and without facts:
    python reward_model.py eval --rm_dir runs/rm/best --data_path prefs_heldout.json \
        --image_folder tiny_out/images --captions tiny_out/captions.json
The exact text and ids the RM reads for record K of a file (with a trained RM's settings, or with the
official prompt files: --request_file fact_rlhf_reward_prompt.txt --facts_intro_file facts_sentence.txt):
    python reward_model.py render --data_path prefs.json --index 0 --rm_dir runs/rm/best --captions caps.json
    python reward_model.py render --data_path prefs.json --index 0 --tokenizer vicuna-7b-v1.5 \
        --request_file my_prompt.txt --facts_intro_file my_facts_sentence.txt --captions caps.json
Peak memory per GPU of one step at full size, before paying for GPUs (no weights, CPU, seconds):
    python rehearse.py --stage rm --preset llava-rlhf-13b --ranks 8
Score from Python (ppo.py does this):
    rm = reward_model.RewardScorer.load("runs/rm/best")
    rm.score([{"image": pil_or_path, "conversations": [...], "response": "...", "facts": [...]}])
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, asdict

import torch
import torch.nn.functional as F

import common
import data
import model as M
from weights import ModelError, check_finite

# ----------------------------------------------------------------------------------------------------
# The rating request (SPEC §4, §9): the text after the candidate's "</s>", where the reward is read.
#
# Its format follows the official loader's rules, so that a user's copy of the prompt file a released RM
# was trained with, and of its facts sentence, gives the model byte-identical input:
#   1. the request file is read as one space + its text stripped of surrounding whitespace;
#   2. when the text holds a "{factual_prompt}" slot, the whole text is filled by Python's str.format
#      (so "{{" and "}}" write single braces, and any other "{name}" is an error); without the slot the
#      text is used literally, braces and all;
#   3. the slot receives the facts sentence (a file read byte for byte: it should end with a newline),
#      then one "  - FACT\n" line per fact, in an order drawn per use (facts_order); no facts: nothing;
#   4. the model reads: the conversation with the candidate as the last assistant turn, its "</s>", then
#      the filled request; the score is read at the request's last token.
# `python reward_model.py render` prints that text and its ids for a record. This project's own wording
# is the default; the official texts are never shipped: pass them as files.
FACTS_SLOT = "{factual_prompt}"
DEFAULT_REQUEST = (
    "USER: Now judge your previous answer. Consider four qualities.\n"
    "1. Accurate: every statement must be true of the image; nothing may be invented or contradict what "
    "is shown. {factual_prompt}\n"
    "2. Helpful: it answers what was asked and gives useful detail.\n"
    "3. Natural: it reads as fluent, plain language.\n"
    "4. Concise: it says what is needed and no more.\n"
    "A good answer is accurate, helpful, natural and concise. "
    "ASSISTANT: Judged by these qualities, the quality score of my last response is"
)
DEFAULT_FACTS_INTRO = "To be accurate, the answer must agree with these captions of the image:\n"
FACTS_ORDERS = ("use", "epoch", "none")   # a fresh order per use (the official) | per epoch | as given


@dataclass(frozen=True)
class RatingRequest:
    """text: the request as read (rule 1); facts_intro: the facts sentence, exact bytes."""
    text: str
    facts_intro: str = DEFAULT_FACTS_INTRO

    def __post_init__(self):
        if self.has_slot:
            try:
                self.text.format(factual_prompt="")
            except (KeyError, IndexError, ValueError) as e:   # a stray "{x}" or "{": str.format refuses it
                raise common.ConfigError(f"the rating request cannot be filled by str.format "
                                         f"({type(e).__name__}: {e}); write a literal brace as {{{{ or }}}}") from None

    @classmethod
    def read(cls, request_file: str = "", facts_intro_file: str = "") -> "RatingRequest":
        """Rule 1 on request_file (default: DEFAULT_REQUEST); the facts sentence read byte for byte."""
        text = data.read_text(request_file) if request_file else DEFAULT_REQUEST
        intro = DEFAULT_FACTS_INTRO
        if facts_intro_file:
            with open(facts_intro_file, "rb") as f:
                raw = f.read()
            try:
                intro = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise data.DataError(f"not UTF-8 at byte {e.start}", path=facts_intro_file) from None
        try:
            return cls(" " + text.strip(), intro)
        except common.ConfigError as e:
            raise common.ConfigError(f"{request_file or 'DEFAULT_REQUEST'}: {e}") from None

    @property
    def has_slot(self) -> bool:
        return FACTS_SLOT in self.text

    def fill(self, facts: list[str]) -> str:
        """Rules 2 and 3: the request with these facts (already in their order)."""
        if not self.has_slot:
            return self.text
        block = self.facts_intro + "".join(f"  - {f}\n" for f in facts) if facts else ""
        return self.text.format(factual_prompt=block)


def facts_order(facts: list[str], seed: int, key: str, order: str = "use") -> list[str]:
    """The facts in the order one use shows them: shuffled from (seed, key) unless order == "none". The
    caller's key names the use (record id, step, response: rm_key), so a resumed run draws the same
    orders as an uninterrupted one; the RM cannot learn a position."""
    facts = list(facts)
    if order != "none" and len(facts) > 1:
        h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16)
        random.Random(h).shuffle(facts)
    return facts


def rm_key(record_id: str, order: str, use: int | str, epoch: int = 0, response: int = 0) -> str:
    """The shuffle key of one use: order "use" -> a fresh order per (id, use, response): the official
    code reshuffles for every text it builds, each response of a pair included; "epoch" -> per (id,
    epoch), both responses alike (this project's earlier behaviour); "none" -> unused."""
    return f"{record_id}:{use}:{response}" if order == "use" else f"{record_id}:{epoch}"


def rm_text(conversations: list[dict], response: str, request: str, template: data.Template) -> str:
    """Rule 4: "SYSTEM USER: <image>\\nQ ASSISTANT: RESPONSE</s>" + the filled request. `conversations`
    ends with the user turn the response answers."""
    return template.render(data.with_response(conversations, response)) + request


def build_rm_ids(conversations: list[dict], response: str, request: str, tok: data.Tokenizer,
                 template: data.Template, num_image_tokens: int, max_len: int,
                 record_id: str | None = None) -> list[int]:
    """BOS + rm_text encoded as LLaVA encodes a prompt (data.encode_text: "</s>" -> EOS, "<image>" ->
    num_image_tokens image ids, the pieces between encoded on their own); the score is read at the last id.
    max_len counts the image as ONE id (data.text_len; SPEC §9: the official RM's limit is 2048 text ids).
    Nothing is ever cut: when the whole does not fit, DataError names the record and the lengths."""
    ids = data.encode_text(rm_text(conversations, response, request, template), tok, num_image_tokens)
    n = data.text_len(ids)
    if n > max_len:
        who = f"id {record_id!r}: " if record_id is not None else ""
        n_req = len(data.encode_text(request, tok, 0, bos=False))
        raise data.DataError(f"{who}the reward-model input is {n} ids (the rating request {n_req} of them, the "
                             f"image counted as one), more than max_len {max_len}; the response is never cut")
    return ids


def bradley_terry_loss(r1: torch.Tensor, r2: torch.Tensor, preference: torch.Tensor,
                       center_coef: float = 1e-3) -> tuple[torch.Tensor, dict]:
    """-log sigmoid(r_preferred - r_other), as BCE-with-logits on r2 - r1 with target [preference == 2],
    plus center_coef * |mean(r1 + r2)| that keeps rewards near zero. r1, r2 (B,); preference (B,) in {1, 2}."""
    target = (preference == 2).to(r1.dtype)
    bt = F.binary_cross_entropy_with_logits(r2 - r1, target, reduction="none")        # (B,)
    center = (r1 + r2).mean().abs()
    loss = bt.mean() + center_coef * center
    correct = ((r2 > r1) == (preference == 2)).float()
    return loss, {"bt": bt.detach(), "correct": correct, "margin": ((r2 - r1) * (2 * target - 1)).detach()}


class RewardModel(torch.nn.Module):
    """Base LLaVA with the reward adapter active + scalar head read at the last real token."""

    def __init__(self, m: M.LLaVA, adapter: str, head: M.ScalarHead):
        super().__init__()
        self.m, self.adapter, self.head = m, adapter, head

    def forward(self, ids: torch.Tensor, images: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        self.m.set_adapter(self.adapter)
        h = self.m.hidden_states(ids, images, mask)                         # (B, T, D)
        return self.head(M.gather_last(h, mask))                           # (B,) fp32


def _images_tensor(images: list, image_size: int) -> torch.Tensor | None:
    """The images of the items that have one -> (N, 3, S, S): tensors as they are (preprocessed at the
    RM's size), paths and PIL images read and preprocessed here; or (N, P, D) when the items hold the
    base's image features (P, D) instead (PPO: encoded once per rollout, LLaVA.embed takes them)."""
    out = []
    for im in (x for x in images if x is not None):
        if not isinstance(im, torch.Tensor):
            im = data.image_tensor(im, image_size) if isinstance(im, str) else data.preprocess_image(im, image_size)
        elif im.dim() == 3 and im.shape[-1] != image_size:
            raise ValueError(f"image tensor of size {tuple(im.shape)}; the reward model expects {image_size} px")
        out.append(im)
    return torch.stack(out) if out else None


class RewardScorer:
    """Score (image, conversation, response, facts) items with a trained RM: batched, left padded, no_grad."""

    def __init__(self, m: M.LLaVA, adapter: str, head: M.ScalarHead, tok: data.Tokenizer,
                 system: str = data.VICUNA_V1_SYSTEM, request: RatingRequest | None = None,
                 max_len: int = 2048, facts: str = "captions", facts_order: str = "use", seed: int = 0,
                 batch_size: int = 8):
        self.rm = RewardModel(m, adapter, head)
        self.tok, self.template, self.request = tok, data.Template(system=system), request or RatingRequest.read()
        self.max_len, self.facts, self.order, self.seed, self.batch_size = max_len, facts, facts_order, seed, batch_size

    @classmethod
    def load(cls, rm_dir: str, base: M.LLaVA | None = None, adapter_name: str = "reward", device="cpu",
             dtype: torch.dtype | None = None, **kw) -> "RewardScorer":
        """rm_dir holds adapter_model.safetensors + adapter_config.json (peft layout), head.safetensors and
        rm_config.json (base model folder, tokenizer, template, rating request). `base`: reuse an
        already-loaded base (PPO keeps policy, reference, value and reward adapters on one). The facts
        mode and order the RM was trained with are kept; a keyword given here wins over any saved value."""
        from safetensors.torch import load_file
        meta = read_rm_config(rm_dir)
        if base is None:
            base = M.LLaVA.from_pretrained(meta["model_path"], vision_tower=meta.get("vision_tower") or None,
                                           dtype=dtype, device=device)
            base.requires_grad_(False)
        base.load_adapter(rm_dir, adapter_name)
        w = next(base.parameters())
        head = M.ScalarHead(base.config.hidden).to(device=w.device, dtype=w.dtype)
        head_path = os.path.join(rm_dir, "head.safetensors")
        try:
            sd = load_file(head_path)
            head.load_state_dict(sd)
        except Exception as e:  # noqa: BLE001 - missing, corrupt, or of another width: name the file
            raise ModelError(f"{head_path}: not the scalar head of a {base.config.hidden}-wide model "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        for k, t in sd.items():
            check_finite(t, f"{head_path}: tensor {k!r}")
        head.requires_grad_(False)
        tok = data.Tokenizer(meta["tokenizer"])
        kw = {**rm_settings(meta), **kw}
        return cls(base, adapter_name, head, tok, **kw)

    def encode(self, item: dict, key: str = "", use: int | str = 0) -> list[int]:
        """The RM's ids of one item: its facts in the order of this use (item id, else `key`, and `use`)."""
        rid = item.get("id")
        rid = key if rid is None else str(rid)
        facts = facts_order(record_facts(item, {}, self.facts), self.seed, rm_key(rid, self.order, use), self.order)
        return build_rm_ids(item["conversations"], item["response"], self.request.fill(facts), self.tok,
                            self.template, self.rm.m.num_image_tokens, self.max_len, record_id=rid or None)

    @torch.no_grad()
    def score(self, items: list[dict], use: int | str = 0) -> list[float]:
        """items: {"image": a path, PIL image or preprocessed (3, S, S) tensor at the RM's size (what PPO
        passes: read once per rollout) or None, "conversations": turns ending with the user's, "response":
        str, "facts": list[str], "id"} -> one float each, batch_size items per forward. `use` names this
        scoring in the facts' shuffle (PPO passes its step)."""
        m, S = self.rm.m, self.rm.m.config.image_size
        dev, was = next(m.parameters()).device, m.active_adapter
        out: list[float] = []
        for i in range(0, len(items), self.batch_size):
            chunk = items[i:i + self.batch_size]
            seqs = [self.encode(it, str(i + j), use) for j, it in enumerate(chunk)]
            ids, mask = data.left_pad(seqs, self.tok.pad_id)                       # (b, T)
            images = _images_tensor([it.get("image") for it in chunk], S)
            out += self.rm(ids.to(dev), None if images is None else images.to(dev), mask.to(dev)).tolist()
        m.set_adapter(was)
        return out


# ----------------------------------------------------------------------------------------------------
# Training

@dataclass
class Config:
    preset: str = ""                     # a named set of defaults (PRESETS below); later flags override it
    # data
    data_path: str = ""                 # preference records (SPEC §3), .json or .jsonl
    eval_data_path: str = ""            # held-out preferences; empty: hold out eval_size from data_path
    eval_size: int = 500
    split: str = "random"               # random: a seeded permutation, as the official (torch random_split) | first: the first eval_size
    split_seed: int = 42                # the official split's seed
    image_folder: str = ""
    captions: str = ""                  # JSON map image file -> list of captions (the facts)
    facts: str = "captions"             # captions (inline facts win when a record has them) | none
    facts_order: str = "use"            # use: reshuffled for every text built, as the official | epoch | none (as given)
    request_file: str = ""              # the rating request, read as " " + text.strip(), "{factual_prompt}" slot (default: ours)
    facts_intro_file: str = ""          # the sentence before the fact lines, read byte for byte (default: ours)
    tokenizer: str = ""                 # default: model_path
    system: str = data.VICUNA_V1_SYSTEM
    max_len: int = 2048                 # prompt + response + rating request, the image counted as one id (SPEC §9)
    on_error: str = "raise"
    num_workers: int = 2                # DataLoader processes reading, decoding and collating pairs ahead of the
    #                                     step (pinned memory on GPU); 0: read in the training process
    # model
    model_path: str = ""                # the SFT model (local folder)
    vision_tower: str = ""
    dtype: str = "auto"
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    # optimisation
    lr: float = 2e-5
    lr_schedule: str = "constant"       # constant after warm-up (the official RM) | cosine (decay to min_lr_ratio)
    warmup_ratio: float = 0.03          # constant: ceil(ratio x steps) warm-up steps from 0, as transformers; cosine: int(...)
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = 0
    global_batch: int = 32              # preference pairs per optimizer step over all ranks
    micro_batch: int = 4                # pairs per forward per rank
    grad_clip: float = 0.3
    center_coef: float = 1e-3
    grad_ckpt: bool = False
    # run
    out_dir: str = "runs/rm"
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 50
    keep_last: int = 2
    divergence_check: bool = True       # stop when loss/grad-norm leave their recent range (common.Divergence)
    resume: str = "false"               # true: continue from the newest good checkpoint (stop if none); auto: also start fresh if none
    overwrite: bool = False             # a fresh run (resume false) may delete the checkpoints and logs already in out_dir
    stop_at_step: int = 0
    logger: str = "none"
    progress: bool = True


PRESETS = {
    # the tiny world keeps the cosine decay and its file-order split (the generated file is already in
    # random order): its numbers were measured so
    "tiny": dict(lr_schedule="cosine", split="first", lr=1e-3, lora_r=16, lora_alpha=32.0, global_batch=32, micro_batch=16, epochs=2.0, eval_size=200,
                 eval_every=20, save_every=40, max_len=385, grad_clip=1.0),
    "llava-rlhf-7b": dict(lr=2e-5, global_batch=32, micro_batch=4, grad_clip=0.3, epochs=1.0, eval_every=25,
                          grad_ckpt=True, max_len=2048),
    "llava-rlhf-13b": dict(lr=2e-5, global_batch=32, micro_batch=2, grad_clip=0.3, epochs=1.0, eval_every=25,
                           grad_ckpt=True, max_len=2048),
}


class PairData(data._ServeOrSkip):
    """Preference pairs -> tokenised (ids_1, ids_2, image, preference), the facts in the order of each use
    (facts_order, keyed by id, `use` = the training step the loop sets, response, or `epoch`).
    Lengths are checked up front (with use 0's facts order): a pair whose prompt + response +
    rating request exceeds max_len (the image counted as one id; a response is never cut) raises DataError
    naming the record, or with on_error="skip" is dropped and counted in `skipped` and the Skips. An image
    that cannot be read raises DataError naming the file, record and image when the pair is served, or with
    on_error="skip" is counted and the next pair served instead (as SFTDataset does: batch shapes stay)."""

    def __init__(self, records, tok, template, request: RatingRequest, captions, facts_mode, order: str, image_folder,
                 image_size, n_img, max_len, seed, on_error: str = "raise", skips: data.Skips | None = None):
        super().__init__(image_folder, image_size, on_error, skips)
        self.tok, self.template, self.request = tok, template, request
        self.captions, self.facts_mode, self.order = captions, facts_mode, order
        self.n_img, self.max_len, self.seed = n_img, max_len, seed
        self.epoch, self.use = 0, 0
        self.records, self.keys, self.skipped = [], [], 0
        for i, rec in enumerate(records):
            try:
                self._ids(rec, pair_key(rec, i))
            except data.DataError as e:
                e = e.at(rec.get("source"), rec.get("index", i))
                if on_error == "raise":
                    raise e from None
                self.skips.add(str(e), rec.get("index", i))
                self.skipped += 1
                continue
            self.records.append(rec)
            self.keys.append(pair_key(rec, i))
        no_facts = sum(1 for r in self.records if r.get("image") and not record_facts(r, captions, facts_mode))
        if facts_mode != "none" and no_facts:
            print(f"PairData: {no_facts} of {len(self.records)} pairs have an image with no facts (no inline "
                  f"'facts', not in the captions map): they are shown an empty facts slot", file=sys.stderr)
        if self.skipped:
            print(f"PairData: skipped {self.skipped} of {len(records)} pairs longer than max_len {max_len} "
                  f"(the image counted as one id)", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.records)

    def _ids(self, rec: dict, key) -> list[list[int]]:
        """The ids of both responses after the prompt (the conversation up to its last user turn)."""
        conv = rec["conversations"]
        if conv and conv[-1]["from"] == "gpt":
            conv = conv[:-1]  # the reference answer, when present, is replaced by each candidate
        shown = pair_facts(rec, key, self.captions, self.facts_mode, self.order, self.seed, self.use, self.epoch)
        return [build_rm_ids(conv, rec[f"output_{k}"]["value"], self.request.fill(f), self.tok, self.template,
                             self.n_img if rec.get("image") else 0, self.max_len, record_id=str(key))
                for k, f in zip((1, 2), shown)]

    def _item(self, i: int) -> dict:
        rec = self.records[i]
        return {"ids": self._ids(rec, self.keys[i]), "image": self._image(rec), "preference": int(rec["preference"])}


def pair_key(rec: dict, i: int = 0) -> str:
    """A pair's name in the facts' shuffle: its id, else its position in its file (what render shows)."""
    if rec.get("id") is not None:
        return str(rec["id"])
    return f"#{rec.get('index', i)}"


def record_facts(rec: dict, captions: dict, mode: str) -> list[str]:
    """The facts a pair is shown: its own "facts", else the captions of its image; none under mode "none"."""
    if mode == "none":
        return []
    return list(rec.get("facts") or captions.get(rec.get("image") or "", []))


def pair_facts(rec: dict, key: str, captions: dict, mode: str, order: str, seed: int, use: int | str,
               epoch: int = 0) -> list[list[str]]:
    """The facts each response of a pair is shown at this use, in their order: [output_1's, output_2's]."""
    facts = record_facts(rec, captions, mode)
    return [facts_order(facts, seed, rm_key(str(key), order, use, epoch, k), order) for k in (1, 2)]


def collate_pairs(items: list[dict], pad_id: int) -> dict:
    """B pairs -> 2B right-padded rows: [all first responses; all second responses]."""
    seqs = [it["ids"][0] for it in items] + [it["ids"][1] for it in items]
    ids, mask = data.right_pad(seqs, pad_id)
    imgs = [it["image"] for it in items if it["image"] is not None]
    images = torch.stack(imgs + imgs) if imgs else None
    return {"ids": ids, "mask": mask, "images": images,
            "preference": torch.tensor([it["preference"] for it in items])}


def pair_loss(rm: RewardModel, batch: dict, device, center_coef: float = 1e-3) -> tuple[torch.Tensor, dict]:
    """The Bradley-Terry loss of one micro-batch of pairs (training and evaluation), the rewards computed
    at the frozen base's precision (the lm_head never trains here, so its dtype is the base's) over fp32
    adapter and head weights."""
    images = batch["images"].to(device) if batch["images"] is not None else None
    with common.autocast(device, rm.m.lm_head.weight.dtype):
        r = rm(batch["ids"].to(device), images, batch["mask"].to(device))     # (2B,)
    r1, r2 = r.float().chunk(2)
    return bradley_terry_loss(r1, r2, batch["preference"].to(device), center_coef)


def evaluate_pairs(rm: RewardModel, pdata: PairData, indices: list[int], batch: int, pad_id: int, device) -> dict:
    """Held-out pairwise accuracy and mean margin (summed over ranks), and this rank's per-pair
    outcomes in `indices` order ("correct": 1/0), for paired tests between reward models."""
    rm.eval()
    stats = torch.zeros(3)  # correct, margin sum, count
    correct: list[int] = []
    with torch.no_grad():
        for i in range(0, len(indices), batch):
            b = collate_pairs([pdata[j] for j in indices[i:i + batch]], pad_id)
            _, st = pair_loss(rm, b, device)
            stats += torch.tensor([float(st["correct"].sum()), float(st["margin"].sum()), len(b["preference"])])
            correct += [int(c) for c in st["correct"].tolist()]
    stats = common.all_reduce_sum(stats)
    rm.train()
    n = max(1.0, float(stats[2]))
    return {"accuracy": float(stats[0]) / n, "margin": float(stats[1]) / n, "n": int(stats[2]), "correct": correct}


def save_rm(out: str, rm: RewardModel, cfg: Config, request: RatingRequest, tok_path: str, extra: dict) -> None:
    """Adapter (peft layout) + head + rm_config.json, written to a temp folder and renamed. The rating
    request is saved as read (rule 1 applied), so a scorer rebuilds the exact training input."""
    from safetensors.torch import save_file
    meta = {"model_path": os.path.abspath(cfg.model_path), "vision_tower": cfg.vision_tower,
            "tokenizer": os.path.abspath(tok_path), "system": cfg.system, "rm_request": request.text,
            "facts_intro": request.facts_intro, "max_len": cfg.max_len, "facts": cfg.facts,
            "facts_order": cfg.facts_order, "seed": cfg.seed, "split": cfg.split, "split_seed": cfg.split_seed,
            **extra}

    def fill(tmp: str) -> None:
        rm.m.save_adapter(tmp, "reward")
        save_file({k: v.detach().cpu().contiguous() for k, v in rm.head.state_dict().items()},
                  os.path.join(tmp, "head.safetensors"))
        with open(os.path.join(tmp, "rm_config.json"), "w") as f:
            json.dump(meta, f, indent=2, allow_nan=False)   # NaN is not JSON: a value never measured is null
    common.write_dir(out, fill)


def validate(cfg: Config) -> None:
    """Every flag checked before anything loads or is written: ConfigError naming the flag and its value."""
    common.check_config(
        cfg, required=("data_path", "model_path"),
        positive=("max_len", "lora_r", "lora_alpha", "lr", "epochs", "global_batch", "micro_batch", "log_every",
                  "eval_every"),
        # 0 turns off: save_every, stop_at_step, grad_clip; keep_last 0 keeps every checkpoint
        nonneg=("eval_size", "num_workers", "weight_decay", "max_steps", "grad_clip", "center_coef", "save_every",
                "keep_last", "stop_at_step"),
        fractions=("warmup_ratio", "min_lr_ratio", "lora_dropout"),
        choices={"facts": ("captions", "none"), "on_error": ("raise", "skip"), "dtype": ("auto", *M.DTYPES),
                 "logger": ("none", "wandb", "tensorboard"), "facts_order": FACTS_ORDERS,
                 "lr_schedule": ("constant", "cosine"), "split": ("random", "first")},
        files=("data_path", "eval_data_path", "captions", "request_file", "facts_intro_file"),
        dirs=("image_folder", "model_path", "vision_tower"), out_dirs=("out_dir",), device="device")
    if not cfg.lora_targets.strip(","):
        raise common.ConfigError(f"--lora_targets names no module, got {cfg.lora_targets!r}")
    common.check_tokenizer(cfg)
    request = RatingRequest.read(cfg.request_file, cfg.facts_intro_file)
    if cfg.facts != "none" and not request.has_slot:
        raise common.ConfigError(f"--request_file {cfg.request_file}: no {FACTS_SLOT} slot, so the facts "
                                 f"(--facts {cfg.facts}) would never be shown; add the slot or pass --facts none")


def heldout_split(n: int, eval_size: int, split: str = "random", seed: int = 42) -> tuple[list[int], list[int]]:
    """(training, held-out) record indices. "random" is the official split: torch.utils.data.random_split
    of the n records into [n - eval_size, eval_size] under a generator seeded with `seed`, i.e. one
    torch.randperm(n) whose last eval_size entries are held out; "first": the first eval_size in file order."""
    if eval_size >= n:
        raise data.DataError(f"--eval_size {eval_size} holds out every one of the {n} pairs; nothing is left to train on")
    if split == "first":
        return list(range(eval_size, n)), list(range(eval_size))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[:n - eval_size], perm[n - eval_size:]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        return eval_main(argv[1:])
    if argv[:1] == ["render"]:
        return render_main(argv[1:])
    cfg = common.parse_config(Config, argv, PRESETS)
    validate(cfg)
    d = common.start_run(cfg)
    accum = common.accumulation(cfg.global_batch, cfg.micro_batch, d.world)   # the geometry, before any load

    tok = data.Tokenizer(cfg.tokenizer or cfg.model_path)
    template = data.Template(system=cfg.system)
    request = RatingRequest.read(cfg.request_file, cfg.facts_intro_file)
    captions = data.load_captions(cfg.captions)
    skips = data.Skips()
    records = data.read_preferences(cfg.data_path, on_error=cfg.on_error, skips=skips)
    if cfg.eval_data_path:
        eval_records = data.read_preferences(cfg.eval_data_path, on_error=cfg.on_error, skips=skips)
    else:
        train_idx, eval_idx = heldout_split(len(records), cfg.eval_size, cfg.split, cfg.split_seed)
        eval_records, records = [records[i] for i in eval_idx], [records[i] for i in train_idx]

    m = M.load_model(cfg.model_path, cfg.vision_tower, "", 0, cfg.dtype, d.device)
    m.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # adapter and head init from the seed: the same on every rank
    m.add_adapter("reward", r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                  targets=tuple(cfg.lora_targets.split(",")))
    for p in m.adapter_parameters("reward"):
        p.requires_grad_(True)
    w = next(m.parameters())
    head = M.ScalarHead(m.config.hidden).to(device=w.device, dtype=w.dtype)
    m.gradient_checkpointing = cfg.grad_ckpt
    rm = RewardModel(m, "reward", head).train()
    params = common.fp32_trainable(m.adapter_parameters("reward") + list(head.parameters()))

    pdata, edata = (PairData(recs, tok, template, request, captions, cfg.facts, cfg.facts_order, cfg.image_folder,
                             m.config.image_size, m.num_image_tokens, cfg.max_len, cfg.seed, cfg.on_error, skips)
                    for recs in (records, eval_records))
    edata.use = "eval"   # held-out pairs are shown one fixed order, so evaluations compare
    eval_idx = list(range(d.rank, len(edata), d.world))

    steps_per_epoch = len(pdata) // cfg.global_batch
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(pdata)} pairs is fewer than one global batch ({cfg.global_batch})", cfg.data_path)
    total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    warmup = (math.ceil if cfg.lr_schedule == "constant" else int)(cfg.warmup_ratio * total_steps)
    sampler = data.ResumableSampler(len(pdata), rank=d.rank, world_size=d.world, seed=cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    watch = common.Divergence(cfg.out_dir, cfg.divergence_check)
    ck = common.Checkpointer(cfg, rm, opt, sampler, watch=watch)
    step, best = 0, -1.0                  # best: the held-out accuracy of out_dir/best
    if state := ck.start():   # as --resume says: fresh, resumed, or refused
        step, best = state["step"], state["best"]
    # pairs read ahead in worker processes, each told the step it is trained at (its facts' order) and the
    # sampler's epoch after its take (--facts_order epoch); the sampler checkpoints save advances as trained
    start = step

    def setup(ds: PairData, epoch: int, k: int) -> None:
        ds.use, ds.epoch = start + k // accum, epoch

    loader = data.BatchLoader(pdata, sampler, cfg.micro_batch, functools.partial(collate_pairs, pad_id=tok.pad_id),
                              cfg.num_workers, pin_memory=d.device.type == "cuda", setup=setup)

    logger = common.MetricsLogger(cfg.out_dir, cfg.logger, "rm", asdict(cfg))
    bar = common.Progress(total_steps, "reward model", start=step, enabled=cfg.progress)

    ev = None                              # the last held-out evaluation in this process
    if step >= total_steps and common.is_main():
        print(f"already at step {step} of {total_steps}: nothing left to train; writing the final model")
    while step < total_steps:
        lr = (common.constant_lr(step, warmup, cfg.lr) if cfg.lr_schedule == "constant"
              else common.cosine_lr(step, total_steps, warmup, cfg.lr, cfg.min_lr_ratio))
        for g in opt.param_groups:
            g["lr"] = lr
        tot = torch.zeros(3)
        for _ in range(accum):
            b = loader.next()   # the facts' order of this step (setup); --facts_order epoch: of the epoch
            loss, st = pair_loss(rm, b, d.device, cfg.center_coef)
            n = len(b["preference"])
            # each micro-batch weighs its share of the global batch; grads are then summed over ranks
            (loss * n / cfg.global_batch).backward()
            tot += torch.tensor([float(loss.detach()) * n, float(st["correct"].sum()), n])
        tot = common.all_reduce_sum(tot)
        loss_val = float(tot[0] / tot[2])
        common.allreduce_grads(params)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        # before the update: diverged weights are not trained on (their checkpoint, if written, is set aside)
        watch.check(step, loss=loss_val, grad_norm=float(gnorm) if cfg.grad_clip > 0 else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        metrics = {"loss": loss_val, "train_accuracy": float(tot[1] / tot[2]), "lr": lr, "grad_norm": float(gnorm)}
        if len(edata) and (step % cfg.eval_every == 0 or step == total_steps):   # all ranks (a collective)
            ev = evaluate_pairs(rm, edata, eval_idx, cfg.micro_batch, tok.pad_id, d.device)
            metrics.update(eval_accuracy=ev["accuracy"], eval_margin=ev["margin"])
            if ev["accuracy"] > best:
                best = ev["accuracy"]
                if common.is_main():
                    save_rm(os.path.join(cfg.out_dir, "best"), rm, cfg, request, tok.path,
                            {"step": step, "eval_accuracy": best, "n_eval": len(edata)})
        logger.log(step, metrics)
        shown = {"eval_acc": ev["accuracy"]} if "eval_accuracy" in metrics else {}
        bar.update(1, loss=loss_val, acc=metrics["train_accuracy"], **shown)
        if ck.after_step(step, best=best):   # saved every save_every steps; a signal or stop_at_step: stop
            loader.close()
            common.cleanup_distributed()
            return {"step": step, "stopped": True}
    bar.close()
    loader.close()
    ck.finish(step, best=best)
    if ev is None and len(edata):   # no step ran here (a resume at the last step): the final model measured once
        ev = evaluate_pairs(rm, edata, eval_idx, cfg.micro_batch, tok.pad_id, d.device)
    final_acc = ev["accuracy"] if ev is not None else None   # None (JSON null): no held-out pairs
    if common.is_main():
        save_rm(os.path.join(cfg.out_dir, "final"), rm, cfg, request, tok.path,
                {"step": step, "eval_accuracy": final_acc, "n_eval": len(edata)})
        if not os.path.exists(os.path.join(cfg.out_dir, "best")):
            shutil.copytree(os.path.join(cfg.out_dir, "final"), os.path.join(cfg.out_dir, "best"))
        acc = f"best held-out accuracy {best:.3f}" if len(edata) else "no held-out pairs"
        print(f"done: {step} steps; {acc}; skipped records: {skips.count}")
    common.cleanup_distributed()
    return {"step": step, "best_accuracy": best, "final_accuracy": final_acc, "stopped": False}


# ----------------------------------------------------------------------------------------------------
# Evaluation command

@dataclass
class EvalConfig:
    rm_dir: str = ""                    # a folder written by training (best/ or final/)
    data_path: str = ""                 # preference records
    image_folder: str = ""
    captions: str = ""
    batch: int = 8
    device: str = "auto"
    out: str = ""                       # optional JSON file for the table


def read_rm_config(rm_dir: str) -> dict:
    """rm_dir/rm_config.json, what save_rm wrote: ModelError naming the file when it lacks a field the
    reward model is rebuilt from."""
    path = os.path.join(rm_dir, "rm_config.json")
    meta = data.load_json(path)
    if isinstance(meta, dict) and "rm_template" in meta and "rm_request" not in meta:
        raise ModelError(f"{path}: written by an earlier reward_model.py (a {{facts}} template, another fact line "
                         f"format); its input cannot be rebuilt exactly: retrain the reward model")
    lacks = [k for k in ("model_path", "tokenizer", "system", "rm_request", "facts_intro", "max_len") if k not in meta] \
        if isinstance(meta, dict) else None
    if lacks is None or lacks:
        raise ModelError(f"{path}: not a reward model's config (lacks {lacks or 'everything'})")
    return meta


def rm_settings(meta: dict) -> dict:
    """rm_config.json -> the RewardScorer keywords that rebuild the training input."""
    try:
        request = RatingRequest(meta["rm_request"], meta["facts_intro"])
    except common.ConfigError as e:
        raise ModelError(f"rm_config.json: {e}") from None
    return {"system": meta["system"], "request": request, "max_len": meta["max_len"],
            "facts": meta.get("facts", "captions"), "facts_order": meta.get("facts_order", "use"),
            "seed": meta.get("seed", 0)}


def check_rm_dir(rm_dir: str) -> None:
    """ConfigError unless --rm_dir is a folder reward_model.py wrote (it holds rm_config.json)."""
    if not os.path.isfile(os.path.join(rm_dir, "rm_config.json")):
        raise common.ConfigError(f"--rm_dir {rm_dir}: no rm_config.json (not a reward_model.py output folder)")


def validate_eval(cfg: EvalConfig) -> None:
    """The eval command's flags, checked before the reward model loads."""
    common.check_config(cfg, required=("rm_dir", "data_path"), positive=("batch",), files=("data_path", "captions"),
                        dirs=("rm_dir", "image_folder"), out_files=("out",), device="device")
    check_rm_dir(cfg.rm_dir)


def eval_main(argv: list[str]) -> dict:
    cfg = common.parse_config(EvalConfig, argv)
    validate_eval(cfg)
    dev = common.resolve_device(cfg.device)
    scorer = RewardScorer.load(cfg.rm_dir, device=dev)
    m = scorer.rm.m
    captions = data.load_captions(cfg.captions)
    records = data.read_preferences(cfg.data_path)
    rows = {}
    for mode in ("captions", "none"):
        pd = PairData(records, scorer.tok, scorer.template, scorer.request, captions, mode, scorer.order,
                      cfg.image_folder, m.config.image_size, m.num_image_tokens, scorer.max_len, scorer.seed)
        pd.use = "eval"   # the order training's held-out evaluation showed
        rows[mode] = evaluate_pairs(scorer.rm, pd, list(range(len(pd))), cfg.batch, scorer.tok.pad_id, dev)
    print(f"reward model {cfg.rm_dir} on {cfg.data_path} ({len(records)} pairs)")
    print(f"{'facts':<10}{'accuracy':>10}{'margin':>10}")
    for mode, r in rows.items():
        print(f"{'with' if mode == 'captions' else 'without':<10}{r['accuracy']:>10.3f}{r['margin']:>10.3f}")
    if cfg.out:
        common.atomic_write_text(json.dumps(rows, indent=2), cfg.out)
    return rows


# ----------------------------------------------------------------------------------------------------
# Render command: the exact text and ids the reward model reads for a record (the tool that ends
# prompt mix-ups: diff it against what a released RM was trained on).

@dataclass
class RenderConfig:
    data_path: str = ""                 # preference records (.json / .jsonl)
    index: int = 0                      # the record's position in the file, from 0
    rm_dir: str = ""                    # a trained RM: its tokenizer, system sentence, rating request, facts mode and order
    tokenizer: str = ""                 # without --rm_dir: a folder holding tokenizer.model, or the file
    system: str = data.VICUNA_V1_SYSTEM
    request_file: str = ""              # without --rm_dir: the rating request (default: ours)
    facts_intro_file: str = ""          # without --rm_dir: the sentence before the fact lines (default: ours)
    facts: str = "captions"             # without --rm_dir: captions | none
    facts_order: str = "use"            # without --rm_dir: use | epoch | none
    seed: int = 0                       # without --rm_dir: the training seed (the shuffle's)
    captions: str = ""                  # image -> captions map
    use: str = "0"                      # whose facts order: a training step (facts_order use), or eval (held-out pairs)
    epoch: int = 0                      # the epoch, for facts_order epoch
    json: bool = False                  # one JSON object instead of text


def render_record(rec: dict, tok: data.Tokenizer, template: data.Template, request: RatingRequest,
                  captions: dict, facts_mode: str, order: str, seed: int, use: int | str, epoch: int = 0) -> list[dict]:
    """What PairData builds for one pair, per response: the text, its ids with the image as ONE id -200
    (as LLaVA's tokenizer_image_token writes it), and the read position (the last id)."""
    has_image = rec.get("image") is not None
    out = []
    for k, shown in zip((1, 2), pair_facts(rec, pair_key(rec), captions, facts_mode, order, seed, use, epoch)):
        text = rm_text(rec["conversations"], rec[f"output_{k}"]["value"], request.fill(shown), template)
        ids = data.encode_text(text, tok, 1 if has_image else 0)
        out.append({"response": k, "text": text, "ids": ids, "read_at": len(ids) - 1,
                    "read_id": ids[-1], "read_piece": tok.sp.id_to_piece(ids[-1]), "facts": shown})
    return out


def render_main(argv: list[str]) -> list[dict]:
    cfg = common.parse_config(RenderConfig, argv)
    common.check_config(cfg, required=("data_path",), nonneg=("index", "epoch"),
                        choices={"facts": ("captions", "none"), "facts_order": FACTS_ORDERS},
                        files=("data_path", "captions", "request_file", "facts_intro_file"), dirs=("rm_dir",))
    if cfg.rm_dir:
        check_rm_dir(cfg.rm_dir)
        given = [f"--{k}" for k in ("tokenizer", "request_file", "facts_intro_file")
                 if getattr(cfg, k)] + [f"--{k}" for k in ("system", "facts", "facts_order", "seed")
                                          if getattr(cfg, k) != getattr(RenderConfig, k)]
        if given:
            raise common.ConfigError(f"--rm_dir decides {', '.join(given)} (its rm_config.json); drop them")
        meta = read_rm_config(cfg.rm_dir)
        kw = rm_settings(meta)
        tok = data.Tokenizer(meta["tokenizer"])
        system, request, facts_mode, order, seed = kw["system"], kw["request"], kw["facts"], kw["facts_order"], kw["seed"]
    else:
        if not cfg.tokenizer:
            raise common.ConfigError("--tokenizer is required without --rm_dir")
        tok = data.Tokenizer(cfg.tokenizer)
        request = RatingRequest.read(cfg.request_file, cfg.facts_intro_file)
        system, facts_mode, order, seed = cfg.system, cfg.facts, cfg.facts_order, cfg.seed
    records = data.read_preferences(cfg.data_path)
    rec = next((r for r in records if r["index"] == cfg.index), None)
    if rec is None:
        raise common.ConfigError(f"--index {cfg.index}: {cfg.data_path} has {len(records)} records (0 to {len(records) - 1})")
    if cfg.use != "eval" and not cfg.use.lstrip("-").isdigit():
        raise common.ConfigError(f"--use: a training step (an integer) or eval, got {cfg.use!r}")
    use = cfg.use if cfg.use == "eval" else int(cfg.use)
    rows = render_record(rec, tok, data.Template(system=system), request, data.load_captions(cfg.captions),
                         facts_mode, order, seed, use, cfg.epoch)
    if cfg.json:
        print(json.dumps({"index": cfg.index, "id": rec["id"], "responses": rows}, ensure_ascii=False))
        return rows
    print(f"record {cfg.index} (id {rec['id']!r}) of {cfg.data_path}: preference {rec['preference']}, "
          f"image {rec.get('image')!r}, {len(rows[0]['facts'])} facts ({facts_mode}, order {order}, use {use})")
    for r in rows:
        print(f"=== output_{r['response']}: {len(r['ids'])} ids, the image as one id -200; the score is read at "
              f"position {r['read_at']} (id {r['read_id']}, piece {r['read_piece']!r})")
        print("--- text (between the lines, exactly; repr below) ---")
        print(r["text"])
        print("---")
        print(repr(r["text"]))
        print("ids:", r["ids"])
    return rows


if __name__ == "__main__":
    common.run_cli(main)
