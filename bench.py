"""Benchmarks: our LLaVA against transformers' LlavaForConditionalGeneration, side by side in ONE run.

    python bench.py                 # CPU config of the issue (fp32): table, summary, scaling (~10 min on 2 cores)
    python bench.py --quick         # tiny config, a smoke test (< 1 min)
    python bench.py --scaling full  # the whole scaling grid: batch 1..32, +32..512 (much longer); off: none
    python bench.py --no-compile    # skip the torch.compile rows
    python bench.py --threads 1     # intra-op threads (default: torch's default)
    python bench.py --gpu-check     # one CUDA GPU: 7B-shaped bf16 model vs the hardware floor (< 8 min on an H100)

What is measured (same weights, same inputs, warm-up first, interleaved repeats, medians):
  * generation: prompts [BOS, image, text], greedy, a fixed number of new tokens (no EOS stop) -
    ours eager, ours compiled (decode step through torch.compile over a static KV cache; on CPU
    every linear through oneDNN with prepacked weights, kernels.use_packed_cpu_linear), and
    transformers' generate; the three must produce identical tokens (asserted). Reported twice:
    end to end (prefill + decode) and decode steps only ((t[N new] - t[1 new]) / (N - 1)).
  * training step: forward + backward of the next-token loss on the text of [BOS, image, text]
    sequences, vision tower frozen (as in LLaVA fine-tuning); ours is sft.SFTLoss, the SFT stage's own
    loss (lm_head fused with the log-probs, run on labelled rows only), theirs is the model's own loss
    from `labels`.
  * a training step on right-padded rows at the paper's geometry (the image's tokens + 448..896 text
    tokens; bench_padding): ours as it runs (no attention mask, SDPA's is_causal path) against the same
    step with the padding mask; same loss asserted.
  * a PPO step split into generation / scoring / update with each phase's peak memory, through ppo.py's
    own rollout, advantages and update (see bench_ppo: LoRA policy sampling at temperature 1; policy,
    reference, value and reward passes; ppo_epochs of clipped-PPO + value-loss backward through the
    LoRA parameters and AdamW steps). Its update's arithmetic is counted for both sides
    (ppo_update_flops), and the summary says what bounds the ratio (update_bound).
  * ceilings: the machine's measured matmul FLOP/s, the faster of BLAS (a @ b) and, on CPU, oneDNN
    with a prepacked operand (MFU = useful model FLOP/s over it), and memory
    copy bandwidth (the decode floor: bytes that must be read per step / bandwidth).
  * the CPU linear path of the compiled rows: kernels.cpu_linear_plan's choice per shape class (decode,
    prefill) between MKL and prepacked oneDNN, measured on this model's linear shapes or read from its cache.
  * data loading: JPEGs read through data.BatchLoader in the step (workers 0) and in 2 workers, around a
    fake step as long as reading a batch (bench_data_loading).
  * a summary of the ratios: PPO step vs the official way (and its update's FLOPs and FLOP/s against
    the official way's), generation vs transformers, decode step vs the floor; then the scaling table
    (bench_scaling: generation and the PPO step against batch and new tokens, ours and the baseline;
    markdown) and its plot (--plot, plots.py).
Peak memory is the process's peak RSS during the phase on CPU (reset through /proc/self/clear_refs)
and torch.cuda.max_memory_allocated on GPU. This machine may be shared: the header prints the load
average, and the numbers are medians of interleaved runs so that a burst hits all contenders alike.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, replace
from functools import partial
from statistics import median as med
from typing import Callable

import torch
import torch.nn.functional as F

import common
import data
import kernels
import model
import ppo
import sft
from model import IMAGE_TOKEN_INDEX, LLaVA, ModelConfig


# ----------------------------------------------------------------------------------------------------
# Configurations

@dataclass
class BenchConfig:
    model: ModelConfig
    batch: int = 8
    text_tokens: int = 40        # prompt = BOS + image + (text_tokens - 1) text tokens
    new_tokens: int = 64
    train_seq: int = 512         # training sequences: BOS + image + text, text labelled
    iters: int = 3               # timed repeats (after one warm-up)
    lora_r: int = 64


CPU_MODEL = ModelConfig(image_size=224, patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
                        vision_intermediate=1024, projector="mlp2x_gelu", hidden=512, layers=8, heads=8,
                        kv_heads=8, intermediate=1376, vocab_size=32064, max_seq_len=2048,
                        image_token_index=32063)
CPU = BenchConfig(CPU_MODEL)
PPO_TARGET = 2.5   # issue #20's goal for the PPO step against the official way
QUICK = BenchConfig(ModelConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=4,
                                vision_intermediate=64, projector="mlp2x_gelu", hidden=64, layers=2, heads=4,
                                kv_heads=2, intermediate=128, vocab_size=512, max_seq_len=256,
                                image_token_index=511),
                    batch=2, text_tokens=8, new_tokens=8, train_seq=48, iters=2, lora_r=8)


# ----------------------------------------------------------------------------------------------------
# Measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator peak on GPU; on CPU the process's peak RSS (VmHWM, reset
    through /proc/self/clear_refs; without that, peak_memory is the lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Bytes at the peak since reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)


def interleaved(fns: dict, iters: int, device: torch.device, warmup: int = 0) -> tuple[dict, dict]:
    """Run every fn `warmup` times, then `iters` rounds of each in turn. -> (seconds per call,
    peak memory per fn over its timed calls). Interleaving spreads a burst of load from other
    processes over all contenders instead of one."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, int] = {k: 0 for k in fns}
    for _ in range(iters):
        for k, f in fns.items():
            sync(device)
            reset_peak_memory(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
            peaks[k] = max(peaks[k], peak_memory(device))
    return times, peaks


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Measured matmul FLOP/s (square matmul in `dtype`) and memory copy bandwidth (read + write)."""
    n = 8192 if device.type == "cuda" else 2048 if dtype == torch.float32 else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    flops = 2 * n ** 3 / best_time(lambda: a @ b, device, rounds=3, reps=reps)
    out = {"matmul_flops": flops, "matmul_flops_blas": flops}
    if device.type == "cpu" and kernels.packed_cpu_linear_available() and dtype == torch.float32:
        # the machine's peak is what its fastest GEMM reaches: MKL (a @ b) runs a generic path on
        # non-Intel CPUs, oneDNN with a prepacked operand (kernels.linear's packed path) may go twice as fast
        with torch.no_grad(), kernels.packed_cpu_linear():
            bt = b.t().contiguous()
            out["matmul_flops_onednn"] = 2 * n ** 3 / best_time(lambda: kernels.linear(a, bt), device, 3, reps)
            out["matmul_flops"] = max(flops, out["matmul_flops_onednn"])
    a = b = bt = None   # freed before the copy test
    numel = (1 << 30 if device.type == "cuda" else 1 << 26) // 4   # 1 GiB on GPU, 64 MiB on CPU (fp32)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    out["copy_bytes_per_s"] = 2 * numel * 4 / best_time(lambda: dst.copy_(src), device, rounds=5, reps=1)
    return out


def best_time(fn, device: torch.device, rounds: int, reps: int) -> float:
    """Seconds per call of fn: one warm-up call, then the fastest of `rounds` rounds of `reps` calls
    (a ceiling, not a typical value)."""
    fn()
    ts = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        ts.append((time.perf_counter() - t0) / reps)
    return min(ts)


# ----------------------------------------------------------------------------------------------------
# FLOP accounting (multiply-add = 2 FLOPs; what the task needs, whoever computes more)

def _vision_layer_params(c: ModelConfig) -> int:
    d, di = c.vision_hidden, c.vision_intermediate
    return 4 * d * d + 2 * d * di


def _llm_layer_params(c: ModelConfig) -> int:
    hd = c.head_dim
    return c.hidden * (c.heads * hd) * 2 + c.hidden * (c.kv_heads * hd) * 2 + 3 * c.hidden * c.intermediate


def _projector_params(c: ModelConfig) -> int:
    return c.vision_hidden * c.hidden + (c.hidden * c.hidden if c.projector == "mlp2x_gelu" else 0)


def vision_flops(c: ModelConfig, n_images: int) -> float:
    """Forward of the layers LLaVA uses (up to vision_feature_layer) plus the projector."""
    n = c.vision_grid ** 2 + 1
    used = c.vision_feature_layer % (c.vision_layers + 1)
    per_layer = 2 * _vision_layer_params(c) * n + 4 * n * n * c.vision_hidden
    patch = 2 * 3 * c.patch_size ** 2 * c.vision_hidden * (n - 1)
    return n_images * (used * per_layer + patch + 2 * _projector_params(c) * c.num_image_tokens)


def _attention_flops(c: ModelConfig, batch: int, T: int) -> float:
    """QK^T and PV of a causal forward over B x T tokens, the causal half."""
    return 2 * c.layers * batch * T * T * c.hidden


def llm_forward_flops(c: ModelConfig, batch: int, T: int, head_rows: int) -> float:
    """Causal forward over B x T tokens; the lm_head on `head_rows` rows."""
    body = 2 * c.layers * _llm_layer_params(c) * batch * T
    return body + _attention_flops(c, batch, T) + 2 * c.vocab_size * c.hidden * head_rows


def decode_step_flops(c: ModelConfig, batch: int, context: int) -> float:
    return batch * (2 * c.layers * _llm_layer_params(c) + 2 * c.vocab_size * c.hidden + 4 * c.layers * context * c.hidden)


def train_flops(c: ModelConfig, batch: int, T: int, labelled: int, images: bool = True) -> float:
    """Forward + backward (x3) of the LLM and projector, the frozen vision tower forward only."""
    llm = 3 * llm_forward_flops(c, batch, T, labelled)
    if not images:
        return llm
    # vision_flops holds the projector's forward; its backward is twice that
    return llm + vision_flops(c, batch) + 2 * 2 * _projector_params(c) * c.num_image_tokens * batch


def _lora_io(c: ModelConfig) -> int:
    """in + out features summed over one layer's LoRA targets (all seven)."""
    q, kv, d = c.heads * c.head_dim, c.kv_heads * c.head_dim, c.hidden
    return (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + c.intermediate) + (c.intermediate + d)


def adapter_train_flops(c: ModelConfig, batch: int, T: int, head_rows: int, lora_r: int) -> float:
    """Forward + backward of one pass over B x T tokens (image features given) through the frozen base with
    a rank-lora_r adapter on every target, the lm_head on `head_rows` rows, training the adapter only. The
    backward: input gradients through every frozen matmul (1x its forward) but layer 0's q, k, v (their
    input, the embeddings, needs none), the adapter's weight and input gradients (2x its forward, less
    layer 0's input gradients) and attention (2x its forward: the four matmuls of its gradients; a flash
    kernel also recomputes the scores)."""
    tokens = batch * T
    base = llm_forward_flops(c, batch, T, head_rows)              # frozen matmuls, attention, lm_head
    lora = 2 * c.layers * lora_r * _lora_io(c) * tokens
    first_qkv = 2 * c.hidden * (c.heads + 2 * c.kv_heads) * c.head_dim * tokens
    first_lora_in = 2 * lora_r * 3 * c.hidden * tokens
    fwd = base + lora
    return fwd + (base - first_qkv) + _attention_flops(c, batch, T) + (2 * lora - first_lora_in)


def ppo_update_flops(c: ModelConfig, batch: int, T: int, R: int, lora_r: int, epochs: int, official: bool) -> float:
    """The arithmetic of ppo.update on B rows of T tokens, R of them response positions: per epoch a policy
    pass (log-probs: the lm_head on the R response rows) and a value pass (no lm_head), each forward +
    adapter-only backward, over image features computed in the rollout. The official way: the lm_head on all
    T rows of the policy pass (the whole (B, T, V) logits), and the vision tower and projector again in
    each pass (forward only: frozen)."""
    pol = adapter_train_flops(c, batch, T, batch * (T if official else R), lora_r)
    val = adapter_train_flops(c, batch, T, 0, lora_r)
    return epochs * (pol + val + (2 * vision_flops(c, batch) if official else 0))


def decode_bytes(m: LLaVA, batch: int, context: int) -> int:
    """Bytes one decode step must read at least: every LLM weight but the embedding table (B rows of
    it), and the keys and values of `context` positions."""
    c = m.config
    el = next(m.parameters()).element_size()
    w = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("llm.", "lm_head.")) and "lora_" not in n)
    w -= m.llm.embed_tokens.weight.numel() - batch * c.hidden
    kv = 2 * c.layers * batch * context * c.kv_heads * c.head_dim
    return (w + kv) * el


