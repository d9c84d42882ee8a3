"""The LLaVA model from scratch: CLIP vision tower -> projector -> LLaMA decoder.

Plain PyTorch, numerically equal to transformers' CLIPVisionModel / LlamaForCausalLM /
LlavaForConditionalGeneration (tests/test_model.py proves it on tiny random configs). Also here:
LoRA adapters (several named adapters on one frozen base), a scalar head for reward and value models,
batched KV-cache generation, chunked log-probs, and from_pretrained / save_pretrained over the
checkpoint layouts that weights.py maps (transformers' Llava, original LLaVA, LLaMA, CLIP, peft).

    import model
    m = model.LLaVA.from_pretrained("/ckpt/llava-v1.5-7b", vision_tower="/ckpt/clip-vit-large-patch14-336")
    logits = m(input_ids, images, attention_mask)          # (B, T, V)
    new = m.generate(input_ids, images, attention_mask, max_new_tokens=64)
    lp = model.token_logprobs(m.hidden_states(ids, images, mask)[:, :-1], m.lm_head.weight, ids[:, 1:])
    m.save_pretrained("/ckpt/out")                         # transformers' Llava layout

The speed machinery, all off by default, lives in kernels.py and changes how fast, never what, this
file computes: generate(..., compile=True) runs decode_one and the sampler through torch.compile,
token_logprobs(..., fused=True) takes a hand-written backward, and kernels switches on the packed
CPU linear and the compiled elementwise kernels (@kernels.fusable below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import common
import kernels
import weights

IMAGE_TOKEN_INDEX = -200  # LLaVA's marker id in input_ids: projected patch features go there
# A decode step attends over the filled part of the KV cache rounded up to this many slots: it reads what
# was written (the bandwidth floor), not the whole preallocated cache, and a compiled decode has one graph
# per span length (a 64-slot step costs ~nothing more than a 40-slot one; a graph per length would be many)
DECODE_SPAN = 64


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
# Linear layers

class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint keys). Its forward is F.linear, or oneDNN with a
    prepacked weight for no-grad CPU inference when kernels.use_packed_cpu_linear is on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


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

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        """rslora: scale alpha / sqrt(r) (rank-stabilised LoRA, peft's use_rslora) instead of alpha / r."""
        dev, dt = self.weight.device, self.weight.dtype
        a = torch.empty(r, self.in_features, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft: B = 0 makes a fresh adapter a no-op
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))
        self.lora_scale[name] = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout[name] = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.linear(x, self.weight, self.bias)
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

# @kernels.fusable: these run as written, or through torch.compile under kernels.use_fused_kernels.

@kernels.fusable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # normalise in fp32 whatever the storage dtype, as LLaMA does
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@kernels.fusable
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, T, head_dim) in fp32, the two halves repeated (rotate-half form)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim))
    ang = positions.float()[..., None] * inv_freq                          # (B, T, hd/2)
    ang = torch.cat([ang, ang], dim=-1)                                    # (B, T, hd)
    return ang.cos(), ang.sin()


