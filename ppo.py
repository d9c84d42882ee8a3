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
    python rehearse.py --stage ppo --preset llava-rlhf-7b --rm_base_path preset:llava-rlhf-13b --ranks 8
(--model_path / --rm_base_path may name folders: only their config.json is read.)
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, asdict, field, replace
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


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over real tokens (of all ranks when distributed), eps 1e-8; 0 on padding.
    shift_mean=False keeps the mean (rescales only)."""
    mask = mask.to(x.dtype)
    stats = torch.stack([masked_sum(x, mask), masked_sum(x * x, mask), mask.sum()]).double()
    if dist.is_initialized():
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


def shaped_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float = 0.1, estimator: str = "k1", clamp: bool = True) -> tuple[torch.Tensor, dict]:
    """Per-token rewards: -kl_coef * KL(token) everywhere, + score (B,) on the last real response token."""
    mask = mask.to(logp.dtype)
    kl = kl_per_token(logp, ref_logp, estimator, clamp) * mask                # (B, T)
    r = -kl_coef * kl
    idx = M.last_token_index(mask)                                            # (B,), -1 for an empty row
    has = mask.sum(-1) > 0
    r[torch.arange(r.shape[0], device=r.device), idx] += torch.where(has, score.to(r.dtype), torch.zeros_like(score, dtype=r.dtype))
    return r * mask, {"kl": kl.sum(-1)}


def correct_bonus(text: str, answer_type: str, answer: str, rule: str = "official", mc_reward: float = 1.0,
                  yesno_reward: float = 0.5) -> float:
    """The correctness term before scaling (SPEC §5), as the official trainer reads a response (`rule`
    "official"): multiple choice +mc_reward when the stripped text starts with "B." or contains "correct
    option is B." (case as written); a yes/no question whose truth is "no": +yesno_reward for a stripped
    text starting "No", -yesno_reward for one starting "Yes"; nothing else. "lenient" also takes "(B)" /
    "B)" and any case."""
    t = text.strip()
    if answer_type == "multiple_choice" and answer:
        letter = answer[0].upper()
        if rule == "official":
            hit = t.startswith(f"{letter}.") or f"correct option is {letter}." in text
        else:
            hit = re.match(rf"^\(?{letter}[.)]", t, re.IGNORECASE) or f"correct option is {letter.lower()}." in t.lower()
        return mc_reward if hit else 0.0
    if answer_type == "yes_no" and answer.lower() == "no":
        head = t if rule == "official" else t.lower()
        no, yes = ("No", "Yes") if rule == "official" else ("no", "yes")
        return yesno_reward if head.startswith(no) else (-yesno_reward if head.startswith(yes) else 0.0)
    return 0.0


def symbolic_rewards(texts: list[str], has_eos: list[bool], lengths: list[int], records: list[dict],
                     no_eos_penalty: float = -8.0, length_penalty: float = -10.0, length_budget: int = 896,
                     correct_scale: float = 2.0, mc_reward: float = 1.0, yesno_reward: float = 0.5,
                     correct_rule: str = "official") -> dict[str, torch.Tensor]:
    """The paper's rule-based terms (SPEC §5), each (B,): no EOS, length, correctness (correct_bonus)."""
    no_eos = torch.tensor([0.0 if e else no_eos_penalty for e in has_eos])
    length = torch.tensor([length_penalty * (n / length_budget) * float(rec.get("length_multiplier", 1.0))
                           for n, rec in zip(lengths, records)])
    correct = []
    for text, rec in zip(texts, records):
        c = correct_bonus(text, rec.get("answer_type", "general"), (rec.get("answer") or "").strip(), correct_rule,
                          mc_reward, yesno_reward)
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
    num_workers: int = 2                # DataLoader processes reading and preprocessing the next rollout's prompts
    #                                     and images ahead (pinned memory on GPU); 0: read in the training process
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
    #                                     also generation and scoring through MKL or prepacked oneDNN linears,
    #                                     whichever this machine measured faster (kernels.cpu_linear_plan)
    # reward
    no_eos_penalty: float = -8.0
    length_penalty: float = -10.0       # x (response tokens / length_budget) x the item's length multiplier
    length_budget: int = 896
    correct_scale: float = 2.0
    mc_reward: float = 1.0
    yesno_reward: float = 0.5
    correct_rule: str = "official"      # official: "B." / "correct option is B.", "No"/"Yes" as written | lenient: also "(B)", any case
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
    resume: str = "false"               # true: continue from the newest good checkpoint (stop if none); auto: also start fresh if none
    overwrite: bool = False             # a fresh run (resume false) may delete the checkpoints and logs already in out_dir
    stop_at_step: int = 0
    max_bad_steps: int = 3              # stop after this many non-finite steps in a row
    divergence_check: bool = True       # stop when KL/entropy/grad-norm leave their recent range (common.Divergence)
    samples_to_log: int = 2
    logger: str = "none"
    progress: bool = True
    # held-out evaluation: the proxy reward (the RM) beside a gold one (main's gold_fn) on fixed prompts
    eval_prompts: str = ""              # prompts (read_ppo_prompts format) answered greedily at step 0, every
    #                                     eval_every steps and at the end; none of them is trained on
    eval_every: int = 0                 # 0: no held-out evaluation
    eval_size: int = 0                  # > 0: only the first eval_size of eval_prompts


