"""The LLaVA model from scratch: CLIP vision tower -> projector -> LLaMA decoder.

Plain PyTorch, numerically equal to transformers' CLIPVisionModel / LlamaForCausalLM /
LlavaForConditionalGeneration (tests/test_model.py proves it on tiny random configs). Also here:
LoRA adapters (several named adapters on one frozen base), a scalar head for reward and value models,
batched KV-cache generation, chunked log-probs, and checkpoint I/O for every layout users have on disk.

    import model
    m = model.LLaVA.from_pretrained("/ckpt/llava-v1.5-7b", vision_tower="/ckpt/clip-vit-large-patch14-336")
    logits = m(input_ids, images, attention_mask)          # (B, T, V)
    new = m.generate(input_ids, images, attention_mask, max_new_tokens=64)
    m.save_pretrained("/ckpt/out")                         # transformers' Llava layout

Fast paths (all off by default; bench.py measures them against transformers):
    m.generate(..., compile=True)      # decode steps: one torch.compile'd graph over a static KV cache;
                                       # on CPU every linear through oneDNN, weights prepacked
    m.static_decoder(mode="reduce-overhead")   # ...with CUDA graphs; .compiles / .recompiles count graphs
    loss = m.lm_loss(ids, images, mask, labels)            # lm_head fused with CE, labelled rows only
    lp, ent = fused_token_logprobs(h, m.lm_head.weight, targets, with_entropy=True)
    use_fused_kernels(True)            # RMSNorm, rotary, SwiGLU through torch.compile (training)
    use_packed_cpu_linear(True)        # no-grad CPU linears through oneDNN, weights prepacked once
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import shutil
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

import weights

IMAGE_TOKEN_INDEX = -200  # LLaVA's marker id in input_ids: projected patch features go there


# ----------------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    # vision tower (CLIP ViT)
    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_intermediate: int = 4096
    vision_eps: float = 1e-5
    vision_feature_layer: int = -2     # index into CLIP's hidden states (0 = embeddings after pre-LN)
    vision_keep_cls: bool = False      # LLaVA drops the CLS token ("patch" features)
    # projector: "linear" (LLaVA-RLHF) or "mlp2x_gelu" (LLaVA-1.5)
    projector: str = "linear"
    # language model (LLaMA)
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    intermediate: int = 11008
    vocab_size: int = 32000
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # id used for the image placeholder when saved for transformers' Llava (needs a row in the vocab);
    # None: save_pretrained appends one row to the vocabulary for it
    image_token_index: int | None = None
    # a bare LLaMA (no vision tower, no projector): e.g. a text-only judge for eval_mmhal.py
    text_only: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def vision_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        if self.text_only:
            return 0
        return self.vision_grid ** 2 + (1 if self.vision_keep_cls else 0)

    def __post_init__(self) -> None:
        if self.projector not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"projector must be 'linear' or 'mlp2x_gelu', got {self.projector!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads} do not divide")
        if self.vision_hidden % self.vision_heads:
            raise ValueError(f"vision_hidden {self.vision_hidden} not divisible by vision_heads {self.vision_heads}")
        if not -self.vision_layers - 1 <= self.vision_feature_layer <= self.vision_layers:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} out of range")

    @staticmethod
    def preset(name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


_CLIP_L = dict(patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096)
PRESETS: dict[str, ModelConfig] = {
    # SPEC §7's measured tiny world setup: 64 image tokens, vision 128x2, LLM 128x4, FFN 352.
    "tiny": ModelConfig(image_size=64, patch_size=8, vision_hidden=128, vision_layers=2, vision_heads=4,
                        vision_intermediate=512, hidden=128, layers=4, heads=4, kv_heads=4, intermediate=352,
                        vocab_size=512, max_seq_len=512),
    "llava-rlhf-7b": ModelConfig(image_size=224, **_CLIP_L, hidden=4096, layers=32, heads=32, kv_heads=32,
                                 intermediate=11008, vocab_size=32000, max_seq_len=4096),
    "llava-rlhf-13b": ModelConfig(image_size=336, **_CLIP_L, hidden=5120, layers=40, heads=40, kv_heads=40,
                                  intermediate=13824, vocab_size=32000, max_seq_len=4096),
}


# ----------------------------------------------------------------------------------------------------
# Linear layers, and a faster CPU path for inference

# On CPU, F.linear runs MKL's sgemm, and MKL takes a generic AVX2 path on CPUs that are not Intel's:
# on an AMD EPYC (Zen 5) here it reaches half the machine's matmul FLOP/s, while oneDNN's GEMM with
# the weight prepacked in its blocked layout runs a prefill-sized linear 2x faster and a decode step's
# few rows 3x faster (bench.py measures both). Packing is a pass over the weight and keeps a second
# copy of it, so it is opt-in and done once per weight version (an optimizer step, merge or load
# bumps it); it only serves no-grad forward passes, since training needs F.linear's autograd.
_PACKED_CPU = {"on": False}
_PACKED = WeakIdKeyDictionary()   # weight -> (data_ptr, version, packed copy); an entry dies with its weight


@functools.lru_cache(maxsize=None)
def packed_cpu_linear_available() -> bool:
    """Whether this torch build's oneDNN packs and runs a linear correctly here (tried once, small)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.linspace(-1, 1, 128).view(8, 16), torch.linspace(2, -1, 48).view(3, 16)   # no RNG draws
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), None, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w), atol=1e-4))
    except Exception:  # noqa: BLE001  (a build or CPU without the op: the plain path it is)
        return False


def use_packed_cpu_linear(enable: bool = True) -> bool:
    """Route every no-grad fp32 CPU linear through oneDNN with prepacked weights; process-wide. Returns
    the previous setting. generate(compile=True) turns it on for its own duration. Each packed copy
    lives as long as its weight (memory: the linear weights once more) or until drop_packed_weights()."""
    prev = _PACKED_CPU["on"]
    _PACKED_CPU["on"] = bool(enable) and packed_cpu_linear_available()
    return prev


