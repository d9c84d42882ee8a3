"""Supervised fine-tuning of LLaVA: projector pretraining, SFT of projector + LLM, and the LoRA RL-init
stage (SPEC §3). One process or torchrun; exact resume.

Single process (the tiny world, from scratch; vision tower trained too):
    python sft.py --preset tiny --data_path tiny_out/sft.json --image_folder tiny_out/images \
        --tokenizer tiny_out/tokenizer.model --out_dir runs/sft
One node, 8 GPUs, LLaVA-RLHF 7B SFT from a LLaVA-1.5 / Vicuna checkpoint (FSDP for full fine-tuning):
    torchrun --nproc_per_node=8 sft.py --preset llava-rlhf-7b --model_path /ckpt/llava-v1.5-7b \
        --vision_tower /ckpt/clip-vit-large-patch14 --tokenizer /ckpt/vicuna-7b-v1.5 \
        --data_path data/sft_mix.json --image_folder data/images --fsdp true --out_dir runs/sft7b
Projector pretraining (LLaMA folder + CLIP folder, fresh projector):
    torchrun --nproc_per_node=8 sft.py --preset llava-rlhf-7b-pretrain --model_path /ckpt/vicuna-7b-v1.5 \
        --vision_tower /ckpt/clip-vit-large-patch14 --data_path blip_558k.json --image_folder images
RL-init LoRA on the SFT model:
    torchrun --nproc_per_node=8 sft.py --preset llava-rlhf-7b-rlinit --model_path runs/sft7b/final ...
Resume after a stop (SIGTERM/SIGINT write a checkpoint first): add --resume true.
Before paying for GPUs, the peak memory per GPU of one step at full size (no weights, CPU, seconds):
    python rehearse.py --stage sft --preset llava-rlhf-13b --ranks 8     (any flag above)
Multi-node: torchrun --nnodes=2 --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 ...
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import dataclass, asdict

import torch
import torch.distributed as dist

import common
import data
import model as M


@dataclass
class Config:
    preset: str = ""                     # a named set of defaults (PRESETS below); later flags override it
    # data
    data_path: str = ""                 # LLaVA-format conversations (.json or .jsonl)
    image_folder: str = ""              # images are looked up here by their "image" field
    eval_data_path: str = ""            # held-out conversations; empty: take eval_size records from data_path
    eval_size: int = 0                  # records held out from data_path when eval_data_path is empty
    tokenizer: str = ""                 # tokenizer.model or a folder holding it (default: model_path)
    system: str = data.VICUNA_V1_SYSTEM # the system sentence of the conversation template
    max_len: int = 1280                 # ids per sample, the image counted as one (SPEC §9, model_max_length)
    on_error: str = "raise"             # bad records: raise (name file + record) or skip (counted)
    num_workers: int = 2                # DataLoader processes reading, decoding and collating batches ahead of
    #                                     the step (pinned memory on GPU); 0: read in the training process
    # model
    model_path: str = ""                # local checkpoint folder (Llava, original LLaVA or LLaMA layout)
    vision_tower: str = ""              # local CLIP folder (original LLaVA layout / building from parts)
    model_preset: str = ""              # build a fresh model from a model.py preset instead (tiny world)
    dtype: str = "auto"                 # auto: bf16 weights on GPU, fp32 on CPU
    mode: str = "sft"                   # pretrain (projector) | sft (projector + LLM) | lora (RL init)
    train_vision: bool = False          # also train the vision tower (the tiny world has no pretrained CLIP)
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    # optimisation
    lr: float = 2e-5
    min_lr_ratio: float = 0.0           # cosine decays to lr * this
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    epochs: float = 3.0
    max_steps: int = 0                  # > 0 overrides epochs
    global_batch: int = 128             # sequences per optimizer step over all ranks
    micro_batch: int = 4                # sequences per forward per rank; accumulation = global/(micro*world)
    grad_clip: float = 1.0
    grad_ckpt: bool = False
    compile: bool = False
    fsdp: bool = False                  # shard with PyTorch's fully_shard (full fine-tuning of 7B/13B)
    # run
    out_dir: str = "runs/sft"
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 500
    keep_last: int = 2
    divergence_check: bool = True       # stop when loss/grad-norm leave their recent range (common.Divergence)
    resume: str = "false"               # true: continue from the newest good checkpoint (stop if none); auto: also start fresh if none
    overwrite: bool = False             # a fresh run (resume false) may delete the checkpoints and logs already in out_dir
    stop_at_step: int = 0               # write a checkpoint and stop after this step (0: run to the end)
    logger: str = "none"                # none | wandb | tensorboard (JSON lines are always written)
    progress: bool = True


_RLHF_SFT = dict(lr=2e-5, epochs=3.0, warmup_ratio=0.03, global_batch=128, max_len=1280, mode="sft", fsdp=True,
                 grad_ckpt=True)
PRESETS = {
    # SPEC §7's measured tiny setup: from scratch, vision trained, batch 32, lr 1.5e-3
    "tiny": dict(model_preset="tiny", mode="sft", train_vision=True, lr=1.5e-3, warmup_ratio=0.02,
                 min_lr_ratio=0.1, epochs=1.0, global_batch=32, micro_batch=32, max_len=193, weight_decay=0.0,
                 eval_size=256, eval_every=100, save_every=200, log_every=20, grad_clip=1.0),
    # micro batches and checkpointing: what `python rehearse.py` shows to fit 80 GB GPUs (8 ranks; README)
    "llava-rlhf-7b-pretrain": dict(mode="pretrain", lr=2e-3, epochs=1.0, global_batch=256, max_len=2048,
                                   grad_ckpt=True),
    "llava-rlhf-13b-pretrain": dict(mode="pretrain", lr=2e-3, epochs=1.0, global_batch=256, max_len=2048,
                                    grad_ckpt=True),
    "llava-rlhf-7b": dict(_RLHF_SFT, micro_batch=4),
    "llava-rlhf-13b": dict(_RLHF_SFT, micro_batch=2),
    "llava-rlhf-7b-rlinit": dict(mode="lora", lr=1e-4, epochs=1.0, global_batch=128, lora_r=64, lora_alpha=16.0,
                                 grad_ckpt=True),
    "llava-rlhf-13b-rlinit": dict(mode="lora", lr=1e-4, epochs=1.0, global_batch=128, lora_r=64, lora_alpha=16.0,
                                  micro_batch=2, grad_ckpt=True),
}


def template_for(cfg: Config) -> data.Template:
    """The conversation template of a stage: pretraining renders LLaVA's plain `<image>CAPTION\\n` (SPEC §2-3),
    sft and lora the Vicuna v1 template with the configured system sentence."""
    return data.PLAIN_TEMPLATE if cfg.mode == "pretrain" else data.Template(system=cfg.system)


def set_trainable(m: M.LLaVA, cfg: Config) -> None:
    """pretrain: projector; sft: projector + LLM; lora: a fresh 'default' adapter. Vision by setting."""
    if cfg.mode not in ("pretrain", "sft", "lora"):
        raise common.ConfigError(f"--mode must be pretrain, sft or lora, got {cfg.mode!r}")
    m.requires_grad_(False)
    if cfg.mode == "lora":
        m.add_adapter("default", r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      targets=tuple(cfg.lora_targets.split(",")))
        m.set_adapter("default")
        for p in m.adapter_parameters("default"):
            p.requires_grad_(True)
        return
    m.projector.requires_grad_(True)
    if cfg.mode == "sft":
        m.llm.requires_grad_(True)
        m.lm_head.requires_grad_(True)
    if cfg.train_vision:
        m.vision.requires_grad_(True)
        # what LLaVA never runs gets no gradient: the layers after the feature layer, the final norm
        vc = m.config
        m.vision.post_layernorm.requires_grad_(False)
        for layer in m.vision.encoder.layers[vc.vision_feature_layer % (vc.vision_layers + 1):]:
            layer.requires_grad_(False)


class SFTLoss(torch.nn.Module):
    """LLaVA + next-token NLL in one forward, so DDP/FSDP/compile wrap the whole computation. The lm_head
    is applied in chunks (token_logprobs): no (B, T, V) fp32 logits."""

    def __init__(self, m: M.LLaVA):
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor, images: torch.Tensor | None, mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """-> sum of NLL over supervised tokens (labels != -100), fp32 scalar."""
        h = self.m.hidden_states(ids, images, mask)[:, :-1]                 # (B, T-1, D)
        tgt = labels[:, 1:]                                                 # (B, T-1)
        sup = tgt != data.IGNORE_INDEX
        if M.has_values(sup):
            # only supervised positions go through the lm_head: answers are a small part of each sequence
            h, tgt = h[sup][None], tgt[sup][None]                           # (1, N, D), (1, N)
        # (the rehearsal's fake labels have no values: every position counts, the worst case)
        lp = M.token_logprobs(h, self.m.lm_head.weight, tgt, fused=True)  # fp32
        return -lp.sum()


def wrap_model(m: M.LLaVA, cfg: Config, d: common.Dist, dtype: torch.dtype, mesh=None):
    """The module the loop trains: SFTLoss(m), sharded with FSDP (--fsdp) or replicated with DDP whenever
    a process group is up (torchrun, any number of ranks), and compiled inside the DDP wrapper
    (--compile), so that the loop still holds the DDP module for no_sync. -> (train_m, the DDP module or
    None). FSDP computes in `dtype` (the loaded weights', bf16 on GPU) over fp32 master weights and
    reduces gradients in fp32. `mesh`: FSDP's device mesh (the rehearsal's fake one); default all ranks."""
    train_m: torch.nn.Module = SFTLoss(m)
    if cfg.fsdp and dist.is_initialized():
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
        kw = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
        for layer in m.llm.layers:
            fully_shard(layer, **kw)
        fully_shard(train_m, **kw)
        return (torch.compile(train_m) if cfg.compile else train_m), None
    if cfg.compile:
        train_m = torch.compile(train_m)
    if not dist.is_initialized():
        return train_m, None
    ddp = torch.nn.parallel.DistributedDataParallel(train_m, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return ddp, ddp


def sft_loss_sum(loss_m: torch.nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, int]:
    """(sum of NLL over the batch's supervised tokens, their count)."""
    images = batch["images"].to(device) if batch["images"] is not None else None
    labels = batch["labels"].to(device)
    s = loss_m(batch["input_ids"].to(device), images, batch["attention_mask"].to(device), labels)
    return s, int((labels[:, 1:] != data.IGNORE_INDEX).sum())


def evaluate(train_m, loader_batches, device, dtype: torch.dtype) -> float:
    train_m.eval()
    tot, n = torch.zeros(()), torch.zeros(())
    with torch.no_grad():
        for batch in loader_batches:
            with common.autocast(device, dtype):
                s, k = sft_loss_sum(train_m, batch, device)
            tot += s.float().cpu()
            n += k
    tot, n = common.all_reduce_sum(tot), common.all_reduce_sum(n)
    train_m.train()
    return float(tot / n.clamp(min=1))


def validate(cfg: Config) -> None:
    """Every flag checked before anything loads or is written: ConfigError naming the flag and its value."""
    common.check_config(
        cfg, required=("data_path",),
        positive=("max_len", "lora_r", "lora_alpha", "lr", "epochs", "global_batch", "micro_batch", "log_every"),
        # 0 turns off: eval_every, save_every, stop_at_step, grad_clip; keep_last 0 keeps every checkpoint
        nonneg=("eval_size", "num_workers", "weight_decay", "max_steps", "grad_clip", "eval_every", "save_every", "keep_last",
                "stop_at_step"),
        fractions=("min_lr_ratio", "warmup_ratio", "lora_dropout", "beta1", "beta2"),
        choices={"mode": ("pretrain", "sft", "lora"), "on_error": ("raise", "skip"),
                 "dtype": ("auto", *M.DTYPES), "logger": ("none", "wandb", "tensorboard"),
                 "model_preset": ("", *M.PRESETS)},
        files=("data_path", "eval_data_path"), dirs=("image_folder", "model_path", "vision_tower"),
        out_dirs=("out_dir",), device="device")
    for name in ("beta1", "beta2"):   # AdamW's betas are in [0, 1)
        if getattr(cfg, name) >= 1:
            raise common.ConfigError(f"--{name} must be < 1, got {getattr(cfg, name)!r}")
    if not cfg.model_path and not cfg.model_preset:
        raise common.ConfigError("--model_path is required (a local checkpoint folder), or --model_preset")
    if not cfg.lora_targets.strip(","):
        raise common.ConfigError(f"--lora_targets names no module, got {cfg.lora_targets!r}")
    common.check_tokenizer(cfg)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = common.parse_config(Config, argv, PRESETS)
    validate(cfg)
    d = common.start_run(cfg)
    accum = common.accumulation(cfg.global_batch, cfg.micro_batch, d.world)   # the geometry, before any load

    # -- data -----------------------------------------------------------------------------------------
    tok = data.Tokenizer(cfg.tokenizer or cfg.model_path)
    template = template_for(cfg)
    skips = data.Skips()
    records = data.read_sft(cfg.data_path, image_folder=cfg.image_folder, on_error=cfg.on_error, skips=skips)
    if cfg.eval_data_path:
        eval_records = data.read_sft(cfg.eval_data_path, image_folder=cfg.image_folder, on_error=cfg.on_error,
                                     skips=skips)
    else:
        # a fixed, seed-independent held-out slice so runs with different seeds compare
        eval_records, records = records[:cfg.eval_size], records[cfg.eval_size:]

    # -- model ----------------------------------------------------------------------------------------
    m = M.load_model(cfg.model_path, cfg.vision_tower, cfg.model_preset, tok.vocab_size, cfg.dtype,
                     d.device, cfg.seed)
    if m.config.vocab_size < tok.vocab_size:
        raise common.ConfigError(f"--tokenizer {tok.path}: it has {tok.vocab_size} tokens but the model's vocabulary is {m.config.vocab_size}")
    compute_dtype = next(m.parameters()).dtype   # the loaded weights' (autocast); what trains is kept in fp32
    set_trainable(m, cfg)
    m.gradient_checkpointing = cfg.grad_ckpt
    m.train()
    params = common.fp32_trainable([p for p in m.parameters() if p.requires_grad])
    if common.is_main():
        print(f"model: {M.count_params(m) / 1e6:.2f}M parameters, {sum(p.numel() for p in params) / 1e6:.2f}M "
              f"trainable ({cfg.mode}); {m.num_image_tokens} image tokens")

    ds = data.SFTDataset(records, tok, template, cfg.image_folder, m.config.image_size, m.num_image_tokens,
                         cfg.max_len, on_error=cfg.on_error, skips=skips)
    eval_ds = data.SFTDataset(eval_records, tok, template, cfg.image_folder, m.config.image_size,
                              m.num_image_tokens, cfg.max_len, on_error=cfg.on_error, skips=skips)

    # -- batch geometry ----------------------------------------------------------------------------------
    sampler = data.ResumableSampler(len(ds), rank=d.rank, world_size=d.world, seed=cfg.seed, shuffle=True,
                                    drop_last=True)
    steps_per_epoch = len(ds) // cfg.global_batch
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(ds)} usable records is fewer than one global batch ({cfg.global_batch})", cfg.data_path)
    total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    warmup = int(cfg.warmup_ratio * total_steps)

    # -- wrap for distributed training ------------------------------------------------------------------
    train_m, ddp = wrap_model(m, cfg, d, compute_dtype)
    params = [p for p in train_m.parameters() if p.requires_grad]   # after fully_shard: its DTensors
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            foreach=True)

    # -- checkpoints: resume, save_every, SIGTERM ---------------------------------------------------------
    watch = common.Divergence(cfg.out_dir, cfg.divergence_check, ceiling={"loss": math.log(m.config.vocab_size)})
    ck = common.Checkpointer(cfg, m, opt, sampler, watch=watch)   # under FSDP m's parameters are the shards: saved whole
    step = 0
    if state := ck.start():   # as --resume says: fresh, resumed, or refused
        step = state["step"]

    logger = common.MetricsLogger(cfg.out_dir, cfg.logger, "sft", asdict(cfg))
    bar = common.Progress(total_steps, "sft", start=step, enabled=cfg.progress)
    # batches read ahead in worker processes; the sampler checkpoints save advances as they are trained on
    collate, pin = functools.partial(data.collate_right, pad_id=tok.pad_id), d.device.type == "cuda"
    loader = data.BatchLoader(ds, sampler, cfg.micro_batch, collate, cfg.num_workers, pin_memory=pin)
    # the held-out batches are read at each evaluation, never all held in memory
    eval_batches = data.FixedBatches(eval_ds, [list(range(i, min(i + cfg.micro_batch, len(eval_ds))))
                                               for i in range(d.rank * cfg.micro_batch, len(eval_ds),
                                                              cfg.micro_batch * d.world)],
                                     collate, cfg.num_workers, pin_memory=pin)

    def next_batch() -> dict:
        return loader.next()

    loss_val = last_eval = None   # None: not measured in this process (a resume at the last step)
    if step >= total_steps and common.is_main():
        print(f"already at step {step} of {total_steps}: nothing left to train; writing the final model")
    t_last, tokens_seen = time.time(), 0
    while step < total_steps:
        lr = common.cosine_lr(step, total_steps, warmup, cfg.lr, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = [next_batch() for _ in range(accum)]
        # normalise by the global count of supervised tokens: same result for any number of ranks
        n_local = sum(int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in batches)
        n_global = float(common.all_reduce_sum(torch.tensor(float(n_local))))
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            sync = i == accum - 1
            ctx = ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext()
            with ctx, common.autocast(d.device, compute_dtype):
                s, _ = sft_loss_sum(train_m, batch, d.device)
                # DDP/FSDP average gradients over ranks; scale back up to a global token mean
                loss = s * d.world / max(n_global, 1.0)
            loss.backward()
            loss_sum += float(s.detach())
            tokens_seen += int(batch["attention_mask"].sum())
        loss_val = float(common.all_reduce_sum(torch.tensor(loss_sum))) / max(n_global, 1.0)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        # before the update: diverged weights are not trained on (their checkpoint, if written, is set aside)
        watch.check(step, loss=loss_val, grad_norm=float(gnorm) if cfg.grad_clip > 0 else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        metrics = {"loss": loss_val, "lr": lr, "grad_norm": float(gnorm)}
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps) and len(eval_ds):
            last_eval = evaluate(train_m, eval_batches, d.device, compute_dtype)
            metrics["eval_loss"] = last_eval
        if step % cfg.log_every == 0 or step == total_steps or "eval_loss" in metrics:
            dt = time.time() - t_last
            metrics["tokens_per_s"] = tokens_seen * d.world / max(dt, 1e-9)
            t_last, tokens_seen = time.time(), 0
            logger.log(step, metrics)
        bar.update(1, loss=loss_val, lr=lr, **({"eval": last_eval} if "eval_loss" in metrics else {}))
        if ck.after_step(step):   # saved every save_every steps; a signal or stop_at_step: saved, stop
            loader.close()
            common.cleanup_distributed()
            return {"step": step, "loss": loss_val, "stopped": True}
    bar.close()
    loader.close()

    # -- final model -------------------------------------------------------------------------------------
    ck.finish(step)
    final = os.path.join(cfg.out_dir, "final")
    if cfg.fsdp and dist.is_initialized():
        m = unsharded_copy(train_m, m.config)   # collective; rank 0 gets a plain model, others None
    if common.is_main():
        if cfg.mode == "lora":
            m.save_adapter(os.path.join(cfg.out_dir, "final_adapter"), "default")
        else:
            common.save_model_dir(m.to(compute_dtype), final, tok.path)   # one dtype again, the base's
        losses = "".join(f", {what} {v:.4f}" for what, v in (("final train loss", loss_val), ("eval loss", last_eval))
                         if v is not None)
        print(f"done: {step} steps{losses}; skipped records: {skips.count}")
        if skips.count:
            skips.report()
    common.cleanup_distributed()
    return {"step": step, "loss": loss_val, "eval_loss": last_eval, "stopped": False}


def unsharded_copy(train_m: torch.nn.Module, cfg: M.ModelConfig) -> M.LLaVA | None:
    """Gather an FSDP model into a plain LLaVA on rank 0 (built on meta, tensors assigned)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(train_m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not common.is_main():
        return None
    with torch.device("meta"):
        plain = M.LLaVA(cfg)
    plain.load_state_dict({k[len("m."):]: v for k, v in full.items()}, assign=True)
    return plain


if __name__ == "__main__":
    common.run_cli(main)
