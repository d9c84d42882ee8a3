"""Speed machinery for model.py, all of it off by default. model.py reads as plain PyTorch without
this file; each piece here is a faster way to run something model.py defines plainly (bench.py
measures them against transformers):

    with packed_cpu_linear():          # no-grad fp32 CPU linears through oneDNN, weights prepacked once
    with cpu_linear(m, batch):         # ... per shape class where measured faster here (cpu_linear_plan)
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
import json
import os
import platform
import shutil
import time
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
# oneDNN packed CPU linear, and which of the two linears a machine runs faster

# On CPU, F.linear runs MKL's sgemm. Where MKL takes a generic path (it does on AMD CPUs: an EPYC here
# reached half its matmul FLOP/s through it), oneDNN's GEMM with the weight prepacked in its blocked
# layout runs a prefill-sized linear 2x faster and a decode step's few rows 3x faster; on an Intel Xeon
# here the two tied. Which is faster is a property of the machine (CPU, cores, threads, torch build)
# and of the GEMM's shape, not of the vendor's name, so it is measured: cpu_linear_plan times both on
# the model's own linear shapes, once per shape class (decode: a few rows, bandwidth-bound; prefill: many
# rows, compute-bound), and caches the choice on disk. Packing is a pass over the weight and keeps a
# second copy of it, so it is opt-in and done once per weight version (an optimizer step, merge or load
# bumps it); it only serves no-grad forward passes, since training needs F.linear's autograd.
SHAPE_CLASSES = ("decode", "prefill")
DECODE_ROWS = 64                  # a linear over at most this many rows (batch x tokens) is a decode-class GEMM
PREFILL_ROWS = 512                # the rows a prefill-class GEMM is timed at (past a few hundred, GEMMs run at peak)
PACK_MARGIN = 0.05                # packed only when measured >= 5% faster: its copy of the weights costs memory
_PACKED_CPU = {"decode": False, "prefill": False}   # shape class -> through the packed path
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


def shape_class(rows: int) -> str:
    """"decode" for a linear over at most DECODE_ROWS rows, else "prefill"."""
    return "decode" if rows <= DECODE_ROWS else "prefill"


def use_packed_cpu_linear(enable: bool | dict = True) -> dict:
    """Route no-grad fp32 CPU linears through oneDNN with prepacked weights; process-wide. enable: True
    (every linear), False (none) or {shape class: bool} (a plan's choice, cpu_linear_plan). Returns the
    previous setting (a dict, accepted back). Each packed copy lives as long as its weight (memory: the
    linear weights once more) or until drop_packed_weights()."""
    prev = dict(_PACKED_CPU)
    ok = packed_cpu_linear_available()
    for k in SHAPE_CLASSES:
        _PACKED_CPU[k] = ok and bool(enable.get(k, False) if isinstance(enable, dict) else enable)
    return prev


@contextlib.contextmanager
def packed_cpu_linear(enable: bool | dict = True) -> Iterator[None]:
    """`with packed_cpu_linear(enable):` use_packed_cpu_linear(enable) inside the block, then the setting
    before; False leaves the setting as it is (a dict of all False turns the packed path off inside)."""
    prev = use_packed_cpu_linear(enable) if enable is not False else None
    try:
        yield
    finally:
        if prev is not None:
            use_packed_cpu_linear(prev)


def cpu_linear(module: torch.nn.Module, batch: int, enable: bool = True) -> contextlib.AbstractContextManager:
    """`with cpu_linear(m, B):` each shape class of m's no-grad fp32 CPU linears through the path measured
    faster on this machine for m's linear shapes at B decode rows (cpu_linear_plan; measured once, then read
    from its cache). What generate(compile=True) and ppo.py's no-grad passes use. enable=False: nothing."""
    if not enable or not packed_cpu_linear_available():
        return contextlib.nullcontext()
    plan = cpu_linear_plan(linear_shapes(module), decode_rows=batch)
    return packed_cpu_linear({k: plan[k] == "packed" for k in SHAPE_CLASSES})


# -- the one-time measurement -------------------------------------------------------------------------

def linear_shapes(module: torch.nn.Module) -> dict[tuple[int, int], int]:
    """(out_features, in_features) -> how many fp32 nn.Linear layers of module have that weight shape."""
    counts: dict[tuple[int, int], int] = {}
    for mod in module.modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.dtype == torch.float32:
            key = tuple(mod.weight.shape)
            counts[key] = counts.get(key, 0) + 1
    return counts


def time_linear(path: str, rows: int, out_features: int, in_features: int, min_seconds: float = 0.02) -> float:
    """Seconds per call of one (rows, in) x (out, in)^T fp32 linear, no grad, on this CPU: "mkl" (F.linear)
    or "packed" (oneDNN, weight prepacked once). One warm-up call, then the fastest of 3 rounds of calls
    filling >= min_seconds each, on one weight (hot in cache where it fits: both paths alike). Inputs from
    a private generator: the global RNG is not drawn from."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    if path == "packed":
        wp = torch.ops.mkldnn._reorder_linear_weight(w)
        fn = lambda: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")   # noqa: E731
    elif path == "mkl":
        fn = lambda: F.linear(x, w)   # noqa: E731
    else:
        raise ValueError(f"unknown linear path {path!r}: mkl or packed")
    with torch.no_grad():
        t0 = time.perf_counter()
        fn()
        reps = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) / reps)
    return best


def choose_linear_path(times: dict[str, dict[tuple[int, int], float]], counts: dict[tuple[int, int], int],
                       margin: float = PACK_MARGIN) -> str:
    """The path for one shape class: times[path][shape] seconds per call, counts[shape] layers of that
    shape; each path's total is sum(count x time). -> "packed" when its total is below (1 - margin) x
    MKL's, else "mkl"."""
    total = {p: sum(n * times[p][s] for s, n in counts.items()) for p in ("mkl", "packed")}
    return "packed" if total["packed"] < (1.0 - margin) * total["mkl"] else "mkl"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def linear_cache_path() -> str:
    """Where measured choices are kept: $LLAVA_RLHF_LINEAR_CACHE, else ~/.cache/llava_rlhf/cpu_linear.json."""
    return os.environ.get("LLAVA_RLHF_LINEAR_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llava_rlhf", "cpu_linear.json")