def drop_packed_weights() -> None:
    """Free every packed copy now (they are made again on next use). Also the way to tell the cache
    about a weight changed through `.data` (p.data.copy_(...)), which autograd's version counter
    does not see; optimizer steps, merge_adapter and loading do bump it."""
    _PACKED.clear()


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    hit = _PACKED.get(weight)
    if hit is None or hit[0] != weight.data_ptr() or hit[1] != weight._version:
        hit = _PACKED[weight] = (weight.data_ptr(), weight._version,
                                 torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
    return hit[2]


@contextlib.contextmanager
def _switched_on(use: Callable[[bool], bool], enable: bool) -> Iterator[None]:
    """use(True) for the block when enable, then the setting use() reported before; use returns it."""
    prev = use(True) if enable else None
    try:
        yield
    finally:
        if prev is not None:
            use(prev)


def packed_cpu_linear(enable: bool = True) -> contextlib.AbstractContextManager:
    """`with packed_cpu_linear():` use_packed_cpu_linear(True) inside the block (when enable)."""
    return _switched_on(use_packed_cpu_linear, enable)


# An op of our own, so that torch.compile keeps it opaque: inductor cannot take oneDNN's packed layout
# as a graph input. Defined with torch.library.define/impl rather than custom_op, whose Python wrapper
# costs more per call than the tiny GEMMs of a decode step.
def _packed_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if weight.is_inference():   # made under inference_mode: no version counter to tell a stale pack
        return F.linear(x, weight, bias)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), _packed_weight(weight),
                                           bias, "none", [], "")                  # (N, out)
    return y.view(*x.shape[:-1], weight.shape[0])


def _packed_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


if not hasattr(torch.ops.llava_rlhf, "packed_linear"):   # once per process, even if this module is reloaded
    torch.library.define("llava_rlhf::packed_linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    torch.library.impl("llava_rlhf::packed_linear", "cpu", _packed_linear_cpu)
    torch.library.register_fake("llava_rlhf::packed_linear", _packed_linear_fake)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or packed_linear for no-grad CPU inference when use_packed_cpu_linear is on."""
    if (_PACKED_CPU["on"] and x.device.type == "cpu" and weight.dtype == x.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.ops.llava_rlhf.packed_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint keys) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# ----------------------------------------------------------------------------------------------------
# LoRA: several named adapters on one frozen linear layer, one active at a time (or none).

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(Linear):
    """nn.Linear whose output gains scale * B(A(dropout(x))) from the active adapter.
    Subclassing keeps the base weight at `<path>.weight`, so checkpoints map one to one."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_A = nn.ParameterDict()   # name -> (r, in)
        self.lora_B = nn.ParameterDict()   # name -> (out, r)
        self.lora_scale: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.active_adapter: str | None = None

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0) -> None:
        dev, dt = self.weight.device, self.weight.dtype
        a = torch.empty(r, self.in_features, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft: B = 0 makes a fresh adapter a no-op
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))
        self.lora_scale[name] = alpha / r
        self.lora_dropout[name] = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        name = self.active_adapter
        if name is not None:
            h = x
            if self.training and self.lora_dropout[name] > 0:
                h = F.dropout(h, self.lora_dropout[name])
            # adapters may be fp32 masters over a bf16 base (common.fp32_trainable): compute in x's dtype
            a, b = self.lora_A[name].to(h.dtype), self.lora_B[name].to(h.dtype)
            y = y + F.linear(F.linear(h, a), b) * self.lora_scale[name]
        return y

    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weight and delete it."""
        with torch.no_grad():
            delta = (self.lora_B[name].float() @ self.lora_A[name].float()) * self.lora_scale[name]
            self.weight += delta.to(self.weight.dtype)
        self.delete(name)

    def delete(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]
        self.lora_scale.pop(name), self.lora_dropout.pop(name)
        if self.active_adapter == name:
            self.active_adapter = None


# ----------------------------------------------------------------------------------------------------
# CLIP vision tower

class CLIPAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = Linear(d, d), Linear(d, d), Linear(d, d)
        self.out_proj = Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))        # (B, H, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)                          # no mask: every patch sees all
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class CLIPMLP(nn.Module):
    def __init__(self, d: int, inner: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(d, inner), Linear(inner, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, as CLIP was trained


class CLIPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.vision_hidden
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.vision_eps)
        self.self_attn = CLIPAttention(d, cfg.vision_heads)
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.vision_eps)
        self.mlp = CLIPMLP(d, cfg.vision_intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.vision_hidden
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.vision_grid ** 2 + 1, d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B = images.shape[0]
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(images.to(dtype)).flatten(2).transpose(1, 2)   # (B, P, D)
        cls = self.class_embedding.view(1, 1, -1).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1)                                          # (B, P+1, D)
        return x + self.position_embedding.weight[None]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.vision_layers))


class CLIPVision(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.vision_hidden, eps=cfg.vision_eps)
        self.encoder = CLIPEncoder(cfg)
        # unused by LLaVA (features come from an inner layer) but kept so checkpoints round-trip
        self.post_layernorm = nn.LayerNorm(cfg.vision_hidden, eps=cfg.vision_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, num_image_tokens, vision_hidden): hidden state at vision_feature_layer."""
        L = self.cfg.vision_layers
        idx = self.cfg.vision_feature_layer % (L + 1)   # hidden_states has L+1 entries
        x = self.pre_layrnorm(self.embeddings(images))
        for layer in self.encoder.layers[:idx]:          # layers after the chosen one are never run
            x = layer(x)
        return x if self.cfg.vision_keep_cls else x[:, 1:]


