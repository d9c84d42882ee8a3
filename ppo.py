"""Fact-RLHF: PPO with a learned critic (GAE) for LLaVA (SPEC §5).

Four roles on one frozen base, as LoRA adapters: policy (trainable, from the RL-init adapter), reference
(the frozen initial policy), value (trainable, from the reward model's adapter, + a fresh zero-initialised
head) and reward (frozen, the Fact-RM). Each PPO step: sample responses, score them (RM with facts +
symbolic terms), shape per-token rewards with a KL penalty, GAE, then clipped policy and value updates.

Tiny world:
    python ppo.py --preset tiny --model_path runs/sft/final --rm_dir runs/rm/best \
        --prompts_path tiny_out/ppo_prompts.json --image_folder tiny_out/images \
        --captions tiny_out/captions.json --out_dir runs/ppo
7B policy on 8 GPUs (the paper's constants are the defaults):
    torchrun --nproc_per_node=8 ppo.py --preset llava-rlhf-7b --model_path runs/sft7b/final \
        --policy_adapter runs/rlinit7b/final_adapter --rm_dir runs/rm7b/best \
        --prompts_path ppo_prompts.json --image_folder coco/train2017 --captions coco_captions.json
The paper's 13B RM and critic beside a 7B policy: add --rm_base_path runs/sft13b_336/final --rm_dir runs/rm13b/best
(one tokenizer for both bases; the second base's image tokens and image size are its own).
Resume: add --resume true (SIGTERM/SIGINT write a checkpoint first).
Peak memory per GPU of one rollout + update at full size, before paying for GPUs (no weights, CPU, ~1 min):
    python ppo.py rehearse --preset llava-rlhf-7b --rm_base_path preset:llava-rlhf-13b --ranks 8
(--model_path / --rm_base_path may name folders: only their config.json is read.)
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, asdict
from typing import Callable

import torch
import torch.distributed as dist

import common
import data
import kernels
import model as M
import reward_model as RM


# ----------------------------------------------------------------------------------------------------
# The math. All tensors (B, T) over response tokens; mask 1.0 on real tokens (right padded).

def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. The value after the last real token is 0 (the episode ends).
    -> advantages, returns (= advantages + values), both 0 where mask is 0."""
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_v = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_m = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_v * next_m - values[:, t]
        last = delta + gamma * lam * last * next_m
        adv[:, t] = last * mask[:, t]
        next_v, next_m = values[:, t], mask[:, t]
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, across_ranks: bool = True) -> torch.Tensor:
    """(x - mean) / std over real tokens (of all ranks when distributed), eps 1e-8; 0 on padding.
    shift_mean=False keeps the mean (rescales only)."""
    mask = mask.to(x.dtype)
    stats = torch.stack([masked_sum(x, mask), masked_sum(x * x, mask), mask.sum()]).double()
    if across_ranks and dist.is_initialized():
        stats = common.all_reduce_sum(stats)
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    var = (stats[1] / n - mean * mean).clamp(min=0)
    var = var * n / (n - 1).clamp(min=1)  # unbiased, as torch.var
    out = (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + 1e-8)
    if not shift_mean:
        out = out + mean.to(x.dtype)
    return out * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: masked mean of max(-A r, -A clip(r, 1-clip, 1+clip)), r = exp(logp - old_logp)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(l1, l2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((l2 > l1).to(logp.dtype), mask),          # 0-d tensors
                 "approx_kl": 0.5 * masked_mean((logp - old_logp) ** 2, mask)}
    return loss, stats


def value_loss(v: torch.Tensor, old_v: torch.Tensor, ret: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """0.5 * masked mean of max((v - R)^2, (old_v + clip(v - old_v, -clip, clip) - R)^2)."""
    mask = mask.to(v.dtype)
    v_clipped = old_v + (v - old_v).clamp(-clip, clip)
    e1, e2 = (v - ret) ** 2, (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(e1, e2), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((e2 > e1).to(v.dtype), mask)}
    return loss, stats


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1", clamp: bool = True) -> torch.Tensor:
    """k1: logp - ref_logp (clamped at 0 by default, as the paper); k3: exp(ref-logp) - (ref-logp) - 1 >= 0."""
    if estimator == "k1":
        kl = logp - ref_logp
        return kl.clamp(min=0) if clamp else kl
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded mask -> (B,) index of the last real token (0 for an empty row)."""
    return (mask.sum(-1).long() - 1).clamp(min=0)


def shaped_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float = 0.1, estimator: str = "k1", clamp: bool = True) -> tuple[torch.Tensor, dict]:
    """Per-token rewards: -kl_coef * KL(token) everywhere, + score (B,) on the last real response token."""
    mask = mask.to(logp.dtype)
    kl = kl_per_token(logp, ref_logp, estimator, clamp) * mask                # (B, T)
    r = -kl_coef * kl
    idx = last_real_index(mask)
    has = mask.sum(-1) > 0
    r[torch.arange(r.shape[0], device=r.device), idx] += torch.where(has, score.to(r.dtype), torch.zeros_like(score, dtype=r.dtype))
    return r * mask, {"kl": kl.sum(-1)}


def symbolic_rewards(texts: list[str], has_eos: list[bool], lengths: list[int], records: list[dict],
                     no_eos_penalty: float = -8.0, length_penalty: float = -10.0, length_budget: int = 896,
                     correct_scale: float = 2.0, mc_reward: float = 1.0, yesno_reward: float = 0.5) -> dict[str, torch.Tensor]:
    """The paper's rule-based terms (SPEC §5), each (B,): no EOS, length, correctness (multiple choice by
    its letter, yes/no for questions whose truth is "no")."""
    import re
    no_eos = torch.tensor([0.0 if e else no_eos_penalty for e in has_eos])
    length = torch.tensor([length_penalty * (n / length_budget) * float(rec.get("length_multiplier", 1.0))
                           for n, rec in zip(lengths, records)])
    correct = []
    for text, rec in zip(texts, records):
        t, kind, ans = text.strip(), rec.get("answer_type", "general"), (rec.get("answer") or "").strip()
        c = 0.0
        if kind == "multiple_choice" and ans:
            letter = ans[0].upper()
            if re.match(rf"^\(?{letter}[.)]", t) or f"correct option is {letter}." in t.lower().replace(
                    f"correct option is {letter.lower()}.", f"correct option is {letter}."):
                c = mc_reward
        elif kind == "yes_no" and ans.lower() == "no":
            low = t.lower()
            c = yesno_reward if low.startswith("no") else (-yesno_reward if low.startswith("yes") else 0.0)
        correct.append(correct_scale * c)
    return {"no_eos": no_eos, "length": length, "correct": torch.tensor(correct)}


class AdaptiveKL:
    """Ziegler et al.'s controller: nudges the coefficient so the observed KL tracks `target`."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> None:
        err = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + err * n / self.horizon