def _plan_key(cls: str, rows: int, shapes: dict[tuple[int, int], int]) -> str:
    """A cached choice holds for this CPU, torch build, thread count, shape class, rows and weight shapes."""
    sh = ",".join(f"{o}x{i}*{n}" for (o, i), n in sorted(shapes.items()))
    return f"{cpu_model()} | torch {torch.__version__} | threads {torch.get_num_threads()} | {cls} rows {rows} | {sh}"


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):    # none yet, or unreadable: measured again and rewritten
        return {}


def _write_cache(path: str, key: str, entry: dict) -> None:
    """Add one entry, atomically (temporary file, rename): a reader never sees half a file. Best effort:
    an unwritable cache only means measuring again next time."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        doc = _read_cache(path)
        doc[key] = entry
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


_PLANS: dict[str, dict] = {}       # key -> entry, this process's memory of the cache


def cpu_linear_plan(shapes: dict[tuple[int, int], int], decode_rows: int = 8, prefill_rows: int = PREFILL_ROWS,
                    timer: Callable[[str, int, int, int], float] | None = None,
                    cache_path: str | None = None) -> dict:
    """Which CPU linear runs the model's linears faster here, per shape class: {"decode": "mkl" | "packed",
    "prefill": ..., "source": {class: "env" | "cache" | "measured"}, "ms": {class: {path: total ms}},
    "rows": {class: rows timed}}.
    shapes: linear_shapes(model). Each class is timed at its rows (decode: the batch, rounded up to a power
    of two, at most DECODE_ROWS; prefill: prefill_rows) by timer(path, rows, out, in) -> seconds, every
    shape on both paths (timer None: time_linear), and the choice (choose_linear_path) kept in memory and in the JSON file at
    cache_path (linear_cache_path()), keyed by CPU model, torch version, threads, class, rows and shapes:
    one measurement per machine. $LLAVA_RLHF_CPU_LINEAR=mkl or packed sets both classes without
    measuring; auto (the default) measures. Without oneDNN: mkl."""
    force = os.environ.get("LLAVA_RLHF_CPU_LINEAR", "auto").strip().lower() or "auto"
    if force not in ("auto", "mkl", "packed"):
        raise ValueError(f"LLAVA_RLHF_CPU_LINEAR={force!r}: auto, mkl or packed")
    plan: dict = {"source": {}, "ms": {}, "rows": {}}
    if force != "auto" or not packed_cpu_linear_available():
        for cls in SHAPE_CLASSES:
            plan[cls], plan["source"][cls] = ("mkl" if force == "auto" else force), "env"
        return plan
    path, timer = cache_path or linear_cache_path(), timer or time_linear
    decode_rows = min(DECODE_ROWS, 1 << max(0, int(decode_rows) - 1).bit_length())
    prefill_rows = max(prefill_rows, DECODE_ROWS + 1)
    for cls, rows in (("decode", decode_rows), ("prefill", prefill_rows)):
        key = _plan_key(cls, rows, shapes)
        entry = _PLANS.get(key) or _read_cache(path).get(key)
        source = "cache"
        if not (isinstance(entry, dict) and entry.get("path") in ("mkl", "packed")):
            times = {p: {s: timer(p, rows, s[0], s[1]) for s in shapes} for p in ("mkl", "packed")}
            entry = {"path": choose_linear_path(times, shapes), "rows": rows,
                     "ms": {p: 1e3 * sum(n * times[p][s] for s, n in shapes.items()) for p in times}}
            _write_cache(path, key, entry)
            source = "measured"
        _PLANS[key] = entry
        plan[cls], plan["source"][cls], plan["ms"][cls] = entry["path"], source, entry.get("ms", {})
        plan["rows"][cls] = rows
    return plan


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
    """F.linear, or packed_linear for no-grad CPU inference when use_packed_cpu_linear is on for this
    linear's shape class (its rows: every dim of x but the last)."""
    on = _PACKED_CPU
    if ((on["decode"] or on["prefill"]) and x.device.type == "cpu" and weight.dtype == x.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and on[shape_class(x.numel() // max(1, x.shape[-1]))]):
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


DECODE_GRAPH_LIMIT = 64   # graphs of the compiled decode step before dynamo gives up on it (process-wide setting)


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
        if compile:   # one graph per (batch, cache length, span, adapter): more than dynamo's default 8 for one
            #           long generation (DECODE_SPAN buckets); past the limit dynamo would run the step eagerly
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, DECODE_GRAPH_LIMIT)
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