class Projector(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.projector
        if cfg.projector == "linear":
            self.linear = Linear(cfg.vision_hidden, cfg.hidden)
        else:
            self.linear_1 = Linear(cfg.vision_hidden, cfg.hidden)
            self.linear_2 = Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.linear(x)
        return self.linear_2(F.gelu(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------------
# LLaMA decoder

# Elementwise kernels fused by torch.compile (off by default). Eager PyTorch runs RMSNorm as ~6 passes
# over the activations, rotary as ~6 and SwiGLU as 2, each forward and again in backward; compiled,
# each is one read and one write. Dynamic shapes: any batch size or length reuses the same kernels.
_FUSED: dict[str, object] = {}            # the ones in use: empty = plain eager
_FUSED_COMPILED: dict[str, object] = {}   # made once, so that turning them off and on reuses the graphs


def use_fused_kernels(enable: bool = True) -> bool:
    """Route rms_norm, apply_rope and swiglu (so every LLaMA layer, eager or checkpointed) through
    torch.compile'd versions of themselves, or back to plain eager with enable=False. Process-wide;
    returns the previous setting. Inside a compiled graph (the static decode step) the plain versions
    are traced and fused anyway."""
    prev = bool(_FUSED)
    _FUSED.clear()
    if enable:
        for name, fn in (("rms_norm", _rms_norm), ("apply_rope", _apply_rope), ("swiglu", _swiglu)):
            if name not in _FUSED_COMPILED:
                _FUSED_COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
            _FUSED[name] = _FUSED_COMPILED[name]
    return prev


def fused_kernels(enable: bool = True) -> contextlib.AbstractContextManager:
    """`with fused_kernels():` use_fused_kernels(True) inside the block (when enable)."""
    return _switched_on(use_fused_kernels, enable)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    fused = _FUSED.get("rms_norm")
    if fused is not None and not torch.compiler.is_compiling():
        return fused(x, weight, eps)
    return _rms_norm(x, weight, eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # normalise in fp32 whatever the storage dtype, as LLaMA does
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    fused = _FUSED.get("swiglu")
    if fused is not None and not torch.compiler.is_compiling():
        return fused(gate, up)
    return _swiglu(gate, up)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, T, head_dim) in fp32, the two halves repeated (rotate-half form)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim))
    ang = positions.float()[..., None] * inv_freq                          # (B, T, hd/2)
    ang = torch.cat([ang, ang], dim=-1)                                    # (B, T, hd)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (B, T, hd)."""
    fused = _FUSED.get("apply_rope")
    if fused is not None and not torch.compiler.is_compiling():
        return fused(x, cos, sin)
    return _apply_rope(x, cos, sin)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Static, preallocated cache: (layers, B, kv_heads, max_len, head_dim) for keys and values."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd = cfg.head_dim
        self.q_proj = LoRALinear(cfg.hidden, cfg.heads * hd)
        self.k_proj = LoRALinear(cfg.hidden, cfg.kv_heads * hd)
        self.v_proj = LoRALinear(cfg.hidden, cfg.kv_heads * hd)
        self.o_proj = LoRALinear(cfg.heads * hd, cfg.hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """x (B, T, D); mask (B, 1, T, S) bool, True = may attend; with a cache, keys for positions
        start..start+T are written there and S is the cache length attended over.
        mask None means plain causal attention over these T tokens (no padding, start 0): SDPA then
        takes its is_causal path, which skips the masked half of the score blocks."""
        B, T, _ = x.shape
        c, hd = self.cfg, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, c.heads, hd).transpose(1, 2)          # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, c.kv_heads, hd).transpose(1, 2)       # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, c.kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[self.layer_idx, :, :, start:start + T] = k
            cache.v[self.layer_idx, :, :, start:start + T] = v
            if mask is not None:
                S = mask.shape[-1]
                k, v = cache.k[self.layer_idx, :, :, :S], cache.v[self.layer_idx, :, :, :S]
            elif start != 0:
                raise ValueError("mask=None (plain causal) needs start == 0")
        if c.kv_heads != c.heads:
            rep = c.heads // c.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.heads * hd))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = LoRALinear(cfg.hidden, cfg.intermediate)
        self.up_proj = LoRALinear(cfg.hidden, cfg.intermediate)
        self.down_proj = LoRALinear(cfg.intermediate, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(LlamaLayer(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)


def _pinned_adapters(layer: nn.Module) -> Callable:
    """The layer as a function that runs with the LoRA adapters active now, also when checkpointing
    recomputes it in backward after another adapter was made active (PPO's policy and value adapters
    share one base: without this, the policy's recompute would run the value adapter)."""
    mods = [m for m in layer.modules() if isinstance(m, LoRALinear)]
    names = [m.active_adapter for m in mods]

    def run(*args):
        now = [m.active_adapter for m in mods]
        for m, n in zip(mods, names):
            m.active_adapter = n
        try:
            return layer(*args)
        finally:
            for m, n in zip(mods, now):
                m.active_adapter = n
    return run


def attention_mask_4d(key_valid: torch.Tensor, q_len: int, start: int) -> torch.Tensor:
    """key_valid (B, S) bool -> (B, 1, q_len, S) bool: causal (query i sits at start+i) and no padding.
    The diagonal is always allowed so that a padded query row never sees an empty set (NaN)."""
    S = key_valid.shape[1]
    q_pos = torch.arange(start, start + q_len, device=key_valid.device)[:, None]   # (T, 1)
    k_pos = torch.arange(S, device=key_valid.device)[None, :]                      # (1, S)
    mask = (k_pos <= q_pos)[None] & key_valid[:, None, :]                          # (B, T, S)
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


def causal_or_padded_mask(key_valid: torch.Tensor) -> torch.Tensor | None:
    """key_valid (B, T) bool -> None when no row is padded (plain causal: SDPA's fast is_causal path),
    else the (B, 1, T, T) mask of attention_mask_4d. A mask without values is the rehearsal's, whose
    rows are all full length: None, which also gives SDPA the kernel a GPU runs (no T x T scores)."""
    unpadded = not has_values(key_valid) or bool(key_valid.all())
    return None if unpadded else attention_mask_4d(key_valid, key_valid.shape[1], 0)


def has_values(t: torch.Tensor) -> bool:
    """False for a tensor without data: a fake tensor (rehearse.py runs the stages at full size under
    FakeTensorMode) or a meta one. The few checks that read a tensor's values skip themselves then."""
    return not (t.is_meta or isinstance(t, FakeTensor))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left- or right-padded mask (B, T) -> position ids counting only real tokens (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------------
# Scalar head (reward and value models)

class ScalarHead(nn.Module):
    """Linear(hidden, 1). Reward: read at the last real token. Value: read at every token."""

    def __init__(self, hidden: int, zero_init: bool = False):
        super().__init__()
        self.proj = Linear(hidden, 1)
        nn.init.zeros_(self.proj.bias)
        if zero_init:
            nn.init.zeros_(self.proj.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w, b = self.proj.weight.to(hidden.dtype), self.proj.bias.to(hidden.dtype)   # an fp32 head on bf16 states
        return F.linear(hidden, w, b).squeeze(-1).float()                  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row, for left or right padding. (B, T) -> (B,)"""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values


def gather_last(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) -> (B, ...) at the last real token of each row."""
    idx = last_token_index(attention_mask)
    return x[torch.arange(x.shape[0], device=x.device), idx]


# ----------------------------------------------------------------------------------------------------
# Log-probs without float32 logits for the whole batch at once

def _chunk_logprob_entropy(h: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, temperature: float):
    logits = F.linear(h, weight).float() / temperature                     # (n, V)
    logz = torch.logsumexp(logits, dim=-1)
    lp = logits.gather(-1, tgt[:, None]).squeeze(-1) - logz
    p = torch.softmax(logits, dim=-1)
    ent = logz - (p * logits).sum(-1)
    return lp, ent


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                   temperature: float = 1.0, with_entropy: bool = False):
    """log p(targets) from hidden states (B, T, D) and lm_head weight (V, D), `chunk` rows at a time.
    Each chunk is recomputed in backward (checkpoint), so peak memory holds one chunk's logits, not
    B*T*V floats. Returns (B, T) fp32 log-probs (and entropies when with_entropy)."""
    B, T, D = hidden.shape
    h = hidden.reshape(B * T, D)
    tgt = targets.reshape(B * T).clamp(min=0)       # ignored positions (-100) are masked by the caller
    lps, ents = [], []
    for i in range(0, B * T, chunk):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_logprob_entropy, h[i:i + chunk], weight,
                                                        tgt[i:i + chunk], temperature, use_reentrant=False)
        else:
            lp, ent = _chunk_logprob_entropy(h[i:i + chunk], weight, tgt[i:i + chunk], temperature)
        lps.append(lp)
        ents.append(ent)
    lp = torch.cat(lps).view(B, T)
    if with_entropy:
        return lp, torch.cat(ents).view(B, T)
    return lp


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy; top_p < 1 keeps the nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) > top_p          # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_from_noise(logits: torch.Tensor, noise: torch.Tensor, temperature: float,
                      top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row from softmax(logits / temperature), cut to the top-p nucleus, given iid Exp(1)
    noise (B, V): argmax(p / noise) is a draw from p (independent exponential clocks with rates p_i:
    the first to ring is i with probability p_i). Drawing the noise outside keeps a torch.Generator in
    charge of the randomness while this function, sync-free and shape-static, compiles into a few fused
    kernels (the compiled rollout path). -> (tokens (B,), log-probs (B,) under softmax(logits/temperature))."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)          # (B, V)
    p = logp.exp()
    if top_p < 1.0:
        sp, si = p.sort(dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) > top_p                                 # as sample_next, in sorted order
        p = p.masked_fill(torch.zeros_like(drop).scatter(-1, si, drop), 0.0)
    tok = (p / noise.clamp_min(1e-30)).argmax(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# lm_head fused with log-probs / cross-entropy, in chunks, with hand-written backward. Unlike
# token_logprobs (autograd through a checkpoint), the backward here works straight from the saved
# log-normaliser: one recomputed matmul and one pass over each chunk's logits instead of autograd's
# chain of softmax / gather / logsumexp nodes, and never more than one chunk of logits alive.

class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, chunk: int, temperature: float,
                with_entropy: bool):
        # h (N, D), weight (V, D), tgt (N,) -> lp (N,), ent (N,) fp32 (ent empty without with_entropy)
        N = h.shape[0]
        lp = torch.empty(N, device=h.device, dtype=torch.float32)
        lse = torch.empty_like(lp)
        ent = torch.empty_like(lp) if with_entropy else lp.new_empty(0)
        for i in range(0, N, chunk):
            z = F.linear(h[i:i + chunk], weight).float() / temperature                # (n, V)
            lse[i:i + chunk] = lz = torch.logsumexp(z, dim=-1)
            lp[i:i + chunk] = z.gather(-1, tgt[i:i + chunk, None]).squeeze(-1) - lz
            if with_entropy:
                ent[i:i + chunk] = lz - (torch.exp(z - lz[:, None]) * z).sum(-1)    # H = lse - E_p[z]
        ctx.save_for_backward(h, weight, tgt, lse, ent)
        ctx.chunk, ctx.temperature, ctx.with_entropy = chunk, temperature, with_entropy
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp: torch.Tensor, g_ent: torch.Tensor):
        h, weight, tgt, lse, ent = ctx.saved_tensors
        chunk, t = ctx.chunk, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        for i in range(0, h.shape[0], chunk):
            hc = h[i:i + chunk]
            z = F.linear(hc, weight).float() / t
            logp = z - lse[i:i + chunk, None]                                         # (n, V)
            p = logp.exp()
            # d lp / dz = onehot - p ;  d H / dz = -p (log p + H)
            dz = -p * g_lp[i:i + chunk, None]
            dz.scatter_add_(-1, tgt[i:i + chunk, None], g_lp[i:i + chunk, None])
            if ctx.with_entropy:
                dz -= g_ent[i:i + chunk, None] * p * (logp + ent[i:i + chunk, None])
            dz = (dz / t).to(weight.dtype)
            if need_h:
                dh[i:i + chunk] = dz @ weight
            if need_w:
                dw += (dz.t() @ hc).float()
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None, None


def fused_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                         temperature: float = 1.0, with_entropy: bool = False):
    """Same contract as token_logprobs (and equal to it), faster: hand-written chunked backward."""
    B, T, D = hidden.shape
    lp, ent = _FusedLogprobs.apply(hidden.reshape(B * T, D), weight, targets.reshape(B * T).clamp(min=0),
                                   chunk, temperature, with_entropy)
    return (lp.view(B, T), ent.view(B, T)) if with_entropy else lp.view(B, T)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(softmax(h_i @ W.T), t_i) over N rows. The loss is a scalar, so its gradient is
    known up to the upstream factor while each chunk's logits are still in hand: forward computes
    d/dh and d/dW chunk by chunk and backward only scales them. Three matmuls per chunk, as unfused
    autograd does, but no (N, V) logits tensor and no recomputation."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, row_w: torch.Tensor, chunk: int,
                grad: bool):
        N = h.shape[0]
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        rows = torch.arange(min(chunk, N), device=h.device)
        for i in range(0, N, chunk):
            hc, tc, wc = h[i:i + chunk], tgt[i:i + chunk], row_w[i:i + chunk]
            z = F.linear(hc, weight).float()                                         # (n, V)
            lz = torch.logsumexp(z, dim=-1)
            total += ((lz - z.gather(-1, tc[:, None]).squeeze(-1)) * wc).sum()
            if need_h or need_w:
                dz = torch.exp(z.sub_(lz[:, None]))                                  # softmax, in place
                dz[rows[:hc.shape[0]], tc] -= 1.0
                dz = (dz * wc[:, None]).to(weight.dtype)
                if need_h:
                    dh[i:i + chunk] = dz @ weight
                if need_w:
                    dw += (dz.t() @ hc).float()
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * g.to(dh.dtype)), (None if dw is None else dw * g.to(dw.dtype)), \
            None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk: int = 2048, select_rows: bool = True) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T) against targets over the rows whose target is
    not ignore_index. hidden (..., D), targets (...). Gradients are made in forward
    (_LinearCrossEntropy). select_rows: only those rows go through the lm_head (prompt and image
    positions cost nothing); False runs every row and weights the ignored ones 0 (static shapes)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    keep = t != ignore_index
    n = int(keep.sum())
    if n == 0:
        return (h.sum() * 0.0).float() + (weight.sum() * 0.0).float()   # zero, still connected to the graph
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if select_rows:
        h, t = h[keep], t[keep]
        row_w = torch.full((n,), 1.0 / n, device=h.device)
    else:
        row_w = keep.float() / n
    return _LinearCrossEntropy.apply(h, weight, t.clamp(min=0), row_w, chunk, grad)


