"""Speed machinery for model.py, all of it off by default. model.py reads as plain PyTorch without
this file; each piece here is a faster way to run something model.py defines plainly (bench.py
measures them against transformers):

    with packed_cpu_linear():          # no-grad fp32 CPU linears through oneDNN, weights prepacked once
    with fused_kernels():              # RMSNorm, rotary, SwiGLU through torch.compile (training, prefill)
    FusedLogprobs                      # lm_head -> log p(target) with a hand-written chunked backward
                                       # (model.token_logprobs(..., fused=True))
    static_decoder(m, mode=...)        # m.decode_one through torch.compile over a persistent KV cache;
                                       # mode="reduce-overhead" adds CUDA graphs (m.generate(compile=True))

This module does not import model.py: what it needs from the model (the decode step, a new KV
cache) it takes from the model object it is given.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary


@contextlib.contextmanager
def _switched_on(use: Callable[[bool], bool], enable: bool) -> Iterator[None]:
    """use(True) for the block when enable, then the setting use() reported before; use returns it."""
    prev = use(True) if enable else None
    try:
        yield
    finally:
        if prev is not None:
            use(prev)


# ----------------------------------------------------------------------------------------------------
# oneDNN packed CPU linear

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


def packed_cpu_linear(enable: bool = True) -> contextlib.AbstractContextManager:
    """`with packed_cpu_linear():` use_packed_cpu_linear(True) inside the block (when enable)."""
    return _switched_on(use_packed_cpu_linear, enable)


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


# ----------------------------------------------------------------------------------------------------
# Elementwise kernels fused by torch.compile

# Eager PyTorch runs RMSNorm as ~6 passes over the activations, rotary as ~6 and SwiGLU as 2, each
# forward and again in backward; compiled, each is one read and one write. Dynamic shapes: any batch
# size or length reuses the same kernels. model.py marks the functions with @fusable.
_FUSABLE: dict[str, Callable] = {}    # name -> the plain function
_FUSED: dict[str, Callable] = {}      # the compiled ones in use: empty = plain eager
_COMPILED: dict[str, Callable] = {}   # made once, so that turning them off and on reuses the graphs


def fusable(fn: Callable) -> Callable:
    """Decorator: fn runs as written, or through torch.compile while use_fused_kernels is on. Inside a
    compiled graph (the compiled decode step) the plain fn is traced, and fused there anyway."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    _FUSABLE[name] = fn

    @functools.wraps(fn)
    def run(*args):
        fused = _FUSED.get(name)
        if fused is not None and not torch.compiler.is_compiling():
            return fused(*args)
        return fn(*args)
    return run


def use_fused_kernels(enable: bool = True) -> bool:
    """Route every @fusable function (model.py's rms_norm, apply_rope, swiglu: so every LLaMA layer,
    eager or checkpointed) through a torch.compile'd version of itself, or back to plain eager with
    enable=False. Process-wide; returns the previous setting."""
    prev = bool(_FUSED)
    _FUSED.clear()
    if enable:
        for name, fn in _FUSABLE.items():
            if name not in _COMPILED:
                _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
            _FUSED[name] = _COMPILED[name]
    return prev


def fused_kernels(enable: bool = True) -> contextlib.AbstractContextManager:
    """`with fused_kernels():` use_fused_kernels(True) inside the block (when enable)."""
    return _switched_on(use_fused_kernels, enable)


# ----------------------------------------------------------------------------------------------------
# lm_head fused with log-probs, in chunks, with a hand-written backward. Unlike the plain path of
# model.token_logprobs (autograd through a checkpoint), the backward here works straight from the
# saved log-normaliser: one recomputed matmul and one pass over each chunk's logits instead of
# autograd's chain of softmax / gather / logsumexp nodes, and never more than one chunk of logits alive.