def ppo_lr(step: int, total: int, warmup: int, base: float, min_ratio: float = 0.0) -> float:
    """Learning rate of PPO step `step` (0-based rollout batch; every optimizer step within it uses this
    lr): the official schedule (SPEC §9), transformers' get_cosine_schedule_with_warmup stepped once per
    rollout batch. Factor step / warmup for step < warmup (0 at the first step), then cosine from 1 down
    to min_ratio over the remaining total - warmup steps (common.cosine_lr's decay; only the warm-up,
    which starts at 0 rather than 1 / warmup, differs)."""
    if step < warmup:
        return base * step / warmup
    return common.cosine_lr(step, total, warmup, base, min_ratio)


# ----------------------------------------------------------------------------------------------------
# Config

@dataclass
class Config:
    preset: str = ""                     # a named set of defaults (PRESETS below); later flags override it
    # data
    prompts_path: str = ""              # PPO prompts (data.read_ppo_prompts format)
    image_folder: str = ""
    captions: str = ""                  # image -> captions map: the facts the RM sees
    tokenizer: str = ""                 # default: model_path
    system: str = data.VICUNA_V1_SYSTEM
    max_prompt_len: int = 128           # prompt ids, the image counted as one (SPEC §9)
    on_error: str = "raise"
    # models
    model_path: str = ""                # the SFT model folder: the frozen base of every adapter
    vision_tower: str = ""
    policy_adapter: str = ""            # RL-init adapter folder (peft layout); empty: a fresh LoRA
    rm_dir: str = ""                    # trained Fact-RM (reward_model.py output)
    rm_base_path: str = ""              # a second (larger) base for the RM and value; empty: the policy base
    dtype: str = "auto"
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    grad_ckpt: bool = False             # recompute each decoder layer in backward (policy and value updates):
    #                                     activation memory of one layer instead of all, ~1/3 more compute
    # rollout
    rollout_batch: int = 512            # prompts per PPO step, all ranks
    step_batch: int = 256               # rollouts per optimizer step, all ranks
    micro_batch: int = 8                # rows per forward per rank
    ppo_epochs: int = 2                 # passes over each rollout batch
    max_new_tokens: int = 896
    temperature: float = 1.0
    top_p: float = 1.0
    compile: bool = False               # rollouts through the compiled decode step (static KV cache); on CPU
    #                                     also generation and scoring through oneDNN prepacked linears
    # reward
    no_eos_penalty: float = -8.0
    length_penalty: float = -10.0       # x (response tokens / length_budget) x the item's length multiplier
    length_budget: int = 896
    correct_scale: float = 2.0
    mc_reward: float = 1.0
    yesno_reward: float = 0.5
    kl_coef: float = 0.1
    kl_estimator: str = "k1"            # k1 | k3
    kl_clamp: bool = True               # clamp k1 at 0, as the paper
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    reward_scale: float = 10.0          # the reference multiplies shaped rewards by 10 ...
    whiten_rewards: bool = False        # ... instead of whitening them
    reward_clip: float = 0.0            # > 0: clip the sequence score to +-this (peers use 5 or 10)
    # ppo
    gamma: float = 1.0
    lam: float = 1.0
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    lr: float = 3e-5
    warmup_steps: int = 5
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    epochs: float = 4.0                 # passes over the prompt set
    max_steps: int = 0                  # PPO steps (rollout batches); > 0 overrides epochs
    toy_reward: str = ""                # "contains:WORD": reward 1 for responses containing WORD, no RM
                                        # (a sanity check of the PPO loop on its own)
    # run
    out_dir: str = "runs/ppo"
    seed: int = 0
    device: str = "auto"
    save_every: int = 10
    keep_last: int = 2
    resume: bool = False
    stop_at_step: int = 0
    max_bad_steps: int = 3              # stop after this many non-finite steps in a row
    samples_to_log: int = 2
    logger: str = "none"
    progress: bool = True