# ----------------------------------------------------------------------------------------------------
# The model

class LLaVA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.vision = None if cfg.text_only else CLIPVision(cfg)
        self.projector = None if cfg.text_only else Projector(cfg)
        self.llm = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.adapters: dict[str, dict] = {}  # name -> {"r", "alpha", "dropout", "targets"}

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    # -- embeddings with images spliced in --------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, num_image_tokens, hidden)."""
        return self.projector(self.vision(images))

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, D) with image features at every IMAGE_TOKEN_INDEX position, in order."""
        is_img = input_ids == IMAGE_TOKEN_INDEX
        n_img = 0 if images is None else images.shape[0]
        n_pos = int(is_img.sum()) if has_values(is_img) else n_img * self.num_image_tokens
        if self.config.text_only and (n_img or n_pos):
            raise ValueError("this is a text-only LLaMA (loaded without a vision tower): it takes no images")
        if n_pos != n_img * self.num_image_tokens:
            raise ValueError(f"input_ids hold {n_pos} image positions (IMAGE_TOKEN_INDEX) but {n_img} images "
                             f"give {n_img * self.num_image_tokens} features ({self.num_image_tokens} per image)")
        x = self.llm.embed_tokens(input_ids.masked_fill(is_img, 0))        # (B, T, D)
        if n_img:
            feats = self.encode_images(images).to(x.dtype)                 # (N, P, D)
            x = x.masked_scatter(is_img[..., None], feats.reshape(-1, x.shape[-1]))
        return x

    # -- decoder ---------------------------------------------------------------------------------------
    def decode(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
               cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Run the LLaMA layers on embeddings x (B, T, D) -> final-normed hidden states (B, T, D)."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        for layer in self.llm.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(_pinned_adapters(layer), x, cos, sin, mask, cache, start,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, start)
        return self.llm.norm(x)

    def hidden_states(self, input_ids: torch.Tensor, images: torch.Tensor | None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) final hidden states. Positions count real tokens only, so left- and
        right-padded batches give the same states at real tokens."""
        x = self.embed(input_ids, images)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = positions_from_mask(attention_mask)
        mask = causal_or_padded_mask(attention_mask.bool())
        return self.decode(x, positions, mask)

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits (B, T, V) in the model's dtype."""
        return self.lm_head(self.hidden_states(input_ids, images, attention_mask))

    def logprobs(self, input_ids: torch.Tensor, images: torch.Tensor | None, attention_mask: torch.Tensor,
                 chunk: int = 1024, with_entropy: bool = False, temperature: float = 1.0):
        """log p(input_ids[:, t+1] | ..t) for t < T-1, chunked. -> (B, T-1) fp32 (and entropy)."""
        h = self.hidden_states(input_ids, images, attention_mask)[:, :-1]
        return token_logprobs(h, self.lm_head.weight, input_ids[:, 1:], chunk, temperature, with_entropy)

    def lm_loss(self, input_ids: torch.Tensor, images: torch.Tensor | None, attention_mask: torch.Tensor | None,
                labels: torch.Tensor, chunk: int = 2048, select_rows: bool = True) -> torch.Tensor:
        """Mean next-token cross-entropy over labels != -100 (labels aligned with input_ids, as in
        transformers: position t predicts labels[t+1]). The fast training loss: the lm_head runs only
        on the labelled rows (select_rows), fused with the loss and its gradient (linear_cross_entropy)."""
        h = self.hidden_states(input_ids, images, attention_mask)[:, :-1]
        return linear_cross_entropy(h, self.lm_head.weight, labels[:, 1:], -100, chunk, select_rows)

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int = 2,
                 generator: torch.Generator | None = None, pad_token_id: int = 0,
                 return_logprobs: bool = False, decode_fn=None, compile: bool = False):
        """Batched KV-cache generation from left-padded prompts (B, T).
        Returns new tokens (B, <=max_new_tokens), pad_token_id after each row's EOS (EOS itself kept);
        with return_logprobs also (B, n) fp32 log-probs of each token under softmax(logits/temperature)
        (temperature 0: under the raw logits), 0 after EOS.
        `decode_fn` replaces the one-token decode step. compile=True: decode steps run the compiled
        static-cache step (self.static_decoder(): compiled once per batch size and bucketed cache
        length, reused across calls) and sampling runs the compiled sample_from_noise (same
        distribution as sample_next, another random stream); the prefill runs eager with the fused
        RMSNorm/rotary/SwiGLU kernels (use_fused_kernels) and, on CPU, every linear of prefill and
        decode goes through oneDNN with prepacked weights (use_packed_cpu_linear)."""
        with packed_cpu_linear(compile and input_ids.device.type == "cpu"), fused_kernels(compile):
            B, T = input_ids.shape
            dev = input_ids.device
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            attention_mask = attention_mask.bool()
            if max_new_tokens <= 0:
                empty = torch.empty(B, 0, dtype=torch.long, device=dev)
                return (empty, empty.float()) if return_logprobs else empty
            x = self.embed(input_ids, images)
            total = T + max_new_tokens
            dec = self.static_decoder() if compile else None
            if dec is not None:
                decode_fn = decode_fn or dec
                cache = dec.cache(B, total, dev, x.dtype)        # persistent, length rounded up to a bucket
                total = cache.max_len
            else:
                cache = KVCache(self.config, B, total, dev, x.dtype)
            key_valid = torch.zeros(B, total, dtype=torch.bool, device=dev)
            key_valid[:, :T] = attention_mask
            positions = positions_from_mask(attention_mask)
            h = self.decode(x, positions, causal_or_padded_mask(key_valid[:, :T]), cache, 0)
            logits = self.lm_head(h[:, -1]).float()                                   # (B, V)
            next_pos = positions[:, -1] + 1                                           # (B,)
            done = torch.zeros(B, dtype=torch.bool, device=dev)
            toks, lps = [], []
            step = decode_fn or self.decode_one
            for i in range(max_new_tokens):
                if dec is not None and temperature > 0:
                    tok, lp = dec.sample(logits, temperature, top_p, generator)
                    if return_logprobs:
                        lps.append(lp.masked_fill(done, 0.0))
                else:
                    tok = sample_next(logits, temperature, top_p, generator)
                    if return_logprobs:
                        t = temperature if temperature > 0 else 1.0
                        lp = torch.log_softmax(logits / t, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
                        lps.append(lp.masked_fill(done, 0.0))
                tok = tok.masked_fill(done, pad_token_id)
                toks.append(tok)
                done = done | (tok == eos_token_id)
                if i == max_new_tokens - 1 or (has_values(done) and bool(done.all())):
                    break
                key_valid[:, T + i] = True
                logits = step(tok, next_pos, cache, T + i, key_valid).float()
                next_pos = next_pos + 1
            out = torch.stack(toks, dim=1)
            return (out, torch.stack(lps, dim=1)) if return_logprobs else out

    def decode_one(self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache, start: int,
                   key_valid: torch.Tensor) -> torch.Tensor:
        """One decode step: token (B,) at cache slot `start` -> next logits (B, V). Attends over the
        valid prefix only (eager path; the compiled path attends over the whole static cache)."""
        x = self.llm.embed_tokens(tok[:, None])                                    # (B, 1, D)
        mask = attention_mask_4d(key_valid[:, :start + 1], 1, start)
        h = self.decode(x, pos[:, None], mask, cache, start)
        return self.lm_head(h[:, -1])

    def decode_step_static(self, tok: torch.Tensor, pos: torch.Tensor, start: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """One decode step written for torch.compile: tok, pos (B,) long; start (1,) long, the cache slot
        of this token; k_cache/v_cache (L, B, Hkv, S, hd), the whole static cache, updated in place;
        key_valid (B, S) bool. -> logits (B, V) fp32.
        Every tensor has the same shape at every step (attention covers all S slots, masked by
        key_valid, and `start` is data, not a Python int), so one compiled graph serves the whole
        generation. The cache is written with index_put_ on the full cache tensor (tensor indices
        in every leading dim) because inductor turns that into an in-place write of B*Hkv rows; a
        write through a view (cache[i][..., start, :]) gets functionalised into a copy of the cache."""
        c = self.config
        B, S = key_valid.shape
        hd, Hkv, rep = c.head_dim, c.kv_heads, c.heads // c.kv_heads
        dev = tok.device
        x = self.llm.embed_tokens(tok)[:, None]                                    # (B, 1, D)
        cos, sin = rope_cos_sin(pos[:, None], hd, c.rope_theta)                    # (B, 1, hd)
        mask = key_valid[:, None, None, :]            # (B, 1, 1, S); slot `start` is set by the caller
        b_idx = torch.arange(B, device=dev)[:, None]                               # (B, 1)
        h_idx = torch.arange(Hkv, device=dev)[None, :]                             # (1, Hkv)
        for i, layer in enumerate(self.llm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, 1, c.heads, hd).transpose(1, 2)            # (B, H, 1, hd)
            k = attn.k_proj(h).view(B, 1, Hkv, hd).transpose(1, 2)                # (B, Hkv, 1, hd)
            v = attn.v_proj(h).view(B, Hkv, hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            layer_idx = torch.full((1,), i, dtype=torch.long, device=dev)
            k_cache.index_put_((layer_idx, b_idx, h_idx, start), k[:, :, 0])      # (B, Hkv, hd) at slot start
            v_cache.index_put_((layer_idx, b_idx, h_idx, start), v)
            # grouped-query attention without repeating the cache: the rep query heads sharing a kv
            # head go in as rep query rows against it (one token, so no causal order among them)
            qg = q.reshape(B, Hkv, rep, hd)
            y = F.scaled_dot_product_attention(qg, k_cache[i], v_cache[i], attn_mask=mask)  # (B, Hkv, rep, hd)
            x = x + attn.o_proj(y.reshape(B, 1, c.heads * hd))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.llm.norm(x)[:, 0]).float()                      # (B, V)

    def static_decoder(self, compile: bool | None = None, mode: str | None = None) -> "StaticDecoder":
        """The model's StaticDecoder for (compile, mode), made on first use and kept for the model's
        lifetime so that compiled graphs and the static cache are reused across generate calls.
        generate(compile=True) uses the one asked for last (compiled, default mode if none was), so
        `m.static_decoder(mode="reduce-overhead")` once selects CUDA graphs for later rollouts."""
        decs = _DECODERS.setdefault(self, {})
        if compile is None and mode is None and decs:
            return decs[next(reversed(decs))]
        key = (True if compile is None else compile, mode)
        dec = decs.pop(key, None) or StaticDecoder(self, compile=key[0], mode=mode)
        decs[key] = dec   # re-inserted: now the most recent
        return dec

    # -- LoRA ------------------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoRALinear]]:
        for name, mod in self.named_modules():
            if isinstance(mod, LoRALinear):
                yield name, mod

    def add_adapter(self, name: str, r: int = 64, alpha: float = 16.0, dropout: float = 0.0,
                    targets: tuple[str, ...] | list[str] = LORA_TARGETS) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} exists already")
        bad = set(targets) - set(LORA_TARGETS)
        if bad:
            raise ValueError(f"unknown LoRA targets {sorted(bad)}; choose from {LORA_TARGETS}")
        for path, mod in self.lora_layers():
            if path.rsplit(".", 1)[-1] in targets:
                mod.add_adapter(name, r, alpha, dropout)
        self.adapters[name] = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)}

    def set_adapter(self, name: str | None) -> None:
        """Make `name` the active adapter everywhere; None runs the bare base model."""
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; have {sorted(self.adapters)}")
        for _, mod in self.lora_layers():
            mod.active_adapter = name if (name is not None and name in mod.lora_A) else None

    @property
    def active_adapter(self) -> str | None:
        for _, mod in self.lora_layers():
            if mod.active_adapter is not None:
                return mod.active_adapter
        return None

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        ps = []
        for _, mod in self.lora_layers():
            if name in mod.lora_A:
                ps += [mod.lora_A[name], mod.lora_B[name]]
        return ps

    def merge_adapter(self, name: str) -> None:
        for _, mod in self.lora_layers():
            if name in mod.lora_A:
                mod.merge(name)
        del self.adapters[name]

    def delete_adapter(self, name: str) -> None:
        for _, mod in self.lora_layers():
            if name in mod.lora_A:
                mod.delete(name)
        del self.adapters[name]

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Our key names (`llm.layers.0.self_attn.q_proj`) -> {`..lora_A`, `..lora_B`} tensors."""
        sd = {}
        for path, mod in self.lora_layers():
            if name in mod.lora_A:
                sd[f"{path}.lora_A"] = mod.lora_A[name].detach()
                sd[f"{path}.lora_B"] = mod.lora_B[name].detach()
        return sd

    def save_adapter(self, out_dir: str, name: str) -> None:
        """Save adapter `name` in peft's layout, keyed as the original LLaVA / LlamaForCausalLM model
        (`base_model.model.model.layers.N...lora_A.weight`), as the released LLaVA-RLHF adapters are."""
        weights.save_adapter(out_dir, self.adapter_state_dict(name), self.adapters[name])

    def load_adapter(self, path: str, name: str = "default", trainable: bool = False) -> None:
        """Load a peft-layout adapter folder (any key prefix ending in `layers.N.<block>.<proj>`)."""
        meta, sd = weights.read_adapter(path)
        self.add_adapter(name, **meta)
        mods = {p: mod for p, mod in self.lora_layers() if name in mod.lora_A}
        extra = sorted({k.rsplit(".", 1)[0] for k in sd} - set(mods))
        if extra:
            raise ValueError(f"{path}: adapter tensors for {extra[:4]} have no place in the model")
        missing = [p for p in mods if f"{p}.lora_A" not in sd and f"{p}.lora_B" not in sd]
        if missing:
            raise ValueError(f"{path}: adapter has no tensors for {missing[:4]}{'...' if len(missing) > 4 else ''}")
        for p, mod in mods.items():
            for which, param in (("A", mod.lora_A[name]), ("B", mod.lora_B[name])):
                t = sd.get(f"{p}.lora_{which}")
                if t is None:
                    raise ValueError(f"{path}: missing lora_{which} for {p}")
                if tuple(t.shape) != tuple(param.shape):
                    raise ValueError(f"{path}: adapter tensor {p}.lora_{which} has shape {tuple(t.shape)}, "
                                     f"model expects {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(t.to(param.dtype))
                param.requires_grad_(trainable)

    # -- checkpoint I/O (the layouts are weights.py's) ------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, vision_tower: str | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", **config_overrides) -> "LLaVA":
        """Load from a local folder in any layout weights.py reads: our/transformers' Llava layout, the
        original LLaVA layout (vision tower from `vision_tower`, a local CLIP folder, when the config
        names a hub id), or a bare LLaMA folder plus `vision_tower` (a fresh projector: the start of
        pretraining). Built on the meta device, weights assigned shard by shard."""
        cfg, layout, vt_path = config_from_folder(path, vision_tower, **config_overrides)
        with torch.device("meta"):
            m = cls(cfg)
        dtype = weights.load_folder_into(m, path, layout, dtype, device, skip_prefixes=("vision.",) if vt_path else ())
        if vt_path:
            weights.load_folder_into(m, vt_path, "clip", dtype, device)
        if layout == "llama" and not cfg.text_only:
            weights.init_fresh(m, "projector.", dtype, device)
        missing = [k for k, v in list(m.named_parameters()) + list(m.named_buffers()) if v.is_meta]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
        return m

    def save_pretrained(self, out_dir: str, max_shard_bytes: int = 5 * 2**30) -> None:
        """Save base weights in transformers' Llava layout (config.json + safetensors shards).
        LoRA adapters are not part of it: merge_adapter first, or save_adapter."""
        weights.save_llava(self.config, self.state_dict(), out_dir, max_shard_bytes)


# ----------------------------------------------------------------------------------------------------
# Compiled decoding

def compile_available() -> tuple[bool, str]:
    """Whether torch.compile's default backend (inductor) works here: on CPU it needs a C++ compiler.
    -> (ok, reason if not). Cheap: checks for the compiler, compiles nothing."""
    if not hasattr(torch, "compile"):
        return False, "torch.compile is missing (torch < 2.0)"
    try:
        importlib.import_module("torch._inductor.config")
    except Exception as e:  # noqa: BLE001
        return False, f"inductor unavailable: {e}"
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return False, f"no C++ compiler ({cxx}) for inductor's CPU kernels"
    return True, ""


def _graphs_compiled() -> int:
    """Process-wide count of graphs torch.compile has produced (dynamo's own counter)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


class StaticDecoder:
    """decode_fn for LLaVA.generate running LLaVA.decode_step_static, through torch.compile
    (fullgraph=True, dynamic=False) unless compile=False, plus the compiled sampler.
    Shapes are the same at every step, so a generation compiles once per (batch, cache length,
    dtype, device, adapter, train/eval) and then only replays. `compiles` counts every graph built
    for this decoder; `recompiles` counts those built again for a signature already compiled,
    i.e. something that changed between steps and defeated the static shapes: it should stay 0.
    The KV cache is kept between calls (cache()) with its length rounded up to `bucket`, so that
    prompts of nearby lengths share a graph; with mode="reduce-overhead" (CUDA graphs) its address is
    marked static, so that graph replays write into it directly instead of into a copy."""

    def __init__(self, model: "LLaVA", compile: bool = True, mode: str | None = None, bucket: int = 64):
        self._model = weakref.ref(model)   # the decoder lives in _DECODERS keyed by the model: no cycle
        self.compiled, self.mode, self.bucket = compile, mode, bucket
        self.compiles = self.recompiles = 0
        self.signatures: set[tuple] = set()
        self._kv: KVCache | None = None
        self._cudagraphs = compile and mode in ("reduce-overhead", "max-autotune")
        step, sample = LLaVA.decode_step_static, sample_from_noise
        if compile:
            step = torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
            sample = torch.compile(sample, fullgraph=True, dynamic=False)
        self._step, self._sample = step, sample

    def _count(self, before: int, signature) -> None:
        n = _graphs_compiled() - before
        if n:  # only on a compile: the steady state pays two integer reads per step
            self.compiles += n
            sig = signature()
            if sig in self.signatures:
                self.recompiles += n
            self.signatures.add(sig)

    def cache(self, batch: int, min_len: int, device, dtype) -> KVCache:
        """A zeroed KVCache of at least min_len slots: the kept one when it fits (same batch, dtype and
        device, and not over twice the bucketed length asked for), else a new one of the bucketed
        length. Reuse keeps shapes (no compile) and addresses (no CUDA-graph re-recording) stable."""
        m = self._model()
        S = -(-min_len // self.bucket) * self.bucket
        kv = self._kv
        if (kv is None or kv.k.shape[1] != batch or not S <= kv.max_len <= 2 * S
                or kv.k.device != torch.device(device) or kv.k.dtype != dtype):
            self._kv = None  # free the old one first
            kv = self._kv = KVCache(m.config, batch, S, device, dtype)
            if self._cudagraphs:
                torch._dynamo.mark_static_address(kv.k)
                torch._dynamo.mark_static_address(kv.v)
        else:
            kv.k.zero_()   # masked slots are never read, but stale NaN/inf would still poison p @ v
            kv.v.zero_()
        return kv

    def release(self) -> None:
        """Drop the kept KV cache (memory back to the allocator)."""
        self._kv = None

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache, start: int,
                 key_valid: torch.Tensor) -> torch.Tensor:
        m = self._model()
        start_t = torch.full((1,), start, dtype=torch.long, device=tok.device)
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        before = _graphs_compiled()
        out = self._step(m, tok, pos, start_t, cache.k, cache.v, key_valid)
        self._count(before, lambda: ("step", tuple(key_valid.shape), cache.k.dtype, str(tok.device),
                                     m.active_adapter, m.training))
        return out

    def sample(self, logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.empty(logits.shape, device=logits.device, dtype=torch.float32).exponential_(generator=generator)
        before = _graphs_compiled()
        tok, lp = self._sample(logits, noise, temperature, top_p)
        self._count(before, lambda: ("sample", tuple(logits.shape), logits.dtype, temperature, top_p))
        return tok, lp


# model -> {(compile, mode): StaticDecoder}, the most recently asked for last
_DECODERS: "weakref.WeakKeyDictionary[LLaVA, dict[tuple, StaticDecoder]]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------------
# Loading

def config_from_folder(path: str, vision_tower: str | None = None, **overrides) -> tuple[ModelConfig, str, str | None]:
    """-> (config, layout, folder to take the vision tower from or None); layouts: see weights.py."""
    return weights.config_from_folder(path, ModelConfig, vision_tower, **overrides)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def torch_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """auto: bf16 on GPU, fp32 on CPU (CPUs have no fast bf16 matmul everywhere)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, fp32, bf16 or fp16, got {name!r}")
    return DTYPES[name]


def load_model(model_path: str = "", vision_tower: str = "", preset: str = "", vocab_size: int = 0,
               dtype: str = "auto", device: torch.device | str = "cpu", seed: int = 0) -> LLaVA:
    """The stages' model: from a local folder (any layout weights.py reads) or, with `preset`, freshly
    initialised from `seed` (the tiny world trains from scratch)."""
    dev = torch.device(device)
    dt = torch_dtype(dtype, dev)
    if model_path:
        return LLaVA.from_pretrained(model_path, vision_tower=vision_tower or None, dtype=dt, device=dev)
    if preset:
        overrides = {"vocab_size": vocab_size} if vocab_size else {}
        torch.manual_seed(seed)
        return LLaVA(ModelConfig.preset(preset, **overrides)).to(device=dev, dtype=dt)
    raise ValueError("give --model_path (a local checkpoint folder) or --model_preset")


def count_params(m: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)
