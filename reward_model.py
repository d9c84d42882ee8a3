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
Peak memory per GPU of one step at full size, before paying for GPUs (no weights, CPU, seconds):
    python rehearse.py --stage rm --preset llava-rlhf-13b --ranks 8
Score from Python (ppo.py does this):
    rm = reward_model.RewardScorer.load("runs/rm/best")
    rm.score([{"image": pil_or_path, "conversations": [...], "response": "...", "facts": [...]}])
"""
from __future__ import annotations

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

# The rating request appended after the candidate's "</s>". Written in this project's own words; any
# text with one "{facts}" slot can replace it (--template_file), e.g. the prompt a released RM was
# trained with. The reward is read at the hidden state of its last token.
DEFAULT_TEMPLATE = (
    "USER: Now judge your previous answer. Consider four qualities.\n"
    "1. Accurate: every statement must be true of the image; nothing may be invented or contradict what "
    "is shown.{facts}\n"
    "2. Helpful: it answers what was asked and gives useful detail.\n"
    "3. Natural: it reads as fluent, plain language.\n"
    "4. Concise: it says what is needed and no more.\n"
    "A good answer is accurate, helpful, natural and concise. "
    "ASSISTANT: Judged by these qualities, the quality score of my last response is"
)
FACTS_INTRO = " To be accurate, the answer must agree with these captions of the image:"


def format_facts(facts: list[str], seed: int | None = None, key: str = "") -> str:
    """The facts slot: an intro sentence then one `  - caption` line each, in an order shuffled from
    (seed, key) so the RM cannot learn a position; empty when there are no facts."""
    if not facts:
        return ""
    facts = list(facts)
    if seed is not None:
        h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16)
        random.Random(h).shuffle(facts)
    return FACTS_INTRO + "".join(f"\n  - {f}" for f in facts)


def build_rm_ids(conversations: list[dict], response: str, facts_text: str, tok: data.Tokenizer,
                 template: data.Template, rm_template: str, num_image_tokens: int, max_len: int,
                 record_id: str | None = None) -> list[int]:
    """BOS + "SYSTEM USER: <image>\\nQ ASSISTANT:" + response + </s> + rating request with facts.
    `conversations` ends with the user turn the response answers. max_len counts the image as ONE id
    (data.text_len; SPEC §9: the official RM's limit is 2048 text ids). Nothing is ever cut: when the whole
    does not fit, DataError names the record (record_id) and the lengths."""
    prefix = data.encode_text(template.render(conversations, add_generation_prompt=True), tok, num_image_tokens)
    resp = tok.encode(response)
    tail = [tok.eos_id] + data.encode_text(rm_template.format(facts=facts_text), tok, num_image_tokens, bos=False)
    ids = prefix + resp + tail
    n = data.text_len(ids)
    if n > max_len:
        who = f"id {record_id!r}: " if record_id is not None else ""
        raise data.DataError(f"{who}the reward-model input is {n} ids (prompt {data.text_len(prefix)} + response "
                             f"{len(resp)} + </s> and rating request {len(tail)}, the image counted as one), more "
                             f"than max_len {max_len}; the response is never cut")
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
    RM's size), paths and PIL images read and preprocessed here."""
    out = []
    for im in (x for x in images if x is not None):
        if not isinstance(im, torch.Tensor):
            im = data.image_tensor(im, image_size) if isinstance(im, str) else data.preprocess_image(im, image_size)
        elif im.shape[-1] != image_size:
            raise ValueError(f"image tensor of size {tuple(im.shape)}; the reward model expects {image_size} px")
        out.append(im)
    return torch.stack(out) if out else None


class RewardScorer:
    """Score (image, conversation, response, facts) items with a trained RM: batched, left padded, no_grad."""

    def __init__(self, m: M.LLaVA, adapter: str, head: M.ScalarHead, tok: data.Tokenizer,
                 system: str = data.VICUNA_V1_SYSTEM, rm_template: str = DEFAULT_TEMPLATE, max_len: int = 2048,
                 facts: str = "captions", seed: int = 0, batch_size: int = 8):
        self.rm = RewardModel(m, adapter, head)
        self.tok, self.template, self.rm_template = tok, data.Template(system=system), rm_template
        self.max_len, self.facts, self.seed, self.batch_size = max_len, facts, seed, batch_size

    @classmethod
    def load(cls, rm_dir: str, base: M.LLaVA | None = None, adapter_name: str = "reward", device="cpu",
             dtype: torch.dtype | None = None, **kw) -> "RewardScorer":
        """rm_dir holds adapter_model.safetensors + adapter_config.json (peft layout), head.safetensors and
        rm_config.json (base model folder, tokenizer, template). `base`: reuse an already-loaded base
        (PPO keeps policy, reference, value and reward adapters on one). The facts mode the RM was trained
        with (rm_config.json "facts": captions | none) is kept; a keyword given here wins over any saved value."""
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
        kw = {"system": meta["system"], "rm_template": meta["rm_template"], "max_len": meta["max_len"],
              "facts": meta.get("facts", "captions"), **kw}
        return cls(base, adapter_name, head, tok, **kw)

    def encode(self, item: dict, key: str = "") -> list[int]:
        """The RM's ids of one item; the facts' order is drawn from its id (as in training and PPO), else
        from `key` (score passes the item's position)."""
        rid = item.get("id")
        facts = (item.get("facts") or []) if self.facts != "none" else []
        return build_rm_ids(item["conversations"], item["response"],
                            format_facts(facts, self.seed, key if rid is None else rid), self.tok, self.template,
                            self.rm_template, self.rm.m.num_image_tokens, self.max_len,
                            record_id=(key or None) if rid is None else rid)

    @torch.no_grad()
    def score(self, items: list[dict]) -> list[float]:
        """items: {"image": a path, PIL image or preprocessed (3, S, S) tensor at the RM's size (what PPO
        passes: read once per rollout) or None, "conversations": turns ending with the user's, "response":
        str, "facts": list[str], "id"} -> one float each, batch_size items per forward."""
        m, S = self.rm.m, self.rm.m.config.image_size
        dev, was = next(m.parameters()).device, m.active_adapter
        out: list[float] = []
        for i in range(0, len(items), self.batch_size):
            chunk = items[i:i + self.batch_size]
            seqs = [self.encode(it, str(i + j)) for j, it in enumerate(chunk)]
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
    image_folder: str = ""
    captions: str = ""                  # JSON map image file -> list of captions (the facts)
    facts: str = "captions"             # captions (inline facts win when a record has them) | none
    template_file: str = ""             # rating request with a {facts} slot (default: DEFAULT_TEMPLATE)
    tokenizer: str = ""                 # default: model_path
    system: str = data.VICUNA_V1_SYSTEM
    max_len: int = 2048                 # prompt + response + rating request, the image counted as one id (SPEC §9)
    on_error: str = "raise"
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
    warmup_ratio: float = 0.03
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
    "tiny": dict(lr=1e-3, lora_r=16, lora_alpha=32.0, global_batch=32, micro_batch=16, epochs=2.0, eval_size=200,
                 eval_every=20, save_every=40, max_len=385, grad_clip=1.0),
    "llava-rlhf-7b": dict(lr=2e-5, global_batch=32, micro_batch=4, grad_clip=0.3, epochs=1.0, eval_every=25,
                          grad_ckpt=True, max_len=2048),
    "llava-rlhf-13b": dict(lr=2e-5, global_batch=32, micro_batch=2, grad_clip=0.3, epochs=1.0, eval_every=25,
                           grad_ckpt=True, max_len=2048),
}