PRESETS = {
    "tiny": dict(rollout_batch=64, step_batch=32, micro_batch=32, max_new_tokens=48, length_budget=48,
                 lora_r=16, lora_alpha=32.0, lr=3e-4, warmup_steps=2, max_steps=30, save_every=10,
                 max_prompt_len=97, length_penalty=-1.0, no_eos_penalty=-4.0, reward_scale=1.0),
    "llava-rlhf-7b": dict(micro_batch=8, grad_ckpt=True),
    "llava-rlhf-13b": dict(micro_batch=4, grad_ckpt=True),
}


# ----------------------------------------------------------------------------------------------------
# The four roles

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
    base = M.load_model(cfg.model_path, cfg.vision_tower, "", 0, cfg.dtype, device)
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
        vbase = M.load_model(cfg.rm_base_path, "", "", 0, cfg.dtype, device)
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


# ----------------------------------------------------------------------------------------------------
# Rollouts: one record per sampled response, and one collate that makes a batch of them for a base

@dataclass
class Row:
    """One sampled response and everything PPO needs of it, unpadded. The prompt holds each image as ONE
    IMAGE_TOKEN_INDEX id, and the image is kept at the size of each base: collate expands the id and picks
    the image for the base it builds a batch for (the policy's, or a second base of the RM and critic
    with its own image size)."""
    record: dict                               # the prompt's record: id, question, facts, answer, ...
    prompt: list[int]                          # BOS ... "ASSISTANT:", each image one id
    images: dict[int, torch.Tensor]            # image size -> (3, S, S) for every base's size; {}: no image
    # base -> (P, D) projected image features on its device (image_features): the frozen vision tower and
    # projector run once per rollout, and every later forward of the row on that base reads these
    features: dict[M.LLaVA, torch.Tensor] = field(default_factory=dict)
    response: torch.Tensor | None = None       # (R,) sampled ids up to and including EOS
    has_eos: bool = False
    text: str = ""                             # the decoded response
    logp: torch.Tensor | None = None           # (R,) fp32 log-probs under the policy ...
    ref_logp: torch.Tensor | None = None       # (R,) ... and the reference, at the sampling temperature
    values: torch.Tensor | None = None         # (R,) the critic's
    rm_score: float = 0.0                      # the reward model's score (or reward_fn's)
    sym: dict[str, float] = field(default_factory=dict)    # the symbolic terms: no_eos, length, correct
    score: float = 0.0                         # the sequence reward: rm_score + the symbolic terms
    adv: torch.Tensor | None = None            # (R,) whitened advantages
    ret: torch.Tensor | None = None            # (R,) returns

    @property
    def mask(self) -> torch.Tensor:
        return torch.ones(len(self.response))


def expand_images(ids: list[int], n: int) -> list[int]:
    """Each IMAGE_TOKEN_INDEX -> n of them: the run a base with n image tokens per image reads."""
    return [t for i in ids for t in ([i] * n if i == M.IMAGE_TOKEN_INDEX else [i])]


def per_token(rows: list[Row], key: str, pad: float = 0) -> torch.Tensor:
    """A per-token field of the rows, (B, R) right-padded with `pad` to the longest response."""
    return torch.nn.utils.rnn.pad_sequence([getattr(r, key) for r in rows], batch_first=True, padding_value=pad)


def collate(rows: list[Row], base: M.LLaVA) -> dict:
    """Rows -> one batch for `base`, on its device: prompts left-padded to P with each image expanded to
    the base's num_image_tokens, responses right-padded to R, so that every response starts at column P
    (the hidden state at P-1+t predicts response token t) and positions, which count real tokens only,
    are those of each row alone. Pads are id 0 (masked: any id would do).
    -> ids, mask (B, P+R), P, images (N, 3, S, S) at the base's size, or their features (N, P_img, D) when
    the rows hold them (image_features), or None; when the rows hold
    responses also resp, rmask (B, R) and the per-token fields they hold (logp, ..., ret), 0-padded."""
    n_img, S = base.num_image_tokens, base.config.image_size
    ids, mask = data.left_pad([expand_images(r.prompt, n_img) for r in rows], 0)          # (B, P)
    # the features image_features computed for this base, else the pixels (the base's forward encodes them)
    images = [r.features[base] if base in r.features else r.images[S] for r in rows if r.images]
    out = {"P": ids.shape[1], "images": torch.stack(images) if images else None}
    if rows[0].response is not None:
        out["resp"], out["rmask"] = per_token(rows, "response"), per_token(rows, "mask")   # (B, R)
        ids, mask = torch.cat([ids, out["resp"]], 1), torch.cat([mask, out["rmask"].long()], 1)
        for k in ("logp", "ref_logp", "values", "adv", "ret"):
            if getattr(rows[0], k) is not None:
                out[k] = per_token(rows, k)
    out["ids"], out["mask"] = ids, mask
    dev = next(base.parameters()).device
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def forward_response(m: M.LLaVA, adapter: str | None, batch: dict) -> torch.Tensor:
    """Hidden states (B, R, D) of a collated batch that predict each response token: positions
    P-1 .. P+R-2 of prompt + response."""
    m.set_adapter(adapter)
    h = m.hidden_states(batch["ids"], batch["images"], batch["mask"])
    return h[:, batch["P"] - 1:-1]