class FusedLogprobs(torch.autograd.Function):
    """apply(h (N, D), weight (V, D), tgt (N,), chunk, temperature, with_entropy) -> lp (N,), ent (N,)
    fp32 under softmax(h @ weight.T / temperature); ent is empty without with_entropy."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, chunk: int, temperature: float,
                with_entropy: bool):
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
    """decode_fn for model.generate: the model's decode_one through torch.compile (fullgraph=True,
    dynamic=False) unless compile=False; pick() compiles the sampler's pick likewise.
    decode_one's shapes are the same at every step, so a generation compiles once per (batch, cache
    length, dtype, device, adapter, train/eval) and then only replays. `compiles` counts every graph
    built for this decoder; `recompiles` counts those built again for a signature already compiled,
    i.e. something that changed between steps and defeated the static shapes: it should stay 0.
    The KV cache is kept between calls (cache()) with its length rounded up to `bucket`, so that
    prompts of nearby lengths share a graph; with mode="reduce-overhead" (CUDA graphs) its address is
    marked static, so that graph replays write into it directly instead of into a copy."""

    def __init__(self, model: torch.nn.Module, compile: bool = True, mode: str | None = None, bucket: int = 64):
        self._model = weakref.ref(model)   # the decoder lives in _DECODERS keyed by the model: no cycle
        self.compiled, self.mode, self.bucket = compile, mode, bucket
        self.compiles = self.recompiles = 0
        self.signatures: set[tuple] = set()
        self._kv = None
        self._cudagraphs = compile and mode in ("reduce-overhead", "max-autotune")
        step = type(model).decode_one
        self._step = torch.compile(step, fullgraph=True, dynamic=False, mode=mode) if compile else step
        self._picks: dict[Callable, Callable] = {}

    def _count(self, before: int, signature: Callable[[], tuple]) -> None:
        n = _graphs_compiled() - before
        if n:  # only on a compile: the steady state pays two integer reads per step
            self.compiles += n
            sig = signature()
            if sig in self.signatures:
                self.recompiles += n
            self.signatures.add(sig)

    def cache(self, batch: int, min_len: int, device, dtype):
        """A zeroed KV cache of at least min_len slots: the kept one when it fits (same batch, dtype and
        device, and not over twice the bucketed length asked for), else a new one of the bucketed
        length. Reuse keeps shapes (no compile) and addresses (no CUDA-graph re-recording) stable."""
        S = -(-min_len // self.bucket) * self.bucket
        kv = self._kv
        if (kv is None or kv.k.shape[1] != batch or not S <= kv.max_len <= 2 * S
                or kv.k.device != torch.device(device) or kv.k.dtype != dtype):
            self._kv = None  # free the old one first
            kv = self._kv = self._model().new_kv_cache(batch, S, device, dtype)
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

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, cache, slot: torch.Tensor,
                 key_valid: torch.Tensor) -> torch.Tensor:
        m = self._model()
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        before = _graphs_compiled()
        out = self._step(m, tok, pos, cache, slot, key_valid)
        self._count(before, lambda: ("step", tuple(key_valid.shape), cache.k.dtype, str(tok.device),
                                     m.active_adapter, m.training))
        return out

    def pick(self, fn: Callable) -> Callable:
        """The sampler's pick fn(logits, noise, temperature, top_p) (model.pick_token) as this decoder
        runs it: compiled like the step (made once), its graphs counted."""
        if fn not in self._picks:
            comp = torch.compile(fn, fullgraph=True, dynamic=False) if self.compiled else fn

            def run(logits: torch.Tensor, noise: torch.Tensor, temperature: float, top_p: float):
                before = _graphs_compiled()
                out = comp(logits, noise, temperature, top_p)
                self._count(before, lambda: ("pick", tuple(logits.shape), logits.dtype, temperature, top_p))
                return out
            self._picks[fn] = run
        return self._picks[fn]


# model -> {(compile, mode): StaticDecoder}, the most recently asked for last
_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, StaticDecoder]]" = weakref.WeakKeyDictionary()


def static_decoder(model: torch.nn.Module, compile: bool | None = None, mode: str | None = None) -> StaticDecoder:
    """The model's StaticDecoder for (compile, mode), made on first use and kept for the model's
    lifetime so that compiled graphs and the static cache are reused across generate calls.
    generate(compile=True) uses the one asked for last (compiled, default mode if none was), so
    `static_decoder(m, mode="reduce-overhead")` once selects CUDA graphs for later rollouts."""
    decs = _DECODERS.setdefault(model, {})
    if compile is None and mode is None and decs:
        return decs[next(reversed(decs))]
    key = (True if compile is None else compile, mode)
    dec = decs.pop(key, None) or StaticDecoder(model, compile=key[0], mode=mode)
    decs[key] = dec   # re-inserted: now the most recent
    return dec