class PairData(data._ServeOrSkip):
    """Preference pairs -> tokenised (ids_1, ids_2, image, preference), facts shuffled per (seed, id, epoch).
    Lengths are checked up front (with the first epoch's facts order): a pair whose prompt + response +
    rating request exceeds max_len (the image counted as one id; a response is never cut) raises DataError
    naming the record, or with on_error="skip" is dropped and counted in `skipped` and the Skips. An image
    that cannot be read raises DataError naming the file, record and image when the pair is served, or with
    on_error="skip" is counted and the next pair served instead (as SFTDataset does: batch shapes stay)."""

    def __init__(self, records, tok, template, rm_template, captions, facts_mode, image_folder, image_size,
                 n_img, max_len, seed, on_error: str = "raise", skips: data.Skips | None = None):
        super().__init__(image_folder, image_size, on_error, skips)
        self.tok, self.template, self.rm_template = tok, template, rm_template
        self.captions, self.facts_mode = captions, facts_mode
        self.n_img, self.max_len, self.seed = n_img, max_len, seed
        self.epoch = 0
        self.records, self.keys, self.skipped = [], [], 0
        for i, rec in enumerate(records):
            try:
                self._ids(rec, rec.get("id", i))
            except data.DataError as e:
                e = e.at(rec.get("source"), rec.get("index", i))
                if on_error == "raise":
                    raise e from None
                self.skips.add(str(e), rec.get("index", i))
                self.skipped += 1
                continue
            self.records.append(rec)
            self.keys.append(rec.get("id", i))
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
        facts = []
        if self.facts_mode != "none":
            facts = list(rec.get("facts") or self.captions.get(rec.get("image") or "", []))
        ft = format_facts(facts, self.seed, f"{key}:{self.epoch}")
        return [build_rm_ids(conv, rec[f"output_{k}"]["value"], ft, self.tok, self.template, self.rm_template,
                             self.n_img if rec.get("image") else 0, self.max_len, record_id=str(key)) for k in (1, 2)]

    def _item(self, i: int) -> dict:
        rec = self.records[i]
        return {"ids": self._ids(rec, self.keys[i]), "image": self._image(rec), "preference": int(rec["preference"])}


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
    """Held-out pairwise accuracy and mean margin (summed over ranks)."""
    rm.eval()
    stats = torch.zeros(3)  # correct, margin sum, count
    with torch.no_grad():
        for i in range(0, len(indices), batch):
            b = collate_pairs([pdata[j] for j in indices[i:i + batch]], pad_id)
            _, st = pair_loss(rm, b, device)
            stats += torch.tensor([float(st["correct"].sum()), float(st["margin"].sum()), len(b["preference"])])
    stats = common.all_reduce_sum(stats)
    rm.train()
    n = max(1.0, float(stats[2]))
    return {"accuracy": float(stats[0]) / n, "margin": float(stats[1]) / n, "n": int(stats[2])}