PRESETS = {
    "tiny": dict(rollout_batch=64, step_batch=32, micro_batch=32, max_new_tokens=48, length_budget=48,
                 lora_r=16, lora_alpha=32.0, lr=3e-4, warmup_steps=2, max_steps=30, save_every=10,
                 max_prompt_len=97, length_penalty=-1.0, no_eos_penalty=-4.0, reward_scale=1.0),
    "llava-rlhf-7b": dict(micro_batch=8, grad_ckpt=True),
    "llava-rlhf-13b": dict(micro_batch=4, grad_ckpt=True),
}


# ----------------------------------------------------------------------------------------------------
# Rollout and scoring

def response_mask(resp: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """resp (B, R) padded after EOS -> mask (B, R) float, 1 up to and including EOS; has_eos (B,) bool."""
    is_eos = resp == eos_id
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0         # an EOS strictly earlier
    return (~seen_before).float(), is_eos.any(-1)


def forward_response(m: M.LLaVA, adapter: str | None, ids: torch.Tensor, images, mask: torch.Tensor,
                     P: int) -> torch.Tensor:
    """Hidden states (B, R, D) that predict each response token: positions P-1 .. P+R-2 of prompt+response."""
    m.set_adapter(adapter)
    h = m.hidden_states(ids, images, mask)
    return h[:, P - 1:-1]


def value_inputs(full: torch.Tensor, fmask: torch.Tensor, P: int, n_from: int,
                 n_to: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Policy ids -> the value/reward base's ids when the bases differ in image tokens per image (e.g. a
    336 px RM beside a 224 px policy): each prompt's run of n_from IMAGE_TOKEN_INDEX becomes n_to, prompts
    are left-padded again to a common length P', the responses are untouched. -> (ids, mask, P')."""
    if n_from == n_to:
        return full, fmask, P
    prompts = []
    for row, m in zip(full[:, :P].tolist(), fmask[:, :P].tolist()):
        toks = [t for t, k in zip(row, m) if k]
        if M.IMAGE_TOKEN_INDEX in toks:
            i = toks.index(M.IMAGE_TOKEN_INDEX)
            if toks[i:i + n_from] != [M.IMAGE_TOKEN_INDEX] * n_from:
                raise ValueError(f"a prompt holds a run of image tokens that is not {n_from} long")
            toks = toks[:i] + [M.IMAGE_TOKEN_INDEX] * n_to + toks[i + n_from:]
        prompts.append(toks)
    P2 = max(len(t) for t in prompts)
    ids = torch.tensor([[0] * (P2 - len(t)) + t for t in prompts], dtype=full.dtype, device=full.device)  # (B, P')
    pm = torch.tensor([[0] * (P2 - len(t)) + [1] * len(t) for t in prompts], dtype=fmask.dtype, device=fmask.device)
    return torch.cat([ids, full[:, P:]], 1), torch.cat([pm, fmask[:, P:]], 1), P2


@dataclass
class Models:
    policy_base: M.LLaVA                # adapters "policy" (trainable) and "ref" (frozen) or None
    ref_adapter: str | None
    value_base: M.LLaVA                 # adapters "value" (trainable) and "reward" (frozen)
    value_head: M.ScalarHead
    scorer: RM.RewardScorer | None

    def trainable(self) -> list[torch.nn.Parameter]:
        ps = self.policy_base.adapter_parameters("policy") + self.value_base.adapter_parameters("value")
        return ps + list(self.value_head.parameters())


def build_models(cfg: Config, device: torch.device) -> tuple[Models, data.Tokenizer]:
    base = common.load_model(cfg.model_path, cfg.vision_tower, "", 0, cfg.dtype, device)
    base.requires_grad_(False)
    tok = data.Tokenizer(cfg.tokenizer or cfg.model_path)
    torch.manual_seed(cfg.seed)
    if cfg.policy_adapter:
        base.load_adapter(cfg.policy_adapter, "policy", trainable=True)
        base.load_adapter(cfg.policy_adapter, "ref")
        ref = "ref"
    else:
        base.add_adapter("policy", r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets.split(",")))
        ref = None  # a fresh adapter is a no-op: the bare base is the reference
    for p in base.adapter_parameters("policy"):
        p.requires_grad_(True)
    vbase = base
    if cfg.rm_base_path:
        vbase = common.load_model(cfg.rm_base_path, "", "", 0, cfg.dtype, device)
        vbase.requires_grad_(False)
    scorer = None
    if cfg.rm_dir:
        scorer = RM.RewardScorer.load(cfg.rm_dir, base=vbase, adapter_name="reward", seed=cfg.seed)
        vbase.load_adapter(cfg.rm_dir, "value", trainable=True)   # the critic starts from the RM adapter
        if vbase is not base and scorer.tok.sp.serialized_model_proto() != tok.sp.serialized_model_proto():
            # the critic reads the policy's token ids, so both bases must share one tokenizer
            raise common.ConfigError(f"the reward model's tokenizer ({scorer.tok.path}) differs from the "
                                     f"policy's ({tok.path}); --rm_base_path needs one tokenizer for both")
    else:
        vbase.add_adapter("value", r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets.split(",")))
        for p in vbase.adapter_parameters("value"):
            p.requires_grad_(True)
    w = next(vbase.parameters())
    head = M.ScalarHead(vbase.config.hidden, zero_init=True).to(device=w.device, dtype=w.dtype)
    return Models(base, ref, vbase, head, scorer), tok


def logprob_temperature(cfg: Config) -> float:
    """The temperature log-probs (PPO ratio, KL, entropy) divide logits by: the sampling temperature, as
    the official code (SPEC §9); 1.0 for greedy sampling (temperature 0)."""
    return cfg.temperature if cfg.temperature > 0 else 1.0


@torch.no_grad()
def rollout(models: Models, tok: data.Tokenizer, batch: dict, records: list[dict], cfg: Config,
            gen: torch.Generator, reward_fn: Callable | None) -> dict:
    """Sample responses for one micro-batch of prompts and compute everything the update needs."""
    dev = next(models.policy_base.parameters()).device
    pb = models.policy_base
    ids, pmask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    images = batch["images"].to(dev) if batch["images"] is not None else None
    t0 = time.time()
    pb.set_adapter("policy")
    resp = pb.generate(ids, images, pmask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       top_p=cfg.top_p, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, generator=gen,
                       compile=cfg.compile)                                 # (B, R)
    t_gen = time.time() - t0
    t0 = time.time()
    rmask, has_eos = response_mask(resp, tok.eos_id)
    P = ids.shape[1]
    full = torch.cat([ids, resp], dim=1)                                    # (B, P+R)
    fmask = torch.cat([pmask, rmask.long()], dim=1)
    vb = models.value_base
    v_images = images if vb is pb else _reprocess(batch, records, vb.config.image_size, cfg)
    vin = value_inputs(full, fmask, P, pb.num_image_tokens, vb.num_image_tokens)
    logp, ref_logp, values = score_passes(models, full, fmask, P, images, vin, v_images, cfg)

    lengths = rmask.sum(-1).long().tolist()
    texts = [tok.decode([t for t in row[:n] if t != tok.eos_id]) for row, n in zip(resp.tolist(), lengths)]
    recs = [records[i] for i in batch["index"].tolist()]
    if reward_fn is not None:
        score = torch.as_tensor(reward_fn(recs, texts, resp.cpu(), rmask.cpu()), dtype=torch.float32)
    else:
        # images exist only for the rows that have one: map each row to its image
        row_images, n = [], 0
        for rec in recs:
            row_images.append(v_images[n] if rec.get("image") else None)
            n += bool(rec.get("image"))
        items = [{"image": img, "response": text, "facts": rec.get("facts") or [], "id": str(rec.get("id", k)),
                  "conversations": [{"from": "human", "value": ("<image>\n" if rec.get("image") else "") + rec["question"]}]}
                 for k, (rec, text, img) in enumerate(zip(recs, texts, row_images))]
        score = torch.tensor(_score_with_images(models.scorer, items), dtype=torch.float32)
    sym = symbolic_rewards(texts, has_eos.tolist(), lengths, recs, cfg.no_eos_penalty, cfg.length_penalty,
                           cfg.length_budget, cfg.correct_scale, cfg.mc_reward, cfg.yesno_reward)
    total = score + sym["no_eos"] + sym["length"] + sym["correct"]
    if cfg.reward_clip > 0:
        total = total.clamp(-cfg.reward_clip, cfg.reward_clip)
    t_score = time.time() - t0
    return {"full": full.cpu(), "fmask": fmask.cpu(), "P": P, "resp": resp.cpu(), "rmask": rmask.cpu(),
            "images": None if images is None else images.cpu(),
            "v_images": None if v_images is None else v_images.cpu(),
            "logp": logp.cpu(), "ref_logp": ref_logp.cpu(), "values": values.cpu(), "score": total,
            "rm_score": score, **{f"sym_{k}": v for k, v in sym.items()}, "has_eos": has_eos.cpu(),
            "texts": texts, "questions": [r["question"] for r in recs], "t_gen": t_gen, "t_score": t_score,
            "record_ids": [str(r.get("id", k)) for k, r in enumerate(recs)], "image_files": [r.get("image") for r in recs]}


@torch.no_grad()
def score_passes(models: Models, full: torch.Tensor, fmask: torch.Tensor, P: int, images: torch.Tensor | None,
                 vin: tuple[torch.Tensor, torch.Tensor, int], v_images: torch.Tensor | None,
                 cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The no-grad passes over prompt + response (B, P+R): log-probs of the sampled tokens under the
    policy and the reference (at the sampling temperature, as they were drawn) and the critic's values;
    vin = value_inputs(...), the same ids for the value base. -> three (B, R) fp32 tensors."""
    pb, vb = models.policy_base, models.value_base
    resp, temp = full[:, P:], logprob_temperature(cfg)
    h = forward_response(pb, "policy", full, images, fmask, P)
    logp = M.token_logprobs(h, pb.lm_head.weight, resp, temperature=temp)   # (B, R)
    h = forward_response(pb, models.ref_adapter, full, images, fmask, P)
    ref_logp = M.token_logprobs(h, pb.lm_head.weight, resp, temperature=temp)
    vfull, vmask, vP = vin
    values = models.value_head(forward_response(vb, "value", vfull, v_images, vmask, vP)).float()
    return logp, ref_logp, values