def response_mask(resp: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """resp (B, R) padded after EOS -> mask (B, R) float, 1 up to and including EOS; has_eos (B,) bool."""
    is_eos = resp == eos_id
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0         # an EOS strictly earlier
    return (~seen_before).float(), is_eos.any(-1)


def prompt_row(item: dict, record: dict, sizes: set[int], image_folder: str) -> Row:
    """A PromptDataset item (the image as one id, the image at the policy's size) -> a Row to sample,
    with the image also at every other size a base reads, read from disk once here."""
    images = {}
    if item["image"] is not None:
        images[item["image"].shape[-1]] = item["image"]
        for S in sizes - images.keys():
            images[S] = data.image_tensor(os.path.join(image_folder, record["image"]), S)
    return Row(record, item["input_ids"].tolist(), images)


@torch.no_grad()
def image_features(rows: list[Row], bases: list[M.LLaVA]) -> None:
    """Each base's projected features of the rows' images, into the rows (features): one vision-tower and
    projector pass per base for these rows, reused by sampling, the scoring passes, the reward model and
    every PPO epoch's update (collate hands them to the base's forward in place of the pixels). Exact
    because nothing PPO trains touches them: the whole base is frozen and the adapters sit in the LLM only
    (LLaVA.add_adapter), so the features are the same numbers at every forward of the rollout."""
    with_image = [r for r in rows if r.images]
    if not with_image:
        return
    for base in dict.fromkeys(bases):   # one base for all four roles: encoded once
        if any(p.requires_grad for mod in (base.vision, base.projector) for p in mod.parameters()):
            raise RuntimeError("PPO reuses the image features of a rollout, which needs a frozen vision tower "
                               "and projector, but some of their parameters require grad")
        S, dev = base.config.image_size, next(base.parameters()).device
        feats = base.encode_images(torch.stack([r.images[S] for r in with_image]).to(dev))   # (N, P, D)
        for r, f in zip(with_image, feats):
            r.features[base] = f


@torch.no_grad()
def sample(pb: M.LLaVA, tok: data.Tokenizer, rows: list[Row], cfg: Config, gen: torch.Generator) -> None:
    """The policy's responses to the rows' prompts, into the rows (response, has_eos, text)."""
    b = collate(rows, pb)
    pb.set_adapter("policy")
    resp = pb.generate(b["ids"], b["images"], b["mask"], max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, generator=gen, compile=cfg.compile)      # (B, R)
    rmask, has_eos = response_mask(resp, tok.eos_id)
    for r, ids, n, eos in zip(rows, resp.cpu(), rmask.sum(-1).long().tolist(), has_eos.tolist()):
        r.response, r.has_eos, r.text = ids[:n], eos, tok.decode_response(ids[:n])


@torch.no_grad()
def score_passes(models: Models, rows: list[Row], cfg: Config) -> None:
    """The no-grad passes over prompt + response, into the rows: log-probs of the sampled tokens under the
    policy and the reference (at the sampling temperature, as they were drawn) and the critic's values."""
    pb, vb, temp = models.policy_base, models.value_base, logprob_temperature(cfg)
    b = collate(rows, pb)
    logp = M.token_logprobs(forward_response(pb, "policy", b), pb.lm_head.weight, b["resp"], temperature=temp)
    ref_logp = M.token_logprobs(forward_response(pb, models.ref_adapter, b), pb.lm_head.weight, b["resp"],
                                temperature=temp)                                         # (B, R)
    vbatch = b if vb is pb else collate(rows, vb)   # one base: the policy's batch serves the critic too
    values = models.value_head(forward_response(vb, "value", vbatch)).float()
    for r, lp, rlp, v in zip(rows, logp.cpu(), ref_logp.cpu(), values.cpu()):
        n = len(r.response)
        r.logp, r.ref_logp, r.values = lp[:n], rlp[:n], v[:n]


def rewards(models: Models, rows: list[Row], cfg: Config, reward_fn: Callable | None = None, step: int | str = 0) -> None:
    """Each row's sequence reward, into the rows: the reward model's score of the response with the
    record's facts (in this step's order for the prompt) and the image at the RM's size (or reward_fn's),
    plus the symbolic terms."""
    recs, texts = [r.record for r in rows], [r.text for r in rows]
    if reward_fn is not None:
        rm = torch.as_tensor(reward_fn(recs, texts, per_token(rows, "response"), per_token(rows, "mask")),
                             dtype=torch.float32)
    else:
        vb = models.value_base
        S = vb.config.image_size
        # the RM base is the value base: its features (image_features) when the rows hold them, else the pixels
        items = [{"id": str(rec["id"]), "image": r.features.get(vb, r.images.get(S)), "response": r.text, "facts": rec.get("facts") or [],
                  "conversations": [{"from": "human", "value": ("<image>\n" if r.images else "") + rec["question"]}]}
                 for r, rec in zip(rows, recs)]
        rm = torch.tensor(models.scorer.score(items, use=step), dtype=torch.float32)
    sym = symbolic_rewards(texts, [r.has_eos for r in rows], [len(r.response) for r in rows], recs,
                           cfg.no_eos_penalty, cfg.length_penalty, cfg.length_budget, cfg.correct_scale,
                           cfg.mc_reward, cfg.yesno_reward, cfg.correct_rule)
    total = rm + sym["no_eos"] + sym["length"] + sym["correct"]
    if cfg.reward_clip > 0:
        total = total.clamp(-cfg.reward_clip, cfg.reward_clip)
    for i, r in enumerate(rows):
        r.rm_score, r.score, r.sym = float(rm[i]), float(total[i]), {k: float(v[i]) for k, v in sym.items()}


def rollout(models: Models, tok: data.Tokenizer, items: list[dict], records: list[dict], cfg: Config,
            gen: torch.Generator, reward_fn: Callable | None = None, step: int = 0) -> tuple[list[Row], dict[str, float]]:
    """Sample a response to each prompt (PromptDataset items) and everything the update needs of it,
    micro_batch prompts at a time; `step` (the PPO step) draws the facts' order the RM sees.
    -> (rows, seconds spent generating and scoring)."""
    sizes = {models.policy_base.config.image_size, models.value_base.config.image_size}
    rows, t = [], {"t_generate": 0.0, "t_score": 0.0}
    for i in range(0, len(items), cfg.micro_batch):
        part = [prompt_row(it, records[it["index"]], sizes, cfg.image_folder) for it in items[i:i + cfg.micro_batch]]
        t0 = time.time()
        image_features(part, [models.policy_base, models.value_base])
        sample(models.policy_base, tok, part, cfg, gen)
        t1 = time.time()
        score_passes(models, part, cfg)
        rewards(models, part, cfg, reward_fn, step)
        t["t_generate"] += t1 - t0
        t["t_score"] += time.time() - t1
        rows += part
    return rows, t


# ----------------------------------------------------------------------------------------------------
# Held-out evaluation: what the reward model says (the proxy) beside what a gold judge says, on prompts
# no step trains on. Reward hacking is the proxy rising while the gold stalls or falls.

@torch.no_grad()
def heldout_eval(models: Models, tok: data.Tokenizer, items: list[dict], records: list[dict], cfg: Config,
                 reward_fn: Callable | None = None, gold_fn: Callable | None = None) -> dict[str, float]:
    """The policy's greedy answers to this rank's held-out prompts (PromptDataset items of `records`),
    scored as rollouts are (the RM with the facts in their fixed "eval" order, + the symbolic terms) and by
    gold_fn(records, texts) -> {name: one float per answer}. -> means over all ranks' answers: eval_proxy_rm
    (the RM alone), eval_proxy_reward (with the symbolic terms), eval_length (tokens), eval_gold_<name>."""
    greedy = replace(cfg, temperature=0.0)
    sizes = {models.policy_base.config.image_size, models.value_base.config.image_size}
    gen = torch.Generator(device=next(models.policy_base.parameters()).device)   # unused by greedy decoding
    sums: dict[str, float] = {}
    for i in range(0, len(items), cfg.micro_batch):
        part = [prompt_row(it, records[it["index"]], sizes, cfg.image_folder) for it in items[i:i + cfg.micro_batch]]
        image_features(part, [models.policy_base, models.value_base])
        sample(models.policy_base, tok, part, greedy, gen)
        rewards(models, part, greedy, reward_fn, "eval")
        cols = {"eval_proxy_rm": [r.rm_score for r in part], "eval_proxy_reward": [r.score for r in part],
                "eval_length": [float(len(r.response)) for r in part]}
        if gold_fn is not None:
            cols.update({f"eval_gold_{k}": list(v) for k, v in gold_fn([r.record for r in part],
                                                                        [r.text for r in part]).items()})
        for k, v in cols.items():
            sums[k] = sums.get(k, 0.0) + float(sum(v))
    keys = sorted(sums)   # the same on every rank: each answers at least one prompt (main), with one gold_fn
    tot = common.all_reduce_sum(torch.tensor([sums.get(k, 0.0) for k in keys] + [float(len(items))], dtype=torch.float64))
    n = float(tot[-1].clamp(min=1))
    return {k: float(v) / n for k, v in zip(keys, tot[:-1])}


# ----------------------------------------------------------------------------------------------------
# The update

def advantages(rows: list[Row], cfg: Config, kl_coef: float) -> torch.Tensor:
    """KL-shaped per-token rewards, GAE and whitened advantages (whitening over all ranks' rows), into
    the rows (adv, ret). -> the (B,) sequence KL of each row."""
    mask = per_token(rows, "mask")                                                      # (B, R)
    score = torch.tensor([r.score for r in rows])
    rewards, kst = shaped_rewards(score, per_token(rows, "logp"), per_token(rows, "ref_logp"), mask, kl_coef,
                                  cfg.kl_estimator, cfg.kl_clamp)
    rewards = whiten(rewards, mask, shift_mean=False) if cfg.whiten_rewards else rewards * cfg.reward_scale
    adv, ret = gae(rewards, per_token(rows, "values"), mask, cfg.gamma, cfg.lam)
    adv = whiten(adv, mask, shift_mean=True)
    for r, a, g in zip(rows, adv, ret):
        r.adv, r.ret = a[:len(r.response)], g[:len(r.response)]
    return kst["kl"]


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t)) if M.has_values(t) else True   # (the rehearsal's fake losses: go on)