def save_rm(out: str, rm: RewardModel, cfg: Config, rm_template: str, tok_path: str, extra: dict) -> None:
    """Adapter (peft layout) + head + rm_config.json, written to a temp folder and renamed."""
    from safetensors.torch import save_file
    meta = {"model_path": os.path.abspath(cfg.model_path), "vision_tower": cfg.vision_tower,
            "tokenizer": os.path.abspath(tok_path), "system": cfg.system, "rm_template": rm_template,
            "max_len": cfg.max_len, "facts": cfg.facts, **extra}

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
        nonneg=("eval_size", "weight_decay", "max_steps", "grad_clip", "center_coef", "save_every", "keep_last",
                "stop_at_step"),
        fractions=("warmup_ratio", "min_lr_ratio", "lora_dropout"),
        choices={"facts": ("captions", "none"), "on_error": ("raise", "skip"), "dtype": ("auto", *M.DTYPES),
                 "logger": ("none", "wandb", "tensorboard")},
        files=("data_path", "eval_data_path", "captions", "template_file"),
        dirs=("image_folder", "model_path", "vision_tower"), out_dirs=("out_dir",), device="device")
    if not cfg.lora_targets.strip(","):
        raise common.ConfigError(f"--lora_targets names no module, got {cfg.lora_targets!r}")
    common.check_tokenizer(cfg)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        return eval_main(argv[1:])
    cfg = common.parse_config(Config, argv, PRESETS)
    validate(cfg)
    d = common.start_run(cfg)
    accum = common.accumulation(cfg.global_batch, cfg.micro_batch, d.world)   # the geometry, before any load

    tok = data.Tokenizer(cfg.tokenizer or cfg.model_path)
    template = data.Template(system=cfg.system)
    rm_template = open(cfg.template_file).read() if cfg.template_file else DEFAULT_TEMPLATE
    if rm_template.count("{facts}") != 1:
        raise common.ConfigError(f"the reward template must contain one {{facts}} slot ({cfg.template_file or 'default'})")
    captions = data.load_captions(cfg.captions)
    skips = data.Skips()
    records = data.read_preferences(cfg.data_path, on_error=cfg.on_error, skips=skips)
    if cfg.eval_data_path:
        eval_records = data.read_preferences(cfg.eval_data_path, on_error=cfg.on_error, skips=skips)
    else:
        eval_records, records = records[:cfg.eval_size], records[cfg.eval_size:]

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

    pdata, edata = (PairData(recs, tok, template, rm_template, captions, cfg.facts, cfg.image_folder,
                             m.config.image_size, m.num_image_tokens, cfg.max_len, cfg.seed, cfg.on_error, skips)
                    for recs in (records, eval_records))
    eval_idx = list(range(d.rank, len(edata), d.world))

    steps_per_epoch = len(pdata) // cfg.global_batch
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(pdata)} pairs is fewer than one global batch ({cfg.global_batch})", cfg.data_path)
    total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    warmup = int(cfg.warmup_ratio * total_steps)
    sampler = data.ResumableSampler(len(pdata), rank=d.rank, world_size=d.world, seed=cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    watch = common.Divergence(cfg.out_dir, cfg.divergence_check)
    ck = common.Checkpointer(cfg, rm, opt, sampler, watch=watch)
    step, best = 0, -1.0                  # best: the held-out accuracy of out_dir/best
    if state := ck.start():   # as --resume says: fresh, resumed, or refused
        step, best = state["step"], state["best"]
    pdata.epoch = sampler.epoch

    logger = common.MetricsLogger(cfg.out_dir, cfg.logger, "rm", asdict(cfg))
    bar = common.Progress(total_steps, "reward model", start=step, enabled=cfg.progress)

    ev = None                              # the last held-out evaluation in this process
    if step >= total_steps and common.is_main():
        print(f"already at step {step} of {total_steps}: nothing left to train; writing the final model")
    while step < total_steps:
        lr = common.cosine_lr(step, total_steps, warmup, cfg.lr, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        tot = torch.zeros(3)
        for _ in range(accum):
            idx = sampler.take(cfg.micro_batch)
            pdata.epoch = sampler.epoch  # the facts' order is reshuffled every epoch
            b = collate_pairs([pdata[i] for i in idx], tok.pad_id)
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
                    save_rm(os.path.join(cfg.out_dir, "best"), rm, cfg, rm_template, tok.path,
                            {"step": step, "eval_accuracy": best, "n_eval": len(edata)})
        logger.log(step, metrics)
        shown = {"eval_acc": ev["accuracy"]} if "eval_accuracy" in metrics else {}
        bar.update(1, loss=loss_val, acc=metrics["train_accuracy"], **shown)
        if ck.after_step(step, best=best):   # saved every save_every steps; a signal or stop_at_step: stop
            common.cleanup_distributed()
            return {"step": step, "stopped": True}
    bar.close()
    ck.finish(step, best=best)
    if ev is None and len(edata):   # no step ran here (a resume at the last step): the final model measured once
        ev = evaluate_pairs(rm, edata, eval_idx, cfg.micro_batch, tok.pad_id, d.device)
    final_acc = ev["accuracy"] if ev is not None else None   # None (JSON null): no held-out pairs
    if common.is_main():
        save_rm(os.path.join(cfg.out_dir, "final"), rm, cfg, rm_template, tok.path,
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
    seed: int = 0
    device: str = "auto"
    out: str = ""                       # optional JSON file for the table


def read_rm_config(rm_dir: str) -> dict:
    """rm_dir/rm_config.json, what save_rm wrote: ModelError naming the file when it lacks a field the
    reward model is rebuilt from."""
    path = os.path.join(rm_dir, "rm_config.json")
    meta = data.load_json(path)
    lacks = [k for k in ("model_path", "tokenizer", "system", "rm_template", "max_len") if k not in meta] \
        if isinstance(meta, dict) else None
    if lacks is None or lacks:
        raise ModelError(f"{path}: not a reward model's config (lacks {lacks or 'everything'})")
    return meta


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
        pd = PairData(records, scorer.tok, scorer.template, scorer.rm_template, captions, mode, cfg.image_folder,
                      m.config.image_size, m.num_image_tokens, scorer.max_len, cfg.seed)
        rows[mode] = evaluate_pairs(scorer.rm, pd, list(range(len(pd))), cfg.batch, scorer.tok.pad_id, dev)
    print(f"reward model {cfg.rm_dir} on {cfg.data_path} ({len(records)} pairs)")
    print(f"{'facts':<10}{'accuracy':>10}{'margin':>10}")
    for mode, r in rows.items():
        print(f"{'with' if mode == 'captions' else 'without':<10}{r['accuracy']:>10.3f}{r['margin']:>10.3f}")
    if cfg.out:
        common.atomic_write_text(json.dumps(rows, indent=2), cfg.out)
    return rows


if __name__ == "__main__":
    common.run_cli(main)