@kernels.fusable
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (B, T, hd)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class KVCache:
    """Static, preallocated cache: (layers, B, kv_heads, max_len, head_dim) for keys and values."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, hd) at cache slots (T,) long of `layer` -> that layer's whole cache
        (B, Hkv, max_len, hd). One index_put_ on the whole cache tensor, a tensor index in every
        leading dim and the slots as data: under torch.compile a decode step then has one graph for
        every slot, and inductor makes the write an in-place store of B*Hkv*T rows; a write through
        a view (cache[layer][:, :, slots]) gets functionalised into a copy of the cache."""
        B, H, T, _ = k.shape
        dev = k.device
        idx = (torch.full((1, 1, 1), layer, dtype=torch.long, device=dev),
               torch.arange(B, device=dev)[:, None, None],                    # (B, 1, 1)
               torch.arange(H, device=dev)[None, :, None],                    # (1, Hkv, 1)
               slots[None, None])                                             # (1, 1, T)
        self.k.index_put_(idx, k)
        self.v.index_put_(idx, v)
        return self.k[layer], self.v[layer]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd = cfg.head_dim
        self.q_proj = LoRALinear(cfg.hidden, cfg.heads * hd)
        self.k_proj = LoRALinear(cfg.hidden, cfg.kv_heads * hd)
        self.v_proj = LoRALinear(cfg.hidden, cfg.kv_heads * hd)
        self.o_proj = LoRALinear(cfg.heads * hd, cfg.hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); mask (B, 1, T, S) bool, True = may attend. With a cache, the keys and values of
        these T tokens are written at cache `slots` (T,) and the queries attend over the first S cache
        slots (a decode step: S = the whole cache, masked). mask None means plain causal attention over
        these T tokens (no padding, or padding on the right only; with a cache they must be its first T
        slots): SDPA then takes its is_causal path, which skips the masked half of the score blocks."""
        B, T, _ = x.shape
        c, hd = self.cfg, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, c.heads, hd).transpose(1, 2)          # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, c.kv_heads, hd).transpose(1, 2)       # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, c.kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, slots, k, v)                 # (B, Hkv, max_len, hd)
            S = T if mask is None else mask.shape[-1]
            k, v = k[:, :, :S], v[:, :, :S]                                  # (B, Hkv, S, hd)
        if c.kv_heads != c.heads:   # grouped-query attention: each kv head serves heads/kv_heads query heads
            k = k.repeat_interleave(c.heads // c.kv_heads, dim=1)            # (B, H, S, hd)
            v = v.repeat_interleave(c.heads // c.kv_heads, dim=1)
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

    def forward(self, x, cos, sin, mask, cache=None, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots)
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


def attention_mask_4d(key_valid: torch.Tensor) -> torch.Tensor:
    """key_valid (B, T) bool -> (B, 1, T, T) bool: causal and no padding. The diagonal is always
    allowed so that a padded query row never sees an empty set (NaN)."""
    T = key_valid.shape[1]
    pos = torch.arange(T, device=key_valid.device)
    causal = pos[None, :] <= pos[:, None]                                          # (T, T): key <= query
    mask = (causal[None] & key_valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=key_valid.device)
    return mask[:, None]                                                           # (B, 1, T, T)


def causal_or_padded_mask(key_valid: torch.Tensor) -> torch.Tensor | None:
    """key_valid (B, T) bool -> None when no row is padded on the left or inside (plain causal: SDPA's
    is_causal path), else the (B, 1, T, T) mask of attention_mask_4d. Right padding alone needs no mask:
    under causality a real query sees only keys before it, all real, so its output is the masked one;
    the pad rows' outputs differ, and every caller ignores them (losses mask them, the RM reads the last
    real token). The is_causal path skips the masked half of the score blocks on CPU and, on a GPU, runs
    the flash kernel that an explicit mask rules out. A mask without values is the rehearsal's, whose
    rows are all full length: None as well."""
    if not has_values(key_valid):
        return None
    lengths = key_valid.sum(-1, keepdim=True)                                      # (B, 1)
    right_padded = bool((key_valid == (torch.arange(key_valid.shape[1], device=key_valid.device) < lengths)).all())
    return None if right_padded else attention_mask_4d(key_valid)


# False for a tensor without data (fake: rehearse.py; or meta): the checks that read values skip it.
# weights.py's, where loading checks that every weight is finite.
has_values = weights.has_values


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

def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, temperature: float,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(h, weight).float() / temperature                     # (n, V)
    logz = torch.logsumexp(logits, dim=-1)                                 # (n,)
    lp = logits.gather(-1, tgt[:, None]).squeeze(-1) - logz
    if not with_entropy:
        return lp, lp.new_empty(0)
    return lp, logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)    # H = log Z - E_p[logits]


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                   temperature: float = 1.0, with_entropy: bool = False, fused: bool = False):
    """log p(targets) under softmax(hidden @ weight.T / temperature), from hidden states (B, T, D) and
    the lm_head weight (V, D), `chunk` rows at a time, so that peak memory holds one chunk's logits,
    not B*T*V floats. Returns (B, T) fp32 log-probs (and entropies when with_entropy). Targets < 0
    (ignored positions, -100) give a value the caller masks. The plain path recomputes each chunk in
    backward (checkpoint) and lets autograd differentiate it; fused=True runs kernels.FusedLogprobs,
    the same numbers with a hand-written backward (faster, less memory)."""
    B, T, D = hidden.shape
    h = hidden.reshape(B * T, D)
    tgt = targets.reshape(B * T).clamp(min=0)
    if fused:
        lp, ent = kernels.FusedLogprobs.apply(h, weight, tgt, chunk, temperature, with_entropy)
    else:
        grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        parts = []
        for i in range(0, B * T, chunk):
            args = (h[i:i + chunk], weight, tgt[i:i + chunk], temperature, with_entropy)
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
                         if grad else _chunk_logprobs(*args))
        lp, ent = (torch.cat(x) for x in zip(*parts))
    return (lp.view(B, T), ent.view(B, T)) if with_entropy else lp.view(B, T)


# ----------------------------------------------------------------------------------------------------
# Sampling: one sampler for eager and compiled generation

def pick_token(logits: torch.Tensor, noise: torch.Tensor, temperature: float,
               top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row from softmax(logits / temperature) cut to the top-p nucleus, given iid Exp(1)
    noise (B, V): argmax(p / noise) is a draw from p (independent exponential clocks with rates p_i:
    the first to ring is i with probability p_i). Sync-free and shape-static, so the compiled path
    compiles it into a few fused kernels. -> (tokens (B,), log-probs (B,) under softmax(logits/temperature))."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)          # (B, V)
    p = logp.exp()
    if top_p < 1.0:
        sp, si = p.sort(dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) > top_p          # keep the smallest prefix whose mass reaches top_p
        p = p.masked_fill(torch.zeros_like(drop).scatter(-1, si, drop), 0.0)   # back in vocabulary order
    tok = (p / noise.clamp_min(1e-30)).argmax(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                pick: Callable = pick_token) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> (token ids (B,), their log-probs (B,) under softmax(logits / temperature)).
    temperature 0 is greedy (log-probs under the raw logits); top_p < 1 keeps the nucleus. The noise
    is drawn here, from `generator`, so that `pick` (pick_token, or its compiled version) is a pure
    function: eager and compiled generation draw the same tokens from the same generator."""
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits.float(), dim=-1).gather(-1, tok[:, None]).squeeze(-1)
    noise = torch.empty(logits.shape, device=logits.device, dtype=torch.float32).exponential_(generator=generator)
    return pick(logits, noise, temperature, top_p)


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
        self.adapters: dict[str, dict] = {}  # name -> add_adapter's arguments
        # the checkpoint layout from_pretrained read (weights.py): save_adapter keys for that base by default
        self.source_layout = "llava_orig"

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    # -- embeddings with images spliced in --------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, num_image_tokens, hidden)."""
        return self.projector(self.vision(images))

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, D) with image features at every IMAGE_TOKEN_INDEX position, in order.
        images: pixels (N, 3, S, S), or their features (N, P, D) from encode_images, computed once and
        passed again to every later forward of the same images (PPO: the vision tower and projector are
        frozen, so the features of a rollout serve its sampling, scoring and updates unchanged)."""
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
            if images.dim() == 3 and tuple(images.shape[1:]) != (self.num_image_tokens, x.shape[-1]):
                raise ValueError(f"image features of shape {tuple(images.shape)}; this model's are "
                                 f"(N, {self.num_image_tokens}, {x.shape[-1]})")
            feats = (images if images.dim() == 3 else self.encode_images(images)).to(x.dtype)   # (N, P, D)
            x = x.masked_scatter(is_img[..., None], feats.reshape(-1, x.shape[-1]))
        return x

    # -- decoder ---------------------------------------------------------------------------------------
    def decode(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
               cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Run the LLaMA layers on embeddings x (B, T, D) at positions (B, T) -> final-normed hidden
        states (B, T, D). mask: see LlamaAttention; with a cache, keys go to cache `slots` (T,)."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        for layer in self.llm.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(_pinned_adapters(layer), x, cos, sin, mask, cache, slots,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, slots)
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

    # -- generation ------------------------------------------------------------------------------------
    def new_kv_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(self.config, batch, max_len, device, dtype)

    def decode_one(self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache, slot: torch.Tensor,
                   key_valid: torch.Tensor) -> torch.Tensor:
        """One decode step: tokens tok (B,) at positions pos (B,), written at cache slot `slot` (1,) long
        -> next-token logits (B, V) fp32. key_valid (B, S) bool marks which of the first S cache slots to
        attend to (the caller sets `slot` itself): generate passes the filled part of the cache rounded up
        to DECODE_SPAN slots, so that a step reads the keys and values written so far, not the whole
        preallocated cache. Every tensor has the same shape at every step of one span (masked slots, the
        slot as data, not a Python int), so under torch.compile (kernels.StaticDecoder) one graph serves
        each span: ceil(length / DECODE_SPAN) graphs per (batch, cache length), counted by the decoder."""
        x = self.llm.embed_tokens(tok[:, None])                                    # (B, 1, D)
        h = self.decode(x, pos[:, None], key_valid[:, None, None, :], cache, slot)  # mask (B, 1, 1, S)
        return self.lm_head(h[:, -1]).float()                                      # (B, V)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int = 2,
                 generator: torch.Generator | None = None, pad_token_id: int = 0,
                 return_logprobs: bool = False, decode_fn: Callable | None = None, compile: bool = False):
        """Batched KV-cache generation from left-padded prompts (B, T).
        Returns new tokens (B, <=max_new_tokens), pad_token_id after each row's EOS (EOS itself kept);
        with return_logprobs also (B, n) fp32 log-probs of each token under softmax(logits/temperature)
        (temperature 0: under the raw logits), 0 after EOS.
        `decode_fn(tok, pos, cache, slot, key_valid)` replaces decode_one. compile=True: the same steps
        and the same sampler compiled (kernels.static_decoder(self): one graph per batch size and
        bucketed cache length, reused across calls; the same tokens from the same generator), the
        prefill with kernels' fused elementwise kernels and, on CPU, each shape class of linears (decode,
        prefill) through MKL or prepacked oneDNN, whichever kernels.cpu_linear_plan measured faster here."""
        with kernels.cpu_linear(self, input_ids.shape[0], compile and input_ids.device.type == "cpu"), \
                kernels.fused_kernels(compile):
            B, T = input_ids.shape
            dev = input_ids.device
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            attention_mask = attention_mask.bool()
            if has_values(attention_mask) and not bool(attention_mask[:, -1].all()):
                raise ValueError("generate continues each row after its last column: the prompts must be "
                                 "left-padded (data.left_pad), but some row's last position is padding")
            if max_new_tokens <= 0:
                empty = torch.empty(B, 0, dtype=torch.long, device=dev)
                return (empty, empty.float()) if return_logprobs else empty
            x = self.embed(input_ids, images)                                         # (B, T, D)
            dec = kernels.static_decoder(self) if compile else None
            if dec is not None:
                cache = dec.cache(B, T + max_new_tokens, dev, x.dtype)   # persistent, length bucketed
                step, pick = decode_fn or dec, dec.pick(pick_token)
            else:
                cache = self.new_kv_cache(B, T + max_new_tokens, dev, x.dtype)
                step, pick = decode_fn or self.decode_one, pick_token
            key_valid = torch.zeros(B, cache.max_len, dtype=torch.bool, device=dev)  # (B, S)
            key_valid[:, :T] = attention_mask
            positions = positions_from_mask(attention_mask)                           # (B, T)
            h = self.decode(x, positions, causal_or_padded_mask(attention_mask), cache,
                            torch.arange(T, device=dev))
            logits = self.lm_head(h[:, -1]).float()                                   # (B, V)
            next_pos = positions[:, -1] + 1                                           # (B,)
            slot = torch.full((1,), T, dtype=torch.long, device=dev)
            done = torch.zeros(B, dtype=torch.bool, device=dev)
            toks, lps = [], []
            for i in range(max_new_tokens):
                tok, lp = sample_next(logits, temperature, top_p, generator, pick)
                tok = tok.masked_fill(done, pad_token_id)
                toks.append(tok)
                lps.append(lp.masked_fill(done, 0.0))
                done = done | (tok == eos_token_id)
                if i == max_new_tokens - 1 or (has_values(done) and bool(done.all())):
                    break
                key_valid[:, T + i] = True
                span = min(cache.max_len, -(-(T + i + 1) // DECODE_SPAN) * DECODE_SPAN)   # filled, bucketed
                logits = step(tok, next_pos, cache, slot, key_valid[:, :span]).float()
                next_pos, slot = next_pos + 1, slot + 1
            out = torch.stack(toks, dim=1)
            return (out, torch.stack(lps, dim=1)) if return_logprobs else out

    # -- LoRA ------------------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoRALinear]]:
        for name, mod in self.named_modules():
            if isinstance(mod, LoRALinear):
                yield name, mod

    def add_adapter(self, name: str, r: int = 64, alpha: float = 16.0, dropout: float = 0.0,
                    targets: tuple[str, ...] | list[str] = LORA_TARGETS, rslora: bool = False,
                    rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None) -> None:
        """rslora: each module's scale is alpha / sqrt(rank), else alpha / rank. rank_pattern / alpha_pattern:
        our module path (llm.layers.0.self_attn.q_proj) -> its own rank / alpha (peft's patterns, resolved)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} exists already")
        bad = set(targets) - set(LORA_TARGETS)
        if bad:
            raise ValueError(f"unknown LoRA targets {sorted(bad)}; choose from {LORA_TARGETS}")
        ranks, alphas = dict(rank_pattern or {}), dict(alpha_pattern or {})
        mods = [(p, mod) for p, mod in self.lora_layers() if p.startswith("llm.") and p.rsplit(".", 1)[-1] in targets]
        unknown = sorted((set(ranks) | set(alphas)) - {p for p, _ in mods})
        if unknown:
            raise ValueError(f"rank_pattern / alpha_pattern name {unknown[:3]}, not a targeted module of this model")
        for path, mod in mods:
            mod.add_adapter(name, ranks.get(path, r), alphas.get(path, alpha), dropout, rslora)
        self.adapters[name] = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets),
                               "rslora": rslora, "rank_pattern": ranks, "alpha_pattern": alphas}

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

    def save_adapter(self, out_dir: str, name: str, layout: str | None = None) -> None:
        """Save adapter `name` in peft's layout for the base peft will load it onto: layout "llava"
        (transformers' LlavaForConditionalGeneration: `base_model.model.model.language_model.layers.N...`)
        or "llava_orig" (the original LLaVA / LlamaForCausalLM: `base_model.model.model.layers.N...`, as the
        released LLaVA-RLHF adapters are). Default: the layout this model was loaded from
        (self.source_layout; "llava_orig" for a model not loaded from a folder)."""
        layout = layout or self.source_layout
        if layout == "llava" and self.config.text_only:
            raise ValueError("a text-only LLaMA has no Llava layout: save its adapter with layout='llava_orig'")
        weights.save_adapter(out_dir, self.adapter_state_dict(name), self.adapters[name], layout)

    def load_adapter(self, path: str, name: str = "default", trainable: bool = False) -> None:
        """Load a peft-layout adapter folder saved on either base (the language model's
        `layers.N.<block>.<proj>` under a Llava or LlamaForCausalLM name). Settings LoRALinear cannot
        compute (DoRA, biases, modules_to_save, vision-tower tensors, ...) are refused by name. Every
        tensor is checked against this model first: a folder that does not fit raises ModelError naming
        its file and tensor, and the model is left as it was."""
        meta, sd, where = weights.read_adapter(path)   # refuses the settings LoRALinear cannot compute
        self._check_adapter(path, meta, sd, where)
        self.add_adapter(name, **meta)
        for p, mod in self.lora_layers():
            if name in mod.lora_A:
                for which, param in (("A", mod.lora_A[name]), ("B", mod.lora_B[name])):
                    with torch.no_grad():
                        param.copy_(sd[f"{p}.lora_{which}"].to(param.dtype))
                    param.requires_grad_(trainable)

    def _check_adapter(self, path: str, meta: dict, sd: dict[str, torch.Tensor], where: dict[str, str]) -> None:
        """ModelError unless the adapter read from `path` (weights.read_adapter) has a tensor of the right
        shape for each targeted layer projection of this model, and no other."""
        n = self.config.layers
        layer_of = {k: int(k.split(".")[2]) for k in sd}             # llm.layers.N.<block>.<proj>.lora_X
        deep = sorted((layer_of[k], k) for k in sd if layer_of[k] >= n)
        if deep:
            layer, k = deep[0]
            raise weights.ModelError(f"{where[k]} is for layer {layer}, but the base model has {n} layers "
                                     f"(0-{n - 1}): an adapter of a deeper model")
        mods = {p: mod for p, mod in self.lora_layers() if p.rsplit(".", 1)[-1] in meta["targets"]}
        extra = sorted(k for k in sd if k.rsplit(".", 1)[0] not in mods)   # e.g. self_attn.gate_proj
        if extra:
            k = extra[0]
            raise weights.ModelError(f"{where[k]} ({k.rsplit('.', 1)[0]}) has no place in the model: it adapts "
                                     f"{', '.join(LORA_TARGETS)} of self_attn / mlp")
        missing = [p for p in mods if f"{p}.lora_A" not in sd or f"{p}.lora_B" not in sd]
        if missing:
            top = max(layer_of.values())
            short = f"; the adapter's layers stop at {top}, the base model has {n}" if top < n - 1 else ""
            raise weights.ModelError(f"{path}: adapter has no tensors for {missing[:4]}"
                                     f"{'...' if len(missing) > 4 else ''} (each needs lora_A and lora_B){short}")
        for p, mod in mods.items():
            r = meta["rank_pattern"].get(p, meta["r"])
            for which, want in (("A", (r, mod.in_features)), ("B", (mod.out_features, r))):
                k = f"{p}.lora_{which}"
                if tuple(sd[k].shape) != want:
                    raise weights.ModelError(f"{where[k]}: adapter tensor {k} has shape {tuple(sd[k].shape)}, "
                                             f"model expects {want} (rank {r})")

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
        m.source_layout = layout
        missing = [k for k, v in list(m.named_parameters()) + list(m.named_buffers()) if v.is_meta]
        if missing:
            raise weights.ModelError(f"{path}: checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
        return m

    def save_pretrained(self, out_dir: str, max_shard_bytes: int = 5 * 2**30) -> None:
        """Save base weights in transformers' Llava layout (config.json + safetensors shards).
        LoRA adapters are not part of it: merge_adapter first, or save_adapter."""
        weights.save_llava(self.config, self.state_dict(), out_dir, max_shard_bytes)




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
        raise common.ConfigError(f"--dtype must be auto, fp32, bf16 or fp16, got {name!r}")
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
        if preset not in PRESETS:
            raise common.ConfigError(f"--model_preset: unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
        overrides = {"vocab_size": vocab_size} if vocab_size else {}
        torch.manual_seed(seed)
        return LLaVA(ModelConfig.preset(preset, **overrides)).to(device=dev, dtype=dt)
    raise common.ConfigError("give --model_path (a local checkpoint folder) or --model_preset")


def count_params(m: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)