def _micro_update(models: Models, rows: list[Row], cfg: Config, n_tok_global: float) -> tuple[dict, bool]:
    """Policy and value losses on a few rows, backward with weights that make the optimizer step a token
    mean over the whole minibatch on all ranks. -> (detached stats, finite)."""
    pb, vb = models.policy_base, models.value_base
    b = collate(rows, pb)
    m = b["rmask"]                                                                      # (B, R)
    n_local = m.sum()
    w = n_local / max(n_tok_global, 1.0)
    dev, dt = m.device, pb.lm_head.weight.dtype      # autocast at the frozen base's precision
    # loss = (pg + vf_coef * vf) * w, backward in two parts: the policy's before the value forward. With
    # gradient checkpointing a layer is recomputed in backward under the adapter active *then*, and the
    # value forward switches a shared base to "value"; it also frees the policy's graph before the value's.
    with common.autocast(dev, dt):
        h = forward_response(pb, "policy", b)
        logp, ent = M.token_logprobs(h, pb.lm_head.weight, b["resp"], temperature=logprob_temperature(cfg),
                                     with_entropy=True, fused=True)
    pg, pst = policy_loss(logp, b["logp"], b["adv"], m, cfg.clip)
    ok = _finite(pg)
    if ok:
        (pg * w).backward()
    with common.autocast(dev, dt):
        v = models.value_head(forward_response(vb, "value", b if vb is pb else collate(rows, vb))).float()
    vf, vst = value_loss(v, b["values"], b["ret"], m, cfg.value_clip)
    ok = ok and _finite(vf)
    if ok:
        (cfg.vf_coef * vf * w).backward()
    st = {"clipfrac": pst["clipfrac"], "approx_kl": pst["approx_kl"], "n": 1.0,
          "entropy_sum": (ent.detach() * m).sum(), "tokens": n_local, "vf_loss": vf.detach(), "pg_loss": pg.detach()}
    return st, ok