# ----------------------------------------------------------------------------------------------------
# Models and inputs

def init_weights(m: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """transformers' LLaMA/LLaVA init: N(0, std) matrices and embeddings, zero biases, unit norms. Drawn in
    place on the parameters' device (no CPU copy of a 7B model's weights)."""
    g = torch.Generator(device=next(m.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2 or name.endswith("class_embedding"):
                p.normal_(0.0, std, generator=g)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def make_inputs(cfg: BenchConfig, text_len: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[BOS, image tokens, text] rows, no padding. -> ids (B, T), images (B, 3, S, S), mask."""
    c = cfg.model
    g = torch.Generator().manual_seed(seed)
    B, P = cfg.batch, c.num_image_tokens
    text = torch.randint(3, min(c.vocab_size - 1, 32000), (B, text_len), generator=g)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), torch.full((B, P), IMAGE_TOKEN_INDEX), text], 1)
    images = torch.randn(B, 3, c.image_size, c.image_size, generator=g)
    return ids.to(device), images.to(device), torch.ones_like(ids).to(device)


def load_reference(m: LLaVA, workdir: str):
    """transformers' Llava with exactly our weights: saved by us, loaded by them."""
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    m.save_pretrained(workdir)
    ref = LlavaForConditionalGeneration.from_pretrained(workdir, attn_implementation="sdpa",
                                                        dtype=next(m.parameters()).dtype)
    return ref.eval()


def to_hf(ids: torch.Tensor, image_token_index: int) -> torch.Tensor:
    return ids.masked_fill(ids == IMAGE_TOKEN_INDEX, image_token_index)


# ----------------------------------------------------------------------------------------------------
# Table

class Table:
    def __init__(self):
        self.rows: list[tuple[str, ...]] = []

    def add(self, what: str, impl: str, seconds: float | None = None, tok_s: float | None = None,
            vs_ref: float | None = None, mfu: float | None = None, peak: int | None = None, note: str = ""):
        self.rows.append((what, impl, "" if seconds is None else f"{seconds:.4g}",
                          "" if tok_s is None else f"{tok_s:,.0f}", "" if vs_ref is None else f"{vs_ref:.2f}x",
                          "" if mfu is None else f"{100 * mfu:.1f}%",
                          "" if peak is None else f"{peak / 2**30:.2f}", note))

    def render(self) -> str:
        head = ("measurement", "impl", "time s", "tokens/s", "vs transformers", "MFU", "peak GiB", "note")
        cols = list(zip(head, *self.rows))
        widths = [max(len(x) for x in col) for col in cols]
        fmt = lambda r: " | ".join(x.ljust(w) if i in (0, 1, 7) else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
        sep = "-+-".join("-" * w for w in widths)
        return "\n".join([fmt(head), sep] + [fmt(r) for r in self.rows])


# ----------------------------------------------------------------------------------------------------
# Generation

def bench_generation(m: LLaVA, ref, cfg: BenchConfig, table: Table, ceil: dict, device, compile: bool) -> dict:
    """Rows in `table`. -> {"seconds": {impl: end to end}, "step_ms": {impl: decode ms/step}, "floor_ms": the
    decode step's floor (decode_bytes at the mean context / copy bandwidth)}."""
    c = cfg.model
    ids, images, mask = make_inputs(cfg, cfg.text_tokens - 1, seed=0, device=device)
    hf_ids = to_hf(ids, c.image_token_index)
    B, T, N = cfg.batch, ids.shape[1], cfg.new_tokens

    def ours(comp: bool):
        return lambda n: m.generate(ids, images, mask, max_new_tokens=n, temperature=0.0, eos_token_id=-1,
                                    compile=comp)

    def theirs(n: int):
        # no EOS: every row runs all n steps, as ours does with eos_token_id=-1
        return ref.generate(input_ids=hf_ids, pixel_values=images, attention_mask=mask, max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)[:, T:]

    runs = {"transformers": theirs, "ours eager": ours(False)}   # name -> (new tokens -> tokens)
    dec = None
    if compile:
        runs["ours compiled"] = ours(True)
        dec = kernels.static_decoder(m, compile=True)
        t0 = time.perf_counter()
        runs["ours compiled"](N)   # compiles the decode step for this (batch, cache length)
        compile_s = time.perf_counter() - t0

    # tokens: identical across implementations (greedy, same weights)
    with torch.no_grad():
        want = theirs(N)
    for k, run in list(runs.items())[1:]:
        got = run(N)
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].tolist()
            raise AssertionError(f"{k} greedy tokens differ from transformers at (row, step) {bad}")

    fns = {k: partial(run, N) for k, run in runs.items()} | {k + " 1": partial(run, 1) for k, run in runs.items()}
    with torch.no_grad():   # the token check above was the warm-up
        times, peaks = interleaved(fns, cfg.iters, device)
    prefill_flops = llm_forward_flops(c, B, T, B) + vision_flops(c, B)
    dflops = sum(decode_step_flops(c, B, T + i + 1) for i in range(N - 1))
    flops = prefill_flops + dflops
    ref_e2e = med(times["transformers"])
    ref_dec = max(ref_e2e - med(times["transformers 1"]), 1e-9)
    for k in runs:
        t = med(times[k])
        table.add(f"generate B={B} prompt={T} +{N} greedy", k, t, B * N / t, ref_e2e / t,
                  flops / t / ceil["matmul_flops"], peaks[k], "prefill + decode")
    floor = decode_bytes(m, B, T + N // 2) / ceil["copy_bytes_per_s"]
    out = {"seconds": {k: med(times[k]) for k in runs}, "step_ms": {}, "floor_ms": 1e3 * floor}
    for k in runs:
        t_dec = max(med(times[k]) - med(times[k + " 1"]), 1e-9)
        out["step_ms"][k] = 1e3 * t_dec / (N - 1)
        table.add(f"  decode steps only (x{N - 1})", k, t_dec, B * (N - 1) / t_dec, ref_dec / t_dec,
                  dflops / t_dec / ceil["matmul_flops"], None,
                  f"{1e3 * t_dec / (N - 1):.1f} ms/step; floor {1e3 * floor:.1f} ms "
                  f"({100 * floor * (N - 1) / t_dec:.0f}% of roofline)")
    # The fastest any implementation could be on this machine: the prefill at the measured matmul peak,
    # each decode step at the slower of its FLOPs at that peak and its bytes at the copy bandwidth. Its
    # ratio to transformers bounds what a speed-up target can ask for here.
    t_floor = prefill_flops / ceil["matmul_flops"]
    t_floor += sum(max(decode_step_flops(c, B, T + i + 1) / ceil["matmul_flops"],
                       decode_bytes(m, B, T + i + 1) / ceil["copy_bytes_per_s"]) for i in range(N - 1))
    table.add("  hardware ceiling (100% of peak)", "bound", t_floor, B * N / t_floor, ref_e2e / t_floor, None, None,
              "prefill at matmul peak + decode at max(FLOPs, bytes) bound: no code can beat this")
    note = "tokens identical to transformers: yes"
    if dec is not None:
        note += f"; decode graphs compiled {dec.compiles} (in {compile_s:.0f}s), recompiles across steps {dec.recompiles}"
    table.add("  greedy tokens", "all", note=note)
    return out


# ----------------------------------------------------------------------------------------------------
# Training step

def bench_training(m: LLaVA, ref, cfg: BenchConfig, table: Table, ceil: dict, device, compile: bool) -> None:
    c = cfg.model
    P = c.num_image_tokens
    ids, images, mask = make_inputs(cfg, cfg.train_seq - 1 - P, seed=1, device=device)
    labels = ids.clone()
    labels[:, :1 + P] = -100          # loss on the text only
    hf_ids = to_hf(ids, c.image_token_index)
    B, T = ids.shape
    labelled = int((labels[:, 1:] != -100).sum())

    for mod, vision in ((m, m.vision), (ref, ref.model.vision_tower)):
        mod.train().requires_grad_(True)
        vision.requires_grad_(False)    # frozen tower, as LLaVA fine-tunes

    losses = {}
    sft_loss = sft.SFTLoss(m)

    def ours():
        m.zero_grad()
        loss = sft_loss(ids, images, mask, labels) / labelled     # SFTLoss sums the NLL, transformers means it
        loss.backward()
        losses["ours"] = loss.item()

    def theirs():
        ref.zero_grad()
        out = ref(input_ids=hf_ids, pixel_values=images, attention_mask=mask, labels=labels)
        out.loss.backward()
        losses["transformers"] = out.loss.item()

    def ours_fused():
        with kernels.fused_kernels():
            ours()

    fns = {"transformers": theirs, "ours": ours}
    notes = {"transformers": "", "ours": "sft.SFTLoss: lm_head fused with the log-probs, labelled rows only"}
    if compile:
        t0 = time.perf_counter()
        ours_fused()                      # compiles the fused kernels (fwd and bwd)
        compile_s, graphs = time.perf_counter() - t0, kernels._graphs_compiled()
        fns["ours compiled"] = ours_fused
    times, peaks = interleaved(fns, cfg.iters, device, warmup=1)
    if compile:
        notes["ours compiled"] = (f"+ fused RMSNorm/rotary/SwiGLU (torch.compile, {compile_s:.0f}s first call); "
                                  f"recompiles while timed {kernels._graphs_compiled() - graphs}")
    if abs(losses["ours"] - losses["transformers"]) > 1e-3 * max(1.0, abs(losses["transformers"])):
        raise AssertionError(f"training losses differ: {losses}")
    for mod in (m, ref):
        mod.zero_grad()
        mod.eval()
    flops = train_flops(c, B, T, labelled)
    t_ref = med(times["transformers"])
    for k in fns:
        t = med(times[k])
        table.add(f"train step fwd+bwd B={B} T={T}", k, t, B * T / t, t_ref / t, flops / t / ceil["matmul_flops"],
                  peaks[k], f"loss {losses['ours' if k == 'ours compiled' else k]:.4f}; "
                  f"{notes[k]}".rstrip("; "))


def bench_padding(m: LLaVA, cfg: BenchConfig, table: Table, device, text_max: int = 896) -> dict:
    """A training step on right-padded rows at the paper's geometry (the image's tokens plus text of
    text_max / 2 .. text_max tokens, as SFT and reward-model batches): ours as it runs (no mask: SDPA's
    is_causal path) against the same step with the explicit padding mask it needed before; the loss on
    real tokens must be the same. Batch cfg.batch // 4 (at least 2): a row here is 1 + P + text_max long."""
    c = cfg.model
    B, P = max(2, cfg.batch // 4), c.num_image_tokens
    g = torch.Generator().manual_seed(3)
    lens = torch.linspace(text_max // 2, text_max, B).long().tolist()
    T = 1 + P + max(lens)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, L in enumerate(lens):
        row = [1] + [IMAGE_TOKEN_INDEX] * P + torch.randint(3, min(c.vocab_size - 1, 32000), (L,), generator=g).tolist()
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    images = torch.randn(B, 3, c.image_size, c.image_size, generator=g).to(device)
    ids, mask = ids.to(device), mask.to(device)
    real = mask[:, 1:].bool() & (ids[:, 1:] != IMAGE_TOKEN_INDEX)          # text targets of real rows
    m.train().requires_grad_(True)
    m.vision.requires_grad_(False)
    losses = {}

    def step(name: str, attn: torch.Tensor | None) -> Callable:
        def run():
            m.zero_grad()
            h = m.decode(m.embed(ids, images), model.positions_from_mask(mask), attn)   # (B, T, D)
            lp = model.token_logprobs(h[:, :-1], m.lm_head.weight, ids[:, 1:].clamp(min=0), fused=True)
            loss = -(lp * real).sum() / real.sum()
            loss.backward()
            losses[name] = loss.item()
        return run
    assert model.causal_or_padded_mask(mask.bool()) is None
    fns = {"ours (no mask)": step("ours (no mask)", None),
           "ours, padding mask": step("ours, padding mask", model.attention_mask_4d(mask.bool()))}
    times, peaks = interleaved(fns, cfg.iters, device, warmup=1)
    m.zero_grad()
    m.eval()
    a, b = losses.values()
    if abs(a - b) > 1e-5 * max(1.0, abs(b)):
        raise AssertionError(f"right-padded losses differ with and without the mask: {losses}")
    t_mask = med(times["ours, padding mask"])
    for k in fns:
        t = med(times[k])
        table.add(f"train step, right padded B={B} T={T}", k, t, int(mask.sum()) / t, None, None, peaks[k],
                  f"{P} image + {lens[0]}..{lens[-1]} text tokens; loss {losses[k]:.6f}; {t_mask / t:.2f}x the masked step")
    return {"T": T, "B": B, "seconds": {k: med(v) for k, v in times.items()}, "losses": losses}


# ----------------------------------------------------------------------------------------------------
# PPO step split

class _WordTokenizer:
    """A stand-in for data.Tokenizer (the bench's random model has no sentencepiece model): one id per
    word, so the reward model reads about as many ids as it would of real text."""
    bos_id, eos_id, pad_id = 1, 2, 0
    decode_response = data.Tokenizer.decode_response   # the real one: cut at EOS, over this decode

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [3 + zlib.crc32(w.encode()) % (self.vocab_size - 4) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


class _HFLoRA(torch.nn.Module):
    """A transformers linear with our LoRALinear's adapters added on top: the same A, B parameters and the
    same active adapter (m.set_adapter switches both models), computed the plain way (peft's forward:
    base(x) + scale * B(A(x))), so that the baseline trains the same LoRA weights as ours."""

    def __init__(self, base: torch.nn.Linear, ours: model.LoRALinear):
        super().__init__()
        self.base, self.ours = base, [ours]   # a list: not registered twice as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, lo = self.base(x), self.ours[0]
        name = lo.active_adapter
        if name is not None:
            y = y + F.linear(F.linear(x, lo.lora_A[name]), lo.lora_B[name]) * lo.lora_scale[name]
        return y


def _hf_with_our_adapters(ref, m: LLaVA) -> None:
    """Every LoRA target of transformers' Llava wrapped to share our model's adapters (_HFLoRA)."""
    for path, mod in m.lora_layers():
        parent_path, leaf = f"model.language_model.{path[len('llm.'):]}".rsplit(".", 1)
        parent = ref.get_submodule(parent_path)
        setattr(parent, leaf, _HFLoRA(getattr(parent, leaf), mod))


def _full_logprobs(ref, ids, pix, mask, resp, P: int) -> torch.Tensor:
    """The official way: the whole (B, T, V) logits of a full forward, log_softmax, gather. -> (B, R)"""
    logits = ref(input_ids=ids, pixel_values=pix, attention_mask=mask,
                 position_ids=model.positions_from_mask(mask)).logits[:, P - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, resp[..., None]).squeeze(-1)


def _last_hidden(ref, ids, pix, mask) -> torch.Tensor:
    out = ref(input_ids=ids, pixel_values=pix, attention_mask=mask, position_ids=model.positions_from_mask(mask),
              output_hidden_states=True)
    return out.hidden_states[-1]           # after the final norm, (B, T, D)


def bench_ppo(m: LLaVA, ref, cfg: BenchConfig, table: Table | None, device, compile: bool, warmup: bool = True,
              strict: bool = True) -> dict:
    """A PPO step through ppo.py's own functions, at ppo.Config's defaults but the bench's batch and greedy
    sampling (so that the baseline's tokens can be compared): rollout (policy, reference and value passes;
    the reward model scores the decoded text through RewardScorer), then advantages and update (ppo_epochs
    passes, clipped policy and value losses, AdamW). One frozen base holds the policy, value and reward
    adapters; the reference is the bare base.
    Against it (ref: transformers' Llava on the same weights, None to skip), the same step the way the
    official trainer does it: transformers' generate, then full forwards of the policy, reference, value
    and reward (the whole (B, T, V) logits, log_softmax; hidden states for the heads), each running the
    vision tower again, and ppo_epochs of full forward + backward for the policy and value losses; the
    same LoRA weights (_HFLoRA), prompts, advantages and optimizer. Asserted (strict; else reported in
    "tokens_identical"): identical greedy tokens and log-probs that agree. warmup=False (the scaling table)
    runs no whole untimed step first, only a generation that compiles the policy's decode graphs.
    -> {"ours": phase seconds, "transformers": phase seconds, "peak": {who: bytes}, "tokens_identical": bool},
    rows in `table`."""
    import reward_model
    c, B, N = cfg.model, cfg.batch, cfg.new_tokens
    ids, images, _ = make_inputs(cfg, cfg.text_tokens - 1, seed=2, device="cpu")
    items = [{"input_ids": torch.cat([ids[b, :1], torch.tensor([IMAGE_TOKEN_INDEX]), ids[b, 1 + c.num_image_tokens:]]),
              "image": images[b], "index": b} for b in range(B)]                # the image as one id, as PromptDataset
    records = [{"id": str(b), "question": "What is in the image?", "facts": ["a random image"]} for b in range(B)]
    W = m.lm_head.weight
    for name in ("policy", "value", "reward"):
        if name not in m.adapters:
            m.add_adapter(name, r=cfg.lora_r, alpha=16)
    m.requires_grad_(False)
    tok = _WordTokenizer(c.vocab_size)
    scorer = reward_model.RewardScorer(m, "reward", model.ScalarHead(c.hidden).to(device=device, dtype=W.dtype), tok)
    models = ppo.Models(m, None, m, model.ScalarHead(c.hidden, zero_init=True).to(device=device, dtype=W.dtype), scorer)
    params = models.trainable()
    for p in params:
        p.requires_grad_(True)
    pcfg = ppo.Config(rollout_batch=B, step_batch=B, micro_batch=B, max_new_tokens=N, temperature=0.0,
                      compile=compile)
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator(device=device).manual_seed(0)
    st: dict = {}

    def rollout():
        m.eval()
        with kernels.cpu_linear(m, B, compile and device.type == "cpu"):   # as ppo.main
            st["rows"], st["times"] = ppo.rollout(models, tok, items, records, pcfg, gen)

    def update():
        m.train()
        ppo.advantages(st["rows"], pcfg, pcfg.kl_coef)
        ppo.update(models, st["rows"], opt, pcfg, torch.Generator().manual_seed(0))

    # -- the official way, on transformers' model ---------------------------------------------------------
    if ref is not None and not isinstance(ref.model.language_model.layers[0].self_attn.q_proj, _HFLoRA):
        ref.requires_grad_(False)                        # frozen base, as ours: only the shared adapters train
        _hf_with_our_adapters(ref, m)
    hf_img, temp = c.image_token_index, ppo.logprob_temperature(pcfg)
    hb: dict = {}

    def hf_rollout():
        ref.eval()
        t0 = time.perf_counter()
        rows = [ppo.prompt_row(it, records[it["index"]], set(), "") for it in items]
        b = ppo.collate(rows, m)                        # the prompts, left padded, images expanded (no features)
        pix, pmask, pids = b["images"], b["mask"], to_hf(b["ids"], hf_img)
        m.set_adapter("policy")
        with torch.no_grad():
            out = ref.generate(input_ids=pids, pixel_values=pix, attention_mask=pmask, max_new_tokens=N,
                               do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[:, pids.shape[1]:]
        rmask, has_eos = ppo.response_mask(out, tok.eos_id)
        for r, o, n, e in zip(rows, out, rmask.sum(-1).long().tolist(), has_eos.tolist()):
            r.response, r.has_eos, r.text = o[:n], e, tok.decode_response(o[:n].tolist())
        t1 = time.perf_counter()
        b = ppo.collate(rows, m)
        fids, fmask, resp, P = to_hf(b["ids"], hf_img), b["mask"], b["resp"], b["P"]
        with torch.no_grad():
            m.set_adapter("policy")
            logp = _full_logprobs(ref, fids, pix, fmask, resp, P)
            m.set_adapter(None)
            ref_logp = _full_logprobs(ref, fids, pix, fmask, resp, P)
            m.set_adapter("value")
            values = models.value_head(_last_hidden(ref, fids, pix, fmask)[:, P - 1:-1])
            seqs = [scorer.encode({"id": str(i), "image": None, "response": r.text, "facts": r.record["facts"],
                                   "conversations": [{"from": "human", "value": "<image>\n" + r.record["question"]}]})
                    for i, r in enumerate(rows)]
            rm_ids, rm_mask = data.left_pad(seqs, tok.pad_id)
            m.set_adapter("reward")
            h = _last_hidden(ref, to_hf(rm_ids, hf_img), pix, rm_mask)
            rm = scorer.rm.head(model.gather_last(h, rm_mask))
        m.set_adapter(None)
        hb.update(rows=rows, logp=logp, ref_logp=ref_logp, values=values, rm=rm, t_gen=t1 - t0,
                  t_score=time.perf_counter() - t1, batch=(fids, pix, fmask, resp, P, b["rmask"]))

    hf_opt = torch.optim.AdamW(params, lr=1e-5)

    def hf_update():
        ref.train()
        fids, pix, fmask, resp, P, rmask = hb["batch"]
        rows = st["rows"]                                # the same advantages and returns as ours
        adv, ret = ppo.per_token(rows, "adv"), ppo.per_token(rows, "ret")
        old_logp, old_v = ppo.per_token(rows, "logp"), ppo.per_token(rows, "values")
        R = rmask.shape[1]
        for _ in range(pcfg.ppo_epochs):                 # step_batch = micro_batch = B: one step per epoch
            m.set_adapter("policy")
            logits = ref(input_ids=fids, pixel_values=pix, attention_mask=fmask,
                         position_ids=model.positions_from_mask(fmask)).logits[:, P - 1:-1].float() / temp
            logp = torch.log_softmax(logits, -1).gather(-1, resp[..., None]).squeeze(-1)
            pg, _ = ppo.policy_loss(logp, old_logp[:, :R], adv[:, :R], rmask, pcfg.clip)
            pg.backward()
            m.set_adapter("value")
            v = models.value_head(_last_hidden(ref, fids, pix, fmask)[:, P - 1:-1])
            vf, _ = ppo.value_loss(v, old_v[:, :R], ret[:, :R], rmask, pcfg.value_clip)
            (pcfg.vf_coef * vf).backward()
            torch.nn.utils.clip_grad_norm_(params, pcfg.grad_clip)
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
        m.set_adapter(None)
        ref.eval()

    # warm-up: ours (compiles the LoRA policy's decode step and the sampler), then the baseline
    if warmup:
        rollout(), update()
    elif compile:   # the policy's decode graphs for these shapes, untimed; everything else runs eagerly
        m.set_adapter("policy")
        m.generate(ids, images, torch.ones_like(ids), max_new_tokens=N, temperature=0.0, eos_token_id=-1, compile=True)
        m.set_adapter(None)
    results: dict = {}
    same = True
    # one timed step each, in order: a rollout, then the update that trains on its rows; both rollouts
    # before either update, so that they sample from the same weights
    reset_peak_memory(device)
    times, peaks = interleaved({"rollout": rollout}, 1, device)
    t_gen = st["times"]["t_generate"]
    results["ours"] = {"generation": t_gen, "scoring": times["rollout"][0] - t_gen}
    hf_peaks = {}
    if ref is not None:
        if warmup:
            hf_rollout()
        hf_times, hf_peaks = interleaved({"rollout": hf_rollout}, 1, device)
        for a, b_ in zip(st["rows"], hb["rows"]):
            if not torch.equal(a.response, b_.response):
                same = False
                if strict:
                    raise AssertionError(f"PPO step: greedy tokens differ from transformers' generate: "
                                         f"{a.response.tolist()} vs {b_.response.tolist()}")
        if same:
            got, want = ppo.per_token(st["rows"], "logp"), hb["logp"] * hb["batch"][5]
            if (got - want[:, :got.shape[1]]).abs().max() > 1e-3 and strict:
                raise AssertionError(f"PPO step: log-probs differ from transformers' by {(got - want).abs().max():.2e}")
        results["transformers"] = {"generation": hb["t_gen"], "scoring": hb["t_score"]}
    t2, p2 = interleaved({"update": update}, 1, device)
    results["ours"]["update"], peaks["update"] = t2["update"][0], p2["update"]
    if ref is not None:
        t3, p3 = interleaved({"update": hf_update}, 1, device)
        results["transformers"]["update"], hf_peaks["update"] = t3["update"][0], p3["update"]
    m.eval()
    m.set_adapter(None)
    phases = dict(results)
    b = ppo.collate(st["rows"], m)
    T, R = b["ids"].shape[1], b["resp"].shape[1]
    results["update_flops"] = {who: ppo_update_flops(c, B, T, R, cfg.lora_r, pcfg.ppo_epochs, who != "ours")
                               for who in phases}
    results["peak"] = {"ours": max(peaks.values())} | ({"transformers": max(hf_peaks.values())} if hf_peaks else {})
    results["tokens_identical"] = same
    if table is None:
        return results
    for who, ph in phases.items():
        pk = peaks if who == "ours" else hf_peaks
        total = sum(ph.values())
        impl = "ours" + (" compiled" if compile else "") if who == "ours" else "transformers (official way)"
        for k, t in ph.items():
            vs = results["transformers"][k] / t if who == "ours" and "transformers" in results else None
            fl = results["update_flops"][who]
            table.add(f"PPO step B={B} +{N}: {k}", impl, t, B * N / t if k == "generation" else None, vs, None,
                      pk["update" if k == "update" else "rollout"],
                      f"{100 * t / total:.0f}% of step" + ("; peak of the whole rollout" if k != "update" else
                                                           f"; {pcfg.ppo_epochs} epochs, {fl / 1e12:.3g} TFLOP "
                                                           f"({fl / t / 1e9:.0f} GFLOP/s)"))
        vs = sum(results["transformers"].values()) / total if who == "ours" and "transformers" in results else None
        table.add(f"PPO step B={B} +{N}: total", impl, total, None, vs, None, max(pk.values()),
                  "ppo.rollout, ppo.advantages, ppo.update (vision once)" if who == "ours" else
                  "generate; full forwards: policy, reference, value, reward; full fwd+bwd x epochs"
                  + "; identical greedy tokens")
    return results


# ----------------------------------------------------------------------------------------------------
# The CPU linear path, measured once per machine

def bench_linear_choice(m: LLaVA, cfg: BenchConfig, table: Table) -> dict | None:
    """kernels.cpu_linear_plan for the bench model's linear shapes at its batch: measured now, or read from
    the cache an earlier run wrote. The compiled rows below run with it (generate(compile=True) asks for the
    same plan). -> the plan, None without oneDNN."""
    if not kernels.packed_cpu_linear_available():
        table.add("CPU linear path", "mkl", note="this torch build has no oneDNN: F.linear (MKL) throughout")
        return None
    t0 = time.perf_counter()
    plan = kernels.cpu_linear_plan(kernels.linear_shapes(m), decode_rows=cfg.batch)
    took = time.perf_counter() - t0
    for cls in kernels.SHAPE_CLASSES:
        ms, src = plan["ms"].get(cls, {}), plan["source"][cls]
        timed = f"all linears at {plan['rows'][cls]} rows: MKL {ms['mkl']:.2f} ms, oneDNN prepacked {ms['packed']:.2f} ms" \
            if ms else ""
        how = {"measured": f"measured now ({took:.1f}s), cached in {kernels.linear_cache_path()}",
               "cache": f"from the cache ({kernels.linear_cache_path()})", "env": "set by LLAVA_RLHF_CPU_LINEAR"}[src]
        table.add(f"CPU linear path: {cls}", plan[cls], note="; ".join(x for x in (timed, how) if x))
    return plan


# ----------------------------------------------------------------------------------------------------
# Scaling: generation and the PPO step against batch and response length

SCALING = {   # (batches at the config's new tokens, new tokens at the config's batch), beside the config's point
    "quick": ((1, 16), (128,)),           # ~6 min at --threads 1 on a busy 2-core Xeon; B=16 over half of it
    "full": ((1, 2, 4, 8, 16, 32), (32, 64, 128, 256, 512)),
}
SCALING_TINY = {"quick": ((1, 4), (4, 16)), "full": ((1, 2, 4, 8), (4, 8, 16, 32))}   # for --quick's model


def scaling_points(batches, lengths, cfg: BenchConfig) -> list[tuple[str, int, int]]:
    """(sweep, batch, new tokens): the batch sweep at cfg.new_tokens, the length sweep at cfg.batch; each
    sweep holds the config's own point (measured by the main table)."""
    pts = [("batch", B, cfg.new_tokens) for B in sorted(set(batches) | {cfg.batch})]
    return pts + [("length", cfg.batch, N) for N in sorted(set(lengths) | {cfg.new_tokens})]


def bench_scaling(m: LLaVA, ref, cfg: BenchConfig, points, device, compile: bool, known: dict) -> list[dict]:
    """At each (batch, new tokens): greedy generation, ours (compiled when `compile`) against transformers'
    generate (one timed call each after ours compiled its graphs), and a whole PPO step (bench_ppo without
    its untimed warm-up step), ours against the official way. known[(B, N)]: a point already measured.
    -> one dict per point."""
    rows = []
    for sweep, B, N in points:
        if (B, N) in known:
            rows.append({"sweep": sweep, "batch": B, "new": N, **known[(B, N)], "reused": True})
            continue
        pc = replace(cfg, batch=B, new_tokens=N)
        ids, images, mask = make_inputs(pc, cfg.text_tokens - 1, seed=3, device=device)
        T = ids.shape[1]
        hf_ids = to_hf(ids, cfg.model.image_token_index)
        ours = lambda: m.generate(ids, images, mask, max_new_tokens=N, temperature=0.0, eos_token_id=-1,  # noqa: E731
                                  compile=compile)
        theirs = lambda: ref.generate(input_ids=hf_ids, pixel_values=images, attention_mask=mask,  # noqa: E731
                                      max_new_tokens=N, min_new_tokens=N, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[:, T:]
        with torch.no_grad():
            t0 = time.perf_counter()
            ours()                                    # compiles this shape's decode graphs
            first = time.perf_counter() - t0
            times, _ = interleaved({"ours": ours, "transformers": theirs}, 1, device)
        p = bench_ppo(m, ref, pc, None, device, compile, warmup=False, strict=False)
        rows.append({"sweep": sweep, "batch": B, "new": N, "gen_ours": times["ours"][0],
                     "gen_hf": times["transformers"][0], "ppo_ours": sum(p["ours"].values()),
                     "ppo_hf": sum(p["transformers"].values()), "same": p["tokens_identical"],
                     "first_call": first, "reused": False})
        print(f"  scaling {sweep} B={B} +{N}: generation {rows[-1]['gen_ours']:.2f} / {rows[-1]['gen_hf']:.2f} s, "
              f"PPO step {rows[-1]['ppo_ours']:.2f} / {rows[-1]['ppo_hf']:.2f} s", file=sys.stderr, flush=True)
    for dec in kernels._DECODERS.get(m, {}).values():
        dec.release()                                 # the kept KV caches back to the allocator
    return rows


def scaling_table(rows: list[dict], ours: str) -> str:
    """The scaling rows as a markdown table."""
    out = [f"| sweep | batch | new tokens | generation {ours} (s) | generation transformers (s) | speed-up "
           f"| PPO step {ours} (s) | PPO step official way (s) | speed-up |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " (main table)" if r["reused"] else "" if r.get("same", True) else " (greedy tokens differ)"
        out.append(f"| {r['sweep']} | {r['batch']} | {r['new']}{mark} | {r['gen_ours']:.3g} | {r['gen_hf']:.3g} "
                   f"| {r['gen_hf'] / r['gen_ours']:.2f}x | {r['ppo_ours']:.3g} | {r['ppo_hf']:.3g} "
                   f"| {r['ppo_hf'] / r['ppo_ours']:.2f}x |")
    return "\n".join(out)


def scaling_plot(rows: list[dict], ours: str, path: str) -> str | None:
    """Seconds against batch and against new tokens, ours and the baseline, two panels (plots.py). -> the
    path written, None without pillow (for a .png)."""
    import importlib.util
    import plots
    if path.lower().endswith(".png") and importlib.util.find_spec("PIL") is None:
        return None
    charts = []
    for sweep, x, label in (("batch", "batch", "batch"), ("length", "new", "new tokens")):
        pts = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r[x])
        xs = [r[x] for r in pts]
        series = {f"generation {ours}": (xs, [r["gen_ours"] for r in pts]),
                  "generation transformers": (xs, [r["gen_hf"] for r in pts]),
                  f"PPO step {ours}": (xs, [r["ppo_ours"] for r in pts]),
                  "PPO step official way": (xs, [r["ppo_hf"] for r in pts])}
        fixed = f"batch {pts[0]['batch']}" if sweep == "length" else f"+{pts[0]['new']} tokens"
        charts.append(plots.LineChart(f"seconds against {label} ({fixed})", series, xlabel=label, ylabel="seconds",
                                      ymin=0.0))
    return plots.save(charts, path, cols=2)


# ----------------------------------------------------------------------------------------------------
# Data loading: reading JPEGs in the step or in DataLoader workers

class _JpegImages(torch.utils.data.Dataset):
    """Item i: the image file as the model's (3, S, S) input (data.image_tensor: decode, pad to square,
    resize, normalise), the way every stage reads an image."""

    def __init__(self, paths: list[str], image_size: int):
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return data.image_tensor(self.paths[i], self.image_size)


def write_jpegs(folder: str, n: int, width: int = 448, height: int = 336, seed: int = 0) -> list[str]:
    """n random photos-ish JPEGs (smooth colour fields plus noise; 4:3, as COCO's) in folder. -> paths."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        low = torch.rand(1, 3, height // 16, width // 16, generator=g)
        img = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]    # (3, H, W)
        img = (img + 0.08 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        px = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        paths.append(os.path.join(folder, f"{i:03d}.jpg"))
        Image.fromarray(px).save(paths[-1], quality=90)
    return paths


def bench_data_loading(n_images: int, batch: int, steps: int, image_size: int, workers: int = 2) -> dict:
    """A training loop's step time with its batches read by data.BatchLoader in this process (workers 0)
    and in `workers` DataLoader workers, around a fake step: a sleep as long as reading one batch takes
    here (what an accelerator's step leaves the CPU: free). -> {"load_ms", "step_ms": {workers: ms}}"""
    with tempfile.TemporaryDirectory() as d:
        ds = _JpegImages(write_jpegs(d, n_images), image_size)
        t0 = time.perf_counter()
        for i in range(2 * batch):
            ds[i % len(ds)]
        load = (time.perf_counter() - t0) / 2                   # seconds to read one batch here
        out = {"load_ms": 1e3 * load, "step_ms": {}, "n_images": n_images, "batch": batch, "image_size": image_size}
        for w in (0, workers):
            loader = data.BatchLoader(ds, data.ResumableSampler(len(ds), seed=0), batch, torch.stack, w, prefetch=2)
            for _ in range(2):                                  # warm-up: the workers start and fill their queue
                loader.next()
                time.sleep(load)
            t0 = time.perf_counter()
            for _ in range(steps):
                x = loader.next()                                # (batch, 3, S, S)
                time.sleep(load)                                 # the fake step
            out["step_ms"][w] = 1e3 * (time.perf_counter() - t0) / steps
            assert x.shape == (batch, 3, image_size, image_size)
            loader.close()
    return out


# ----------------------------------------------------------------------------------------------------
# The summary: the ratios the issue asks for, one line each

def update_bound(ppo_res: dict, peak_flops: float, target: float = PPO_TARGET) -> str:
    """What bounds the PPO step's ratio: the update's arithmetic (ours against the official way's) and
    FLOP/s, and the FLOP/s ours' update would need for `target` with generation and scoring as measured."""
    o, t = ppo_res["ours"], ppo_res["transformers"]
    fo, ft = ppo_res["update_flops"]["ours"], ppo_res["update_flops"]["transformers"]
    so, st = fo / o["update"], ft / t["update"]
    line = (f"  PPO update: the official way computes {ft / fo:.2f}x ours' FLOPs ({ft / 1e12:.3g} vs {fo / 1e12:.3g} "
            f"TFLOP: full logits, the vision tower per pass) at {st / so:.2f}x ours' FLOP/s ({st / 1e9:.0f} vs "
            f"{so / 1e9:.0f} GFLOP/s), so ours' update is {t['update'] / o['update']:.2f}x as fast")
    left = sum(t.values()) / target - o["generation"] - o["scoring"]   # seconds the update may take for `target`
    if left <= 0:
        return line + f"; {target}x needs more than a free update (generation + scoring alone exceed it)"
    need = fo / left
    return line + (f"; a {target}x step needs ours' update at {need / 1e9:.0f} GFLOP/s, "
                   f"{100 * need / peak_flops:.0f}% of the measured matmul peak ({peak_flops / 1e9:.0f})")


def summary(gen: dict, ppo_res: dict | None, plan: dict | None, loading: dict | None, peak_flops: float) -> str:
    best = "ours compiled" if "ours compiled" in gen["seconds"] else "ours eager"
    lines = [f"summary ({kernels.cpu_model()}, {torch.get_num_threads()} threads)"]
    if ppo_res is not None and "transformers" in ppo_res:
        o, t = sum(ppo_res["ours"].values()), sum(ppo_res["transformers"].values())
        pk = ppo_res["peak"]
        lines.append(f"  PPO step vs the official way: {t / o:.2f}x (ours {o:.3g} s, official way {t:.3g} s; "
                     f"peak {pk['ours'] / 2**30:.2f} vs {pk['transformers'] / 2**30:.2f} GiB)")
        lines.append(update_bound(ppo_res, peak_flops))
    lines.append("  generation vs transformers: " + ", ".join(
        f"{k} {gen['seconds']['transformers'] / gen['seconds'][k]:.2f}x" for k in gen["seconds"] if k != "transformers"))
    f = gen["floor_ms"]
    order = [best] + [k for k in gen["step_ms"] if k != best]
    lines.append(f"  decode step vs the bandwidth floor ({f:.3g} ms/step): " + ", ".join(
        f"{k} {gen['step_ms'][k]:.3g} ms = {gen['step_ms'][k] / f:.2f}x the floor" for k in order))
    if plan is not None:
        lines.append("  CPU linear path: " + ", ".join(f"{c} {plan[c]} ({plan['source'][c]})" for c in kernels.SHAPE_CLASSES))
    if loading is not None:
        s0, s2 = loading["step_ms"][0], loading["step_ms"][max(loading["step_ms"])]
        lines.append(f"  data loading ({loading['n_images']} JPEGs, {loading['image_size']} px, batch {loading['batch']}, "
                     f"fake step {loading['load_ms']:.0f} ms): workers 0 {s0:.0f} ms/step, workers "
                     f"{max(loading['step_ms'])} {s2:.0f} ms/step ({s0 / s2:.2f}x)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# GPU check

def gpu_check(args) -> None:
    """7B-shaped LLaVA, random bf16 weights, on one CUDA GPU: batch-1 and batch-64 decode tokens/s, the
    batch-1 step against its floor (weight + KV bytes / measured copy bandwidth), a training step's MFU
    against the measured bf16 matmul peak, and peak memory of each. Sized for < 8 min on an H100."""
    if args.cpu_dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        cfg = replace(QUICK.model, layers=2)
        batches, prompt_len, new, train_b, train_t = (1, 4), 16, 8, 2, 32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench.py --gpu-check needs a CUDA GPU, and torch.cuda.is_available() is False here "
                             f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}).")
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
        cfg = ModelConfig.preset("llava-rlhf-7b", image_token_index=31999)
        batches, prompt_len, new, train_b, train_t = (1, 64), 128, 128, 8, 512
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)
    table = Table()
    ceil = measure_ceilings(device, dtype)
    log(f"matmul {ceil['matmul_flops'] / 1e12:.1f} TFLOP/s, copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s")

    # build on meta, materialise on the device in bf16 directly (no fp32 copy of 7B weights)
    with torch.device("meta"):
        m = LLaVA(cfg).to(dtype)
    m = m.to_empty(device=device).eval()
    init_weights(m)
    m.requires_grad_(False)
    n_llm = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("llm.", "lm_head.")))
    log(f"model built: {sum(p.numel() for p in m.parameters()) / 1e9:.2f}B params ({n_llm / 1e9:.2f}B LLM), {dtype}")

    g = torch.Generator().manual_seed(0)
    top = min(cfg.vocab_size - 1, 31999)   # random text ids; 31999 is the image id of the 7B config
    mode = "reduce-overhead" if device.type == "cuda" else None
    for B in batches:
        ids = torch.randint(3, top, (B, prompt_len), generator=g).to(device)
        mask = torch.ones_like(ids)
        # eager, then compiled: CUDA graphs first ("reduce-overhead": batch-1 decode is launch-bound
        # without them); should that fail here, the default mode, so that the table still has a row
        variants = [(False, None)]
        if not args.no_compile:
            variants += [(True, mode)] + ([(True, None)] if mode is not None else [])
        done_compiled = False
        for comp, md in variants:
            if comp and done_compiled:
                continue
            if comp:
                dec = kernels.static_decoder(m, compile=True, mode=md)
            run = lambda n: m.generate(ids, None, mask, max_new_tokens=n, eos_token_id=-1, compile=comp)
            name = f"ours {'compiled' if comp else 'eager'}" + (f" ({md})" if md else "")
            try:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    run(new)                    # warm-up; compiles on the first compiled call
                    first = time.perf_counter() - t0
                    times, peaks = interleaved({"n": lambda: run(new), "1": lambda: run(1)}, 2, device)
            except Exception as e:  # noqa: BLE001  (report and go on: the table should still print)
                table.add(f"decode B={B}", name, note=f"FAILED: {type(e).__name__}: {str(e)[:120]}")
                log(f"B={B} {name} failed: {e}")
                continue
            done_compiled = done_compiled or comp
            step = max(med(times["n"]) - med(times["1"]), 1e-9) / (new - 1)
            floor = decode_bytes(m, B, prompt_len + new // 2) / ceil["copy_bytes_per_s"]
            note = f"{1e3 * step:.2f} ms/step, floor {1e3 * floor:.2f} ms ({100 * floor / step:.0f}% of roofline)"
            if comp:
                note += f"; graphs {dec.compiles} (first call {first:.0f}s), recompiles {dec.recompiles}"
            table.add(f"decode B={B} prompt={prompt_len} +{new}", name, step, B / step,
                      None, decode_step_flops(cfg, B, prompt_len + new // 2) / step / ceil["matmul_flops"],
                      peaks["n"], note)
            log(f"decode B={B} {name}: {B / step:.0f} tok/s")
        for dec in kernels._DECODERS.get(m, {}).values():
            dec.release()
        torch.cuda.empty_cache()

    # training step: full fine-tuning of the LLM (fwd + bwd, no optimizer), text only, fused loss
    m.llm.requires_grad_(True)
    m.lm_head.requires_grad_(True)
    m.train()
    ids = torch.randint(3, top, (train_b, train_t), generator=g).to(device)
    mask = torch.ones_like(ids)

    def step():
        m.zero_grad()
        (sft.SFTLoss(m)(ids, None, mask, ids) / ids[:, 1:].numel()).backward()   # the SFT stage's loss

    flops = train_flops(cfg, train_b, train_t, train_b * (train_t - 1), images=False)
    for label, fused in (("ours eager", False), ("ours compiled", True)):
        if fused and args.no_compile:
            continue
        try:
            with kernels.fused_kernels(fused):
                t0 = time.perf_counter()
                step()
                sync(device)
                first = time.perf_counter() - t0
                times, peaks = interleaved({"train": step}, 3, device)
            t = med(times["train"])
            table.add(f"train fwd+bwd B={train_b} T={train_t}", label, t, train_b * train_t / t, None,
                      flops / t / ceil["matmul_flops"], peaks["train"],
                      f"{flops / t / 1e12:.0f} TFLOP/s of model FLOPs; full LLM grads; SFTLoss (fused log-probs)"
                      + (f" + fused RMSNorm/rotary/SwiGLU ({first:.0f}s first call)" if fused else ""))
            log(f"train step {label} {t:.3f}s")
        except Exception as e:  # noqa: BLE001
            table.add(f"train fwd+bwd B={train_b} T={train_t}", label, note=f"FAILED: {type(e).__name__}: {str(e)[:120]}")
            log(f"train {label} failed: {e}")
    m.zero_grad()
    table.add("ceiling", "measured", note=f"matmul {ceil['matmul_flops'] / 1e12:.1f} TFLOP/s ({dtype}), "
                                          f"copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s (read+write)")
    print(_header(device))
    print(table.render())
    log("done")


# ----------------------------------------------------------------------------------------------------

def _header(device: torch.device) -> str:
    import transformers
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else kernels.cpu_model()
    return (f"device {dev} | threads {torch.get_num_threads()} of {os.cpu_count()} cpus | "
            f"load avg {os.getloadavg()[0]:.2f} | "
            f"torch {torch.__version__} | transformers {transformers.__version__}")


@dataclass
class Flags:
    quick: bool = False           # tiny config: a smoke test
    no_compile: bool = False      # skip the torch.compile rows
    no_ppo: bool = False          # skip the PPO step split
    threads: int = 0              # torch intra-op threads (0: torch's default)
    iters: int = 0                # timed repeats per measurement (0: the config's)
    gpu_check: bool = False       # 7B-shaped bf16 check on one CUDA GPU
    cpu_dry_run: bool = False     # run --gpu-check's code on CPU, tiny (its own test)
    scaling: str = "quick"        # the scaling table: off, quick (a few points) or full (batch 1..32, +32..512)
    plot: str = "bench_scaling.png"   # the scaling picture (.png through pillow, or .svg); "" for none
    no_data: bool = False         # skip the data-loading rows (JPEGs read in the step or in workers)


def main(argv: list[str] | None = None) -> str:
    """Flags as the stages' configs (common.parse_config; --no-compile and --no_compile alike)."""
    args = common.parse_config(Flags, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_check:
        gpu_check(args)
        return ""
    if args.scaling not in ("off", "quick", "full"):
        raise SystemExit(f"error: --scaling {args.scaling!r}: off, quick or full")
    cfg = QUICK if args.quick else CPU
    if args.iters:
        cfg = replace(cfg, iters=args.iters)
    device = torch.device("cpu")
    compile = not args.no_compile
    if compile:
        ok, why = kernels.compile_available()
        if not ok:
            print(f"torch.compile unavailable ({why}): compiled rows skipped", file=sys.stderr)
            compile = False
    t_start = time.perf_counter()
    header = _header(device)
    table = Table()
    ceil = measure_ceilings(device, torch.float32)
    torch.manual_seed(0)
    m = LLaVA(cfg.model).eval()
    init_weights(m)
    with tempfile.TemporaryDirectory() as d:
        ref = load_reference(m, d)
    plan = bench_linear_choice(m, cfg, table)      # the linear path of the compiled rows (and of ppo.py --compile)
    gen = bench_generation(m, ref, cfg, table, ceil, device, compile)
    bench_training(m, ref, cfg, table, ceil, device, compile)
    bench_padding(m, cfg, table, device, text_max=48 if args.quick else 896)
    ppo_res = None if args.no_ppo else bench_ppo(m, ref, cfg, table, device, compile)
    loading = None
    if not args.no_data:
        loading = bench_data_loading(*((16, 4, 6) if args.quick else (48, 8, 10)), image_size=336)
        for w, ms in loading["step_ms"].items():
            table.add(f"data loading, batch {loading['batch']} JPEG -> 336px", f"BatchLoader workers {w}", ms / 1e3,
                      note=f"per step around a fake {loading['load_ms']:.0f} ms step (a sleep: the CPU is free, as "
                           f"under a GPU step); reading a batch here takes {loading['load_ms']:.0f} ms")
    scaling = ""
    if args.scaling != "off" and ppo_res is not None:
        batches, lengths = (SCALING_TINY if args.quick else SCALING)[args.scaling]
        comp = compile and not args.quick      # --quick compiles no new shapes (a compile takes longer than its grid)
        best = "ours compiled" if comp else "ours eager"
        known = {} if comp != compile else {(cfg.batch, cfg.new_tokens): {
            "gen_ours": gen["seconds"][best], "gen_hf": gen["seconds"]["transformers"],
            "ppo_ours": sum(ppo_res["ours"].values()), "ppo_hf": sum(ppo_res["transformers"].values()), "same": True}}
        rows = bench_scaling(m, ref, cfg, scaling_points(batches, lengths, cfg), device, comp, known)
        scaling = (f"\nscaling ({args.scaling}): seconds per greedy generation (image + {cfg.text_tokens} text, +N "
                   f"new tokens) and per PPO step (bench_ppo: rollout + update, {ppo.Config.ppo_epochs} epochs), "
                   f"{best} against transformers / the official way\n{scaling_table(rows, best)}")
        picture = scaling_plot(rows, best, args.plot) if args.plot else None
        if picture:
            scaling += f"\nplot: {picture}"
    gemms = f"BLAS (a @ b) {ceil['matmul_flops_blas'] / 1e9:.0f}"
    if "matmul_flops_onednn" in ceil:
        gemms += f", oneDNN prepacked {ceil['matmul_flops_onednn'] / 1e9:.0f}"
    table.add("ceiling", "measured", note=f"matmul fp32 {ceil['matmul_flops'] / 1e9:.0f} GFLOP/s (the faster of "
                                          f"{gemms}), copy {ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s (read+write)")
    c = cfg.model
    out = (f"{header}\nconfig: vision {c.image_size}px/{c.patch_size} ({c.num_image_tokens} image tokens) "
           f"{c.vision_layers}x{c.vision_hidden}; LLM {c.layers}x{c.hidden}, {c.heads} heads, vocab {c.vocab_size}; "
           f"batch {cfg.batch}; prompt image + {cfg.text_tokens} text; +{cfg.new_tokens} greedy; train T={cfg.train_seq}; "
           f"fp32; median of {cfg.iters}\n{table.render()}\n{summary(gen, ppo_res, plan, loading, ceil['matmul_flops'])}{scaling}\n"
           f"load avg at end {os.getloadavg()[0]:.2f}; total bench time {time.perf_counter() - t_start:.0f}s")
    print(out)
    return out


if __name__ == "__main__":
    main()