def _score_with_images(scorer: RM.RewardScorer, items: list[dict]) -> list[float]:
    """The RM scorer on items whose images are already preprocessed tensors at the RM's size."""
    seqs = [scorer.encode(it) for it in items]
    imgs = [it["image"] for it in items if it["image"] is not None]
    out = []
    bs = scorer.batch_size
    k = 0
    for i in range(0, len(items), bs):
        chunk = items[i:i + bs]
        n = sum(it["image"] is not None for it in chunk)
        im = torch.stack(imgs[k:k + n]) if n else None
        k += n
        out += scorer.score_ids(seqs[i:i + bs], im).tolist()
    return out


def _reprocess(batch: dict, records: list[dict], size: int, cfg: Config) -> torch.Tensor | None:
    """The value/reward base sees its own image size when it differs from the policy's."""
    ims = []
    for i in batch["index"].tolist():
        rec = records[i]
        if rec.get("image"):
            ims.append(data.preprocess_image(data.load_image(os.path.join(cfg.image_folder, rec["image"])), size))
    return torch.stack(ims) if ims else None


def pad_cat(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
    """Concatenate (b_i, T_i) tensors along the batch, padding T on the right to the max."""
    T = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = T - t.shape[1]
        if pad:
            fill = torch.full((t.shape[0], pad), value, dtype=t.dtype)
            t = torch.cat([t, fill], 1)
        out.append(t)
    return torch.cat(out)


def merge_rollouts(parts: list[dict]) -> dict:
    """Micro-batch rollouts -> one batch; prompts re-left-padded, responses re-right-padded."""
    out = {}
    P = max(p["P"] for p in parts)
    fulls, fmasks = [], []
    R = max(p["resp"].shape[1] for p in parts)
    for p in parts:
        pr, pm = p["full"][:, :p["P"]], p["fmask"][:, :p["P"]]
        rs, rm = p["full"][:, p["P"]:], p["fmask"][:, p["P"]:]
        padP, padR = P - p["P"], R - rs.shape[1]
        fulls.append(torch.cat([torch.zeros(pr.shape[0], padP, dtype=pr.dtype), pr, rs,
                                torch.zeros(pr.shape[0], padR, dtype=pr.dtype)], 1))
        fmasks.append(torch.cat([torch.zeros(pm.shape[0], padP, dtype=pm.dtype), pm, rm,
                                 torch.zeros(pm.shape[0], padR, dtype=pm.dtype)], 1))
    out["full"], out["fmask"], out["P"] = torch.cat(fulls), torch.cat(fmasks), P
    for k in ("resp", "rmask", "logp", "ref_logp", "values"):
        out[k] = pad_cat([p[k] for p in parts], 0)
    for k in ("images", "v_images"):
        ims = [p[k] for p in parts if p[k] is not None]
        out[k] = torch.cat(ims) if ims else None
    for k in ("score", "rm_score", "sym_no_eos", "sym_length", "sym_correct", "has_eos"):
        out[k] = torch.cat([p[k] for p in parts])
    out["texts"] = sum((p["texts"] for p in parts), [])
    for k in ("questions", "record_ids", "image_files"):
        out[k] = sum((p[k] for p in parts), [])
    out["img_rows"] = torch.cat([(p["full"][:, :p["P"]] == M.IMAGE_TOKEN_INDEX).any(-1) for p in parts])
    out["t_gen"] = sum(p["t_gen"] for p in parts)
    out["t_score"] = sum(p["t_score"] for p in parts)
    return out


def select_rows(ro: dict, rows: torch.Tensor, key: str) -> torch.Tensor | None:
    """Images of the selected rows (images exist only for rows with image tokens)."""
    if ro[key] is None:
        return None
    img_index = torch.cumsum(ro["img_rows"].long(), 0) - 1
    keep = [int(img_index[r]) for r in rows.tolist() if bool(ro["img_rows"][r])]
    return ro[key][keep] if keep else None


# ----------------------------------------------------------------------------------------------------
# Training loop

def toy_reward_fn(spec: str) -> Callable:
    """--toy_reward contains:WORD -> reward_fn giving 1.0 to responses that contain WORD (any case)."""
    kind, _, word = spec.partition(":")
    if kind != "contains" or not word:
        raise common.ConfigError(f"--toy_reward must look like contains:WORD, got {spec!r}")
    return lambda recs, texts, resp, mask: torch.tensor([float(word.lower() in t.lower()) for t in texts])


def check_rm_budget(cfg: Config, records: list[dict]) -> int:
    """Before any model loads: refuse (ConfigError) a run whose reward-model inputs can exceed the RM's
    max_len, since reward_model.build_rm_ids never cuts a response and would stop the run mid-way. For
    every prompt of `records` (read_ppo_prompts) that PromptDataset keeps (max_prompt_len, the image
    counted as one id), the RM input as
    rollout() builds it (the RM's tokenizer, system sentence, rating request, facts mode and the facts'
    order for this seed and id) plus max_new_tokens response ids, the image counted as one.
    -> the longest input before the response. (The RM re-encodes the decoded response text: for normal text
    that is at most the generated ids; byte-level garbage can re-encode longer and still stops the run.)"""
    path = os.path.join(cfg.rm_dir, "rm_config.json")
    if not os.path.isfile(path):
        raise common.ConfigError(f"--rm_dir {cfg.rm_dir}: no rm_config.json (not a reward_model.py output folder)")
    meta = json.load(open(path))
    tok, rm_tok = data.Tokenizer(cfg.tokenizer or cfg.model_path), data.Tokenizer(meta["tokenizer"])
    if cfg.rm_base_path and rm_tok.sp.serialized_model_proto() != tok.sp.serialized_model_proto():
        return 0  # build_models refuses a second base with another tokenizer
    template, rm_template = data.Template(system=cfg.system), data.Template(system=meta["system"])
    worst, worst_id = 0, None
    for rec in records:
        has_image = rec.get("image") is not None
        prompt = data.tokenize_prompt(rec["question"], tok, template, 1, has_image=has_image)
        if data.text_len(prompt) > cfg.max_prompt_len:
            continue                                         # PromptDataset drops it
        facts = (rec.get("facts") or []) if meta.get("facts", "captions") != "none" else []
        conv = [{"from": "human", "value": ("<image>\n" if has_image else "") + rec["question"]}]
        ids = RM.build_rm_ids(conv, "", RM.format_facts(facts, cfg.seed, str(rec["id"])), rm_tok, rm_template,
                              meta["rm_template"], 1, 1 << 30)
        if data.text_len(ids) > worst:
            worst, worst_id = data.text_len(ids), rec["id"]
    if worst + cfg.max_new_tokens > meta["max_len"]:
        raise common.ConfigError(
            f"the reward model's max_len {meta['max_len']} ({path}; the image counted as one id) is too small: "
            f"prompt {worst_id!r} of {cfg.prompts_path} with its facts and the rating request is {worst} ids, "
            f"+ --max_new_tokens {cfg.max_new_tokens} = {worst + cfg.max_new_tokens}, and the RM never cuts a "
            f"response; lower --max_new_tokens or --max_prompt_len, or use an RM trained with a larger max_len")
    return worst


def main(argv: list[str] | None = None, reward_fn: Callable | None = None) -> dict:
    """reward_fn(records, texts, resp_ids, resp_mask) -> (B,) replaces the reward model (tests, toy tasks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rehearse"]:      # this stage at full size on fake tensors: peak memory per GPU
        import rehearse
        return rehearse.main(["--stage", "ppo"] + argv[1:])
    cfg = common.parse_config(Config, argv, PRESETS)
    if cfg.toy_reward and reward_fn is None:
        reward_fn = toy_reward_fn(cfg.toy_reward)
    d = common.start_run(cfg)
    for name, total in (("rollout_batch", cfg.rollout_batch), ("step_batch", cfg.step_batch)):
        if total % (d.world * cfg.micro_batch):
            raise common.ConfigError(f"--{name} {total} must be a multiple of micro_batch x ranks = "
                                     f"{cfg.micro_batch} x {d.world}")
    if cfg.rollout_batch % cfg.step_batch:
        raise common.ConfigError(f"--rollout_batch {cfg.rollout_batch} must be a multiple of --step_batch {cfg.step_batch}")
    if not cfg.rm_dir and reward_fn is None:
        raise common.ConfigError("give --rm_dir (a trained reward model) or --toy_reward contains:WORD")
    skips = data.Skips()
    records = data.read_ppo_prompts(cfg.prompts_path, captions=cfg.captions or None, on_error=cfg.on_error,
                                    skips=skips)
    if cfg.rm_dir and reward_fn is None:
        check_rm_budget(cfg, records)   # the RM never cuts a response: refuse now what would stop the run mid-way

    models, tok = build_models(cfg, d.device)
    for base in (models.policy_base, models.value_base):   # decode() checkpoints when training with grad
        base.gradient_checkpointing = cfg.grad_ckpt
    template = data.Template(system=cfg.system)
    pb = models.policy_base
    prompts = data.PromptDataset(records, tok, template, cfg.image_folder, pb.config.image_size, pb.num_image_tokens,
                                 cfg.max_prompt_len)
    per_rank = cfg.rollout_batch // d.world
    steps_per_epoch = len(prompts) // cfg.rollout_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.prompts_path}: {len(prompts)} usable prompts is fewer than one rollout batch ({cfg.rollout_batch})")
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    params = models.trainable()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sampler = data.ResumableSampler(len(prompts), rank=d.rank, world_size=d.world, seed=cfg.seed)
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed * 1000 + d.rank)   # rollout sampling
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

    step, bad = 0, 0
    if cfg.resume and (path := common.latest_checkpoint(cfg.out_dir)):
        ck = common.load_checkpoint(path)
        common.load_trainable_state(_Trainable(models), ck["model"], path)
        opt.load_state_dict(ck["optimizer"])
        sampler.load_state_dict(ck["sampler"])
        common.set_rng_state(ck["rng"])
        gen.set_state(ck["gen"][d.rank] if isinstance(ck["gen"], list) else ck["gen"])
        kl_ctl.value = ck["kl_coef"]
        step, bad = ck["step"], ck["bad"]
        print(f"resumed from {path} at step {step}") if common.is_main() else None

    def checkpoint() -> None:
        gens = [gen.get_state()]
        if d.enabled:
            gens = [None] * d.world
            dist.all_gather_object(gens, gen.get_state().cpu())
        state = {"model": common.trainable_state_dict(_Trainable(models)), "optimizer": opt.state_dict(),
                 "step": step, "sampler": sampler.state_dict(), "rng": common.rng_state(), "gen": gens,
                 "kl_coef": kl_ctl.value, "bad": bad, "config": asdict(cfg)}
        common.save_checkpoint_on_main(state, cfg.out_dir, step, cfg.keep_last)

    logger = common.MetricsLogger(cfg.out_dir, cfg.logger, "ppo", asdict(cfg))
    stop = common.StopSignal()
    bar = common.Progress(total_steps, "ppo", start=step, enabled=cfg.progress)
    history = []
    while step < total_steps:
        # -- rollout ------------------------------------------------------------------------------------
        idx = sampler.take(per_rank)
        for mod in (pb, models.value_base):
            mod.eval()
        parts = []
        with kernels.packed_cpu_linear(cfg.compile and d.device.type == "cpu"):   # generation and scoring
            for i in range(0, per_rank, cfg.micro_batch):
                b = data.collate_left([prompts[j] for j in idx[i:i + cfg.micro_batch]], tok.pad_id)
                parts.append(rollout(models, tok, b, records, cfg, gen, reward_fn))
        ro = merge_rollouts(parts)
        t0 = time.time()
        mask = ro["rmask"]
        rewards, kst = shaped_rewards(ro["score"], ro["logp"], ro["ref_logp"], mask, kl_ctl.value,
                                      cfg.kl_estimator, cfg.kl_clamp)
        rewards = whiten(rewards, mask, shift_mean=False) if cfg.whiten_rewards else rewards * cfg.reward_scale
        adv, ret = gae(rewards, ro["values"], mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, mask, shift_mean=True)

        # -- update ---------------------------------------------------------------------------------------
        for mod in (pb, models.value_base):
            mod.train()
        n_local = ro["full"].shape[0]
        mb_local = cfg.step_batch // d.world
        stats_acc: dict[str, float] = {}
        skipped = False
        perm_gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        lr = ppo_lr(step, total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)   # once per rollout batch
        for g in opt.param_groups:
            g["lr"] = lr
        for ep in range(cfg.ppo_epochs):
            perm = torch.randperm(n_local, generator=perm_gen)
            for s in range(0, n_local, mb_local):
                rows = perm[s:s + mb_local]
                n_tok = common.all_reduce_sum(mask[rows].sum().double()).item()
                ok = True
                for u in range(0, len(rows), cfg.micro_batch):
                    r = rows[u:u + cfg.micro_batch]
                    st, ok_u = _micro_update(models, micro_inputs(ro, r, adv, ret, models, d.device), cfg, n_tok)
                    ok = ok and ok_u
                    for k, v in st.items():
                        stats_acc[k] = stats_acc.get(k, 0.0) + float(v)
                ok_all = common.all_reduce_sum(torch.tensor(0.0 if ok else 1.0)).item() == 0
                if not ok_all:
                    opt.zero_grad(set_to_none=True)
                    skipped = True
                    continue
                common.allreduce_grads(params)
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if not torch.isfinite(gnorm):
                    opt.zero_grad(set_to_none=True)
                    skipped = True
                    continue
                opt.step()
                opt.zero_grad(set_to_none=True)
        t_train = time.time() - t0
        step += 1
        bad = bad + 1 if skipped else 0
        if skipped and common.is_main():
            print(f"warning: non-finite loss or gradient at PPO step {step}: update skipped ({bad} in a row)",
                  file=sys.stderr)
        if bad >= cfg.max_bad_steps:
            raise FloatingPointError(f"{bad} PPO steps in a row had non-finite losses; stopping "
                                     f"(last good checkpoint in {cfg.out_dir})")

        # -- stats ----------------------------------------------------------------------------------------
        seq_kl = kst["kl"]

        def glob(x: torch.Tensor) -> float:  # mean over all ranks' rollouts
            s = common.all_reduce_sum(torch.tensor([float(x.float().sum()), float(x.numel())], dtype=torch.float64))
            return float(s[0] / s[1].clamp(min=1))
        ent = stats_acc.get("entropy_sum", 0.0) / max(1.0, stats_acc.get("tokens", 1.0))
        ev = explained_variance(ro["values"], ret, mask)
        metrics = {"reward": glob(ro["score"]), "rm_score": glob(ro["rm_score"]),
                   "sym_no_eos": glob(ro["sym_no_eos"]), "sym_length": glob(ro["sym_length"]),
                   "sym_correct": glob(ro["sym_correct"]), "kl": glob(seq_kl), "kl_coef": kl_ctl.value,
                   "entropy": ent, "clipfrac": stats_acc.get("clipfrac", 0.0) / max(1, stats_acc.get("n", 1)),
                   "approx_kl": stats_acc.get("approx_kl", 0.0) / max(1, stats_acc.get("n", 1)),
                   "value_explained_var": ev, "response_length": glob(mask.sum(-1)),
                   "eos_rate": glob(ro["has_eos"].float()), "t_generate": ro["t_gen"],
                   "t_score": ro["t_score"], "t_train": t_train, "skipped": float(skipped), "lr": lr}
        if cfg.adaptive_kl:
            kl_ctl.update(metrics["kl"], cfg.rollout_batch)
        logger.log(step, metrics)
        history.append(metrics)
        if common.is_main() and cfg.samples_to_log:
            with open(os.path.join(cfg.out_dir, "samples.jsonl"), "a") as f:
                for k in range(min(cfg.samples_to_log, len(ro["texts"]))):
                    f.write(json.dumps({"step": step, "id": ro["record_ids"][k], "image": ro["image_files"][k],
                                        "question": ro["questions"][k], "response": ro["texts"][k],
                                        "reward": float(ro["score"][k]), "rm_score": float(ro["rm_score"][k])}) + "\n")
        bar.update(1, reward=metrics["reward"], kl=metrics["kl"], len=metrics["response_length"])
        stopping = stop.should_stop() or bool(cfg.stop_at_step and step >= cfg.stop_at_step)
        if step % cfg.save_every == 0 or stopping:
            checkpoint()
        if stopping:
            print(f"\nstopped at step {step}; resume with --resume true") if common.is_main() else None
            stop.restore()
            common.cleanup_distributed()
            return {"step": step, "stopped": True, "history": history}
    bar.close()
    stop.restore()
    checkpoint()
    if common.is_main():
        pb.save_adapter(os.path.join(cfg.out_dir, "policy_adapter"), "policy")
        # the policy merged into the base: what eval_mmhal.py and serving tools load directly
        _save_merged_policy(pb, os.path.join(cfg.out_dir, "final"), tok)
        print(f"done: {step} PPO steps; skipped records: {skips.count}")
    common.cleanup_distributed()
    return {"step": step, "stopped": False, "history": history}


def micro_inputs(ro: dict, rows: torch.Tensor, adv: torch.Tensor, ret: torch.Tensor, models: Models,
                 device) -> dict:
    """The rows of one micro-update, on the device, trimmed of the padding columns they all share; the
    value base's ids too (value_inputs). Host-side: it reads the masks' values."""
    pb, vb = models.policy_base, models.value_base
    full, fmask, m = ro["full"][rows], ro["fmask"][rows], ro["rmask"][rows]
    lo = int(fmask.bool().any(0).nonzero()[0])
    P = ro["P"] - lo
    R = int(m.sum(-1).max().item()) if m.sum() > 0 else 1
    full, fmask = full[:, lo:ro["P"] + R], fmask[:, lo:ro["P"] + R]
    vfull, vmask, vP = value_inputs(full, fmask, P, pb.num_image_tokens, vb.num_image_tokens)
    images, v_images = select_rows(ro, rows, "images"), select_rows(ro, rows, "v_images")
    out = {"full": full, "fmask": fmask, "P": P, "vfull": vfull, "vmask": vmask, "vP": vP, "mask": m[:, :R],
           "images": images, "v_images": v_images, "old_logp": ro["logp"][rows][:, :R],
           "old_values": ro["values"][rows][:, :R], "adv": adv[rows][:, :R], "ret": ret[rows][:, :R]}
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t)) if M.has_values(t) else True   # (the rehearsal's fake losses: go on)


def _micro_update(models: Models, mb: dict, cfg: Config, n_tok_global: float) -> tuple[dict, bool]:
    """Policy and value losses on a few rollouts (micro_inputs), backward with weights that make the
    optimizer step a token mean over the whole minibatch on all ranks. -> (detached stats, finite)."""
    pb, vb = models.policy_base, models.value_base
    m, P = mb["mask"], mb["P"]
    resp = mb["full"][:, P:]
    n_local = m.sum()
    w = n_local / max(n_tok_global, 1.0)
    dev, dt = m.device, pb.lm_head.weight.dtype      # autocast at the frozen base's precision
    # loss = (pg + vf_coef * vf) * w, backward in two parts: the policy's before the value forward. With
    # gradient checkpointing a layer is recomputed in backward under the adapter active *then*, and the
    # value forward switches a shared base to "value"; it also frees the policy's graph before the value's.
    with common.autocast(dev, dt):
        h = forward_response(pb, "policy", mb["full"], mb["images"], mb["fmask"], P)
        logp, ent = M.token_logprobs(h, pb.lm_head.weight, resp, temperature=logprob_temperature(cfg),
                                     with_entropy=True, fused=True)
    pg, pst = policy_loss(logp, mb["old_logp"], mb["adv"], m, cfg.clip)
    ok = _finite(pg)
    if ok:
        (pg * w).backward()
    with common.autocast(dev, dt):
        h = forward_response(vb, "value", mb["vfull"], mb["v_images"], mb["vmask"], mb["vP"])
        v = models.value_head(h).float()
    vf, vst = value_loss(v, mb["old_values"], mb["ret"], m, cfg.value_clip)
    ok = ok and _finite(vf)
    if ok:
        (cfg.vf_coef * vf * w).backward()
    st = {"clipfrac": pst["clipfrac"], "approx_kl": pst["approx_kl"], "n": 1.0,
          "entropy_sum": (ent.detach() * m).sum(), "tokens": n_local, "vf_loss": vf.detach(), "pg_loss": pg.detach()}
    return st, ok


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens."""
    m = mask.bool()
    r, v = returns[m].float(), values[m].float()
    if r.numel() < 2 or float(r.var()) == 0:
        return float("nan")
    return float(1 - (r - v).var() / r.var())


class _Trainable(torch.nn.Module):
    """A module view over everything PPO trains, for checkpointing."""

    def __init__(self, models: Models):
        super().__init__()
        self.policy = torch.nn.ParameterList(models.policy_base.adapter_parameters("policy"))
        self.value = torch.nn.ParameterList(models.value_base.adapter_parameters("value"))
        self.value_head = models.value_head


def _save_merged_policy(pb: M.LLaVA, out: str, tok: data.Tokenizer) -> None:
    """Merge the policy adapter into the base and save it. Called once training is over: the live
    model is changed in place (no second copy of the base in memory) and not used afterwards."""
    for name in list(pb.adapters):
        if name != "policy":
            pb.delete_adapter(name)
    pb.merge_adapter("policy")
    common.save_model_dir(pb, out, tok.path)


if __name__ == "__main__":
    common.run_cli(main, (common.ConfigError, data.DataError))