def update(models: Models, rows: list[Row], opt: torch.optim.Optimizer, cfg: Config, gen: torch.Generator,
           ranks: int = 1) -> tuple[dict[str, float], bool]:
    """ppo_epochs passes over the rows in an order drawn from `gen`: an optimizer step per step_batch
    rows of all ranks, micro_batch rows per forward. A step whose loss or gradient is not finite on any
    rank is skipped on all. -> (the micro-updates' stats summed, whether a step was skipped)."""
    params = models.trainable()
    per_step = cfg.step_batch // ranks
    stats: dict[str, float] = {}
    skipped = False
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        for s in range(0, len(rows), per_step):
            minibatch = [rows[i] for i in order[s:s + per_step]]
            n_tok = common.all_reduce_sum(torch.tensor(float(sum(len(r.response) for r in minibatch)),
                                                       dtype=torch.float64)).item()
            ok = True
            for u in range(0, len(minibatch), cfg.micro_batch):
                st, ok_u = _micro_update(models, minibatch[u:u + cfg.micro_batch], cfg, n_tok)
                ok = ok and ok_u
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + float(v)
            ok = common.all_reduce_sum(torch.tensor(0.0 if ok else 1.0)).item() == 0
            if ok:
                common.allreduce_grads(params)
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                ok = bool(torch.isfinite(gnorm))
            if ok:
                stats["grad_norm"] = max(stats.get("grad_norm", 0.0), float(gnorm))   # the largest of the step
                opt.step()
            opt.zero_grad(set_to_none=True)
            skipped = skipped or not ok
    return stats, skipped


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens."""
    m = mask.bool()
    r, v = returns[m].float(), values[m].float()
    if r.numel() < 2 or float(r.var()) == 0:
        return float("nan")
    return float(1 - (r - v).var() / r.var())


# ----------------------------------------------------------------------------------------------------
# Training loop

def toy_reward_fn(spec: str) -> Callable:
    """--toy_reward contains:WORD -> reward_fn giving 1.0 to responses that contain WORD (any case)."""
    kind, _, word = spec.partition(":")
    if kind != "contains" or not word:
        raise common.ConfigError(f"--toy_reward must look like contains:WORD, got {spec!r}")
    return lambda recs, texts, resp, mask: torch.tensor([float(word.lower() in t.lower()) for t in texts])


FACTS_ORDER_SLACK = 8


def check_rm_budget(cfg: Config, records: list[dict]) -> int:
    """Before any model loads: refuse (ConfigError) a run whose reward-model inputs can exceed the RM's
    max_len, since reward_model.build_rm_ids never cuts a response and would stop the run mid-way. For
    every prompt of `records` (read_ppo_prompts) that PromptDataset keeps (max_prompt_len, the image
    counted as one id), the RM input as
    rollout() builds it (the RM's tokenizer, system sentence, rating request, facts mode and the facts'
    order for this seed and id at step 0) plus max_new_tokens response ids, the image counted as one,
    plus FACTS_ORDER_SLACK ids: another order of the same facts can encode a few ids longer where the last
    fact meets the text after it.
    -> the longest input before the response. (The RM re-encodes the decoded response text: for normal text
    that is at most the generated ids; byte-level garbage can re-encode longer and still stops the run.)"""
    RM.check_rm_dir(cfg.rm_dir)
    meta = RM.read_rm_config(cfg.rm_dir)
    tok, rm_tok = data.Tokenizer(cfg.tokenizer or cfg.model_path), data.Tokenizer(meta["tokenizer"])
    if cfg.rm_base_path and rm_tok.sp.serialized_model_proto() != tok.sp.serialized_model_proto():
        return 0  # build_models refuses a second base with another tokenizer
    template = data.Template(system=cfg.system)
    kw = RM.rm_settings(meta)
    rm_template, request, order = data.Template(system=kw["system"]), kw["request"], kw["facts_order"]
    worst, worst_id = 0, None
    for rec in records:
        has_image = rec.get("image") is not None
        prompt = data.tokenize_prompt(rec["question"], tok, template, 1, has_image=has_image)
        if data.text_len(prompt) > cfg.max_prompt_len:
            continue                                         # PromptDataset drops it
        facts = RM.facts_order(RM.record_facts(rec, {}, kw["facts"]), cfg.seed, RM.rm_key(str(rec["id"]), order, 0),
                               order)
        conv = [{"from": "human", "value": ("<image>\n" if has_image else "") + rec["question"]}]
        ids = RM.build_rm_ids(conv, "", request.fill(facts), rm_tok, rm_template, 1, 1 << 30)
        n = data.text_len(ids) + (FACTS_ORDER_SLACK if len(facts) > 1 and order != "none" else 0)
        if n > worst:
            worst, worst_id = n, rec["id"]
    if worst + cfg.max_new_tokens > meta["max_len"]:
        raise common.ConfigError(
            f"the reward model's max_len {meta['max_len']} ({os.path.join(cfg.rm_dir, 'rm_config.json')}; the image counted as one id) is too small: "
            f"prompt {worst_id!r} of {cfg.prompts_path} with its facts and the rating request is {worst} ids, "
            f"+ --max_new_tokens {cfg.max_new_tokens} = {worst + cfg.max_new_tokens}, and the RM never cuts a "
            f"response; lower --max_new_tokens or --max_prompt_len, or use an RM trained with a larger max_len")
    return worst


def validate(cfg: Config) -> None:
    """Every flag checked before anything loads or is written: ConfigError naming the flag and its value."""
    common.check_config(
        cfg, required=("prompts_path", "model_path"),
        positive=("max_prompt_len", "lora_r", "lora_alpha", "rollout_batch", "step_batch", "micro_batch", "ppo_epochs",
                  "max_new_tokens", "length_budget", "kl_target", "kl_horizon", "reward_scale", "clip", "value_clip",
                  "lr", "grad_clip", "epochs", "max_bad_steps"),
        # temperature 0 samples greedily (logprob_temperature, model.sample_next); 0 turns off reward_clip,
        # save_every, stop_at_step; keep_last 0 keeps every checkpoint
        nonneg=("num_workers", "temperature", "kl_coef", "reward_clip", "vf_coef", "warmup_steps", "max_steps", "save_every",
                "keep_last", "stop_at_step", "samples_to_log", "eval_every", "eval_size"),
        fractions=("top_p", "gamma", "lam", "min_lr_ratio"),
        choices={"kl_estimator": ("k1", "k3"), "correct_rule": ("official", "lenient"), "on_error": ("raise", "skip"), "dtype": ("auto", *M.DTYPES),
                 "logger": ("none", "wandb", "tensorboard")},
        files=("prompts_path", "captions", "eval_prompts"),
        dirs=("image_folder", "model_path", "vision_tower", "policy_adapter", "rm_dir", "rm_base_path"),
        out_dirs=("out_dir",), device="device")
    if cfg.rollout_batch % cfg.step_batch:
        raise common.ConfigError(f"--rollout_batch {cfg.rollout_batch} must be a multiple of --step_batch {cfg.step_batch}")
    if not cfg.lora_targets.strip(","):
        raise common.ConfigError(f"--lora_targets names no module, got {cfg.lora_targets!r}")
    if cfg.toy_reward:
        toy_reward_fn(cfg.toy_reward)
    if cfg.eval_every and not cfg.eval_prompts:
        raise common.ConfigError(f"--eval_every {cfg.eval_every} needs --eval_prompts (the held-out prompts to answer)")
    if cfg.rm_dir:
        RM.check_rm_dir(cfg.rm_dir)
    common.check_tokenizer(cfg)


def main(argv: list[str] | None = None, reward_fn: Callable | None = None, gold_fn: Callable | None = None) -> dict:
    """reward_fn(records, texts, resp_ids, resp_mask) -> (B,) replaces the reward model (tests, toy tasks).
    gold_fn(records, texts) -> {name: one float per text} scores the held-out answers (--eval_every) beside
    the reward model: the tiny world passes its annotator and judge, the world's ground truth."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = common.parse_config(Config, argv, PRESETS)
    validate(cfg)
    if cfg.toy_reward and reward_fn is None:
        reward_fn = toy_reward_fn(cfg.toy_reward)
    if not cfg.rm_dir and reward_fn is None:
        raise common.ConfigError("give --rm_dir (a trained reward model) or --toy_reward contains:WORD")
    d = common.start_run(cfg)
    for name, total in (("rollout_batch", cfg.rollout_batch), ("step_batch", cfg.step_batch)):
        common.accumulation(total, cfg.micro_batch, d.world, name)
    skips = data.Skips()
    records = data.read_ppo_prompts(cfg.prompts_path, captions=cfg.captions or None, on_error=cfg.on_error,
                                    skips=skips)
    eval_records = []
    if cfg.eval_every:
        eval_records = data.read_ppo_prompts(cfg.eval_prompts, captions=cfg.captions or None, on_error=cfg.on_error,
                                             skips=skips)
        eval_records = eval_records[:cfg.eval_size] if cfg.eval_size else eval_records
    if cfg.rm_dir and reward_fn is None:
        check_rm_budget(cfg, records + eval_records)   # the RM never cuts a response: refuse now what would stop the run mid-way

    models, tok = build_models(cfg, d.device)
    for base in (models.policy_base, models.value_base):   # decode() checkpoints when training with grad
        base.gradient_checkpointing = cfg.grad_ckpt
    template = data.Template(system=cfg.system)
    pb = models.policy_base
    # prompts with the image as one id (collate expands it per base), images at the policy's size
    prompts = data.PromptDataset(records, tok, template, cfg.image_folder, pb.config.image_size, 1, cfg.max_prompt_len,
                                 on_error=cfg.on_error, skips=skips)   # a bad image: raise, or the next prompt
    eval_items = []
    if eval_records:
        eval_ds = data.PromptDataset(eval_records, tok, template, cfg.image_folder, pb.config.image_size, 1,
                                     cfg.max_prompt_len, on_error=cfg.on_error, skips=skips)
        if len(eval_ds) < d.world:
            raise data.DataError(f"{len(eval_ds)} usable held-out prompts is fewer than one per rank ({d.world})",
                                 cfg.eval_prompts)
        eval_items = [eval_ds[j] for j in range(d.rank, len(eval_ds), d.world)]

    def evaluate() -> dict[str, float]:
        for mod in (pb, models.value_base):
            mod.eval()
        with kernels.cpu_linear(pb, cfg.micro_batch, cfg.compile and d.device.type == "cpu"):
            return heldout_eval(models, tok, eval_items, eval_records, cfg, reward_fn, gold_fn)

    per_rank = cfg.rollout_batch // d.world
    steps_per_epoch = len(prompts) // cfg.rollout_batch
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(prompts)} usable prompts is fewer than one rollout batch ({cfg.rollout_batch})", cfg.prompts_path)
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    params = models.trainable()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sampler = data.ResumableSampler(len(prompts), rank=d.rank, world_size=d.world, seed=cfg.seed)
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed * 1000 + d.rank)   # rollout sampling
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

    watch = common.Divergence(cfg.out_dir, cfg.divergence_check, ceiling={"nll": math.log(pb.config.vocab_size)})
    ck = common.Checkpointer(cfg, _Trainable(models), opt, sampler, generator=gen, watch=watch)
    step, bad = 0, 0
    if state := ck.start():   # as --resume says: fresh, resumed, or refused
        step, bad, kl_ctl.value = state["step"], state["bad"], state["kl_coef"]

    # the next rollout's prompts and images read ahead in worker processes; the sampler checkpoints save
    # advances as rollouts are made
    loader = data.BatchLoader(prompts, sampler, per_rank, list, cfg.num_workers, pin_memory=d.device.type == "cuda")
    logger = common.MetricsLogger(cfg.out_dir, cfg.logger, "ppo", asdict(cfg))
    bar = common.Progress(total_steps, "ppo", start=step, enabled=cfg.progress)
    history, evals = [], []
    if cfg.eval_every and step == 0:
        evals.append({"step": 0, **evaluate()})
        logger.log(0, evals[-1])
    if step >= total_steps and common.is_main():
        print(f"already at step {step} of {total_steps}: nothing left to train; writing the final policy")
    while step < total_steps:
        # -- rollout ------------------------------------------------------------------------------------
        for mod in (pb, models.value_base):
            mod.eval()
        with kernels.cpu_linear(pb, cfg.micro_batch, cfg.compile and d.device.type == "cpu"):   # generation, scoring
            rows, times = rollout(models, tok, loader.next(), records, cfg, gen,
                                  reward_fn, step)
        t0 = time.time()
        seq_kl = advantages(rows, cfg, kl_ctl.value)
        # the rollout's KL to the reference and -log p of the policy's own samples (ln V: uniform) per token,
        # before this policy is updated or saved
        kl_nll_n = common.all_reduce_sum(torch.tensor([float(seq_kl.sum()), -float(sum(r.logp.sum() for r in rows)),
                                                       float(sum(len(r.response) for r in rows))], dtype=torch.float64))
        watch.check(step, kl_per_token=float(kl_nll_n[0] / kl_nll_n[2]), nll=float(kl_nll_n[1] / kl_nll_n[2]))

        # -- update ---------------------------------------------------------------------------------------
        for mod in (pb, models.value_base):
            mod.train()
        lr = ppo_lr(step, total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)   # once per rollout batch
        for g in opt.param_groups:
            g["lr"] = lr
        stats_acc, skipped = update(models, rows, opt, cfg, torch.Generator().manual_seed(cfg.seed * 7919 + step),
                                    d.world)
        t_train = time.time() - t0
        watch.check(step, grad_norm=stats_acc.get("grad_norm"))   # before this step's checkpoint
        step += 1
        bad = bad + 1 if skipped else 0
        if skipped and common.is_main():
            print(f"warning: non-finite loss or gradient at PPO step {step}: update skipped ({bad} in a row)",
                  file=sys.stderr)
        if bad >= cfg.max_bad_steps:
            raise common.DivergenceError(f"{bad} PPO steps in a row had non-finite losses or gradients (their updates "
                                         f"skipped); stopping at step {step}; last checkpoint: "
                                         f"{common.latest_checkpoint(cfg.out_dir) or 'none'}")

        # -- stats ----------------------------------------------------------------------------------------
        def mean(x) -> float:  # over all ranks' rows
            x = torch.as_tensor(x, dtype=torch.float32)
            s = common.all_reduce_sum(torch.tensor([float(x.sum()), float(x.numel())], dtype=torch.float64))
            return float(s[0] / s[1].clamp(min=1))
        mask = per_token(rows, "mask")
        n_micro = max(1, stats_acc.get("n", 1))
        metrics = {"reward": mean([r.score for r in rows]), "rm_score": mean([r.rm_score for r in rows]),
                   **{f"sym_{k}": mean([r.sym[k] for r in rows]) for k in ("no_eos", "length", "correct")},
                   "kl": mean(seq_kl), "kl_coef": kl_ctl.value,
                   "entropy": stats_acc.get("entropy_sum", 0.0) / max(1.0, stats_acc.get("tokens", 1.0)),
                   "clipfrac": stats_acc.get("clipfrac", 0.0) / n_micro,
                   "approx_kl": stats_acc.get("approx_kl", 0.0) / n_micro,
                   "pg_loss": stats_acc.get("pg_loss", 0.0) / n_micro, "vf_loss": stats_acc.get("vf_loss", 0.0) / n_micro,
                   "value_explained_var": explained_variance(per_token(rows, "values"), per_token(rows, "ret"), mask),
                   "response_length": mean(mask.sum(-1)), "eos_rate": mean([r.has_eos for r in rows]),
                   "t_generate": times["t_generate"], "t_score": times["t_score"], "t_train": t_train,
                   "grad_norm": stats_acc.get("grad_norm", float("nan")), "skipped": float(skipped), "lr": lr}
        if cfg.adaptive_kl:
            kl_ctl.update(metrics["kl"], cfg.rollout_batch)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps):
            ev = evaluate()
            metrics.update(ev)
            evals.append({"step": step, **ev})
        logger.log(step, metrics)
        history.append(metrics)
        if common.is_main() and cfg.samples_to_log:
            with open(os.path.join(cfg.out_dir, "samples.jsonl"), "a") as f:
                for r in rows[:cfg.samples_to_log]:
                    f.write(json.dumps({"step": step, "id": str(r.record["id"]), "image": r.record.get("image"),
                                        "question": r.record["question"], "response": r.text, "reward": r.score,
                                        "rm_score": r.rm_score, **{f"sym_{k}": v for k, v in r.sym.items()}}) + "\n")
        bar.update(1, reward=metrics["reward"], kl=metrics["kl"], len=metrics["response_length"])
        if ck.after_step(step, kl_coef=kl_ctl.value, bad=bad):   # saved; a signal or stop_at_step: stop
            loader.close()
            common.cleanup_distributed()
            return {"step": step, "stopped": True, "history": history, "evals": evals}
    bar.close()
    loader.close()
    ck.finish(step, kl_coef=kl_ctl.value, bad=bad)
    if common.is_main():
        pb.save_adapter(os.path.join(cfg.out_dir, "policy_adapter"), "policy")
        # the policy merged into the base: what eval_mmhal.py and serving tools load directly
        _save_merged_policy(pb, os.path.join(cfg.out_dir, "final"), tok)
        print(f"done: {step} PPO steps; skipped records: {skips.count}")
    common.cleanup_distributed()
    return {"step": step, "stopped": False, "history": history, "evals": evals}


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
    common.run_cli(main)
