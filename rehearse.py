"""Rehearse a stage at full size before paying for GPUs: the stage's own code for one optimizer step
(PPO: one rollout micro-batch at the worst-case length, its scoring, one update) at the preset's true
shapes, on N ranks, with no weights allocated. The model is built under FakeTensorMode (tensors with
shapes and dtypes, no data), collectives go to a fake process group of N ranks, and every storage the
step creates is counted, so the peak per GPU is known, split into weights, gradients, optimizer state,
activations (everything else: activations, temporaries, FSDP's gathered layers) and KV cache.

    python rehearse.py                                      # every stage of both presets: the README table
    python rehearse.py --stage ppo --preset llava-rlhf-7b   # one stage; any of the stage's flags follow
    python rehearse.py --stage ppo --preset llava-rlhf-7b --rm_base_path /ckpt/sft13b   # config.json only
    python rehearse.py --stage sft --preset llava-rlhf-13b --ranks 16 --micro_batch 4

`--model_path` (and `--rm_base_path`) need only a config.json there; without one the model preset of
the stage preset's name is used (llava-rlhf-7b: CLIP ViT-L/14 224 + Vicuna-7B, llava-rlhf-13b: ViT-L/14
336 + Vicuna-13B). The rehearsal prints one table; it takes seconds per stage (PPO's rollout longer:
each of its decode steps runs the model at full size on fake tensors).
All ranks hold the same amount (the data is split evenly; FSDP shards evenly), so one rank is shown.
"""
from __future__ import annotations

import contextlib
import sys
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import common
import model as M

GiB = 2 ** 30
# What a job may use of a GPU: total memory less the CUDA context and cuBLAS/NCCL workspaces (~1.5 GiB),
# less 5% for the caching allocator's fragmentation.
GPUS = {"80 GB": 79.6, "40 GB": 39.6}   # GiB that nvidia-smi reports for the A100/H100 80 GB and A100 40 GB


def usable_gib(total_gib: float) -> float:
    return (total_gib - 1.5) * 0.95


# ----------------------------------------------------------------------------------------------------
# Counting storages

@dataclass
class Phase:
    peak: int = 0                                  # bytes live at this phase's peak
    at_peak: list = field(default_factory=list)   # [(storage serial, nbytes, kind hint)] live then
    snap_total: int = 0                            # bytes live when at_peak was taken


class MemoryCounter(TorchDispatchMode):
    """Counts the bytes of every live tensor storage that an op creates while the mode is on (start it
    before the model is built), until the storage is freed (a weakref finalizer) or resized (FSDP
    frees and refills gathered parameters with storage.resize_). Keeps the peak of each named phase and
    what was live then; `breakdown` sorts that into weights / gradients / optimizer / activations / kv."""

    def __init__(self) -> None:
        super().__init__()
        # id(storage) -> [nbytes, kind hint, serial]; snapshots name storages by serial, since an id is
        # reused once its storage is freed
        self.live: dict[int, list] = {}
        self._serial = 0
        self.total = 0
        self.phase = "setup"
        self.phases: dict[str, Phase] = {}
        self._resize = None

    # storages ---------------------------------------------------------------------------------------
    def track(self, t: torch.Tensor) -> None:
        if hasattr(t, "_local_tensor"):            # a DTensor (FSDP's shard): count the local part
            t = t._local_tensor
        st = t.untyped_storage()
        if id(st) in self.live:
            return
        # a 5-D tensor is the KV cache (layers, B, kv_heads, S, head_dim): nothing else in the model is 5-D
        self._add(st, "kv" if t.dim() == 5 else "")
        self._resized(st, st.nbytes())

    def _add(self, st, hint: str) -> list:
        self._serial += 1
        entry = self.live[id(st)] = [0, hint, self._serial]
        weakref.finalize(st, self._freed, id(st))
        return entry

    def _freed(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.total -= entry[0]

    def _resized(self, st, nbytes: int) -> None:
        entry = self.live.get(id(st)) or self._add(st, "")
        self.total += nbytes - entry[0]
        entry[0] = nbytes
        self._note()

    def _note(self) -> None:
        ph = self.phases.setdefault(self.phase, Phase())
        if self.total > ph.peak:
            # a snapshot of what is live at most every 8 MiB of growth (a forward makes thousands of peaks)
            if self.total > ph.snap_total + 2 ** 23:
                ph.at_peak, ph.snap_total = self._snapshot(), self.total
            ph.peak = self.total

    def _snapshot(self) -> list:
        return [(serial, n, hint) for n, hint, serial in self.live.values()]

    def set_phase(self, name: str) -> None:
        self.phase = name
        self.phases[name] = Phase(self.total, self._snapshot(), self.total)

    # the mode ----------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def __enter__(self):
        counter, orig = self, torch.UntypedStorage.resize_

        def resize_(st, size):
            r = orig(st, size)
            counter._resized(st, int(size))
            return r
        self._resize = orig
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    # reading it -------------------------------------------------------------------------------------
    def keys(self, tensors) -> set[int]:
        """The serials of these (live) tensors' storages."""
        out = set()
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t = getattr(t, "_local_tensor", t)
                entry = self.live.get(id(t.untyped_storage()))
                if entry is not None:
                    out.add(entry[2])
        return out

    def breakdown(self, phase: str, weights: set[int], grads: set[int], optim: set[int]) -> dict[str, float]:
        """GiB by kind at the phase's peak."""
        ph = self.phases[phase]
        out = dict.fromkeys(("weights", "gradients", "optimizer", "activations", "kv_cache"), 0.0)
        for key, n, hint in ph.at_peak:
            kind = ("weights" if key in weights else "gradients" if key in grads else
                    "optimizer" if key in optim else "kv_cache" if hint == "kv" else "activations")
            out[kind] += n / GiB
        # the snapshot trails the exact peak by < 8 MiB: the difference is growth of the last moment
        out["activations"] += (ph.peak - ph.snap_total) / GiB
        out["peak"] = ph.peak / GiB
        return out


# ----------------------------------------------------------------------------------------------------
# A fake world: N ranks, fake tensors

@dataclass
class World:
    ranks: int
    counter: MemoryCounter
    mesh: object
    device: torch.device = torch.device("cpu")

    @property
    def dist(self) -> common.Dist:
        return common.Dist(rank=0, world=self.ranks, local_rank=0, device=self.device)


@contextlib.contextmanager
def fake_world(ranks: int, fake: bool = True, device: str = "cpu"):
    """Rank 0 of `ranks` in a fake process group (collectives return at once, shapes right), every tensor
    fake, every storage counted. FSDP's device mesh is made before the fake mode (it reads real values).
    fake=False: real tensors in the same world (the checks that hold the estimate against real memory:
    the CPU allocator in the tests, torch.cuda.max_memory_allocated in gpu_check.sh); device: where
    tensors are made (fake CUDA tensors need a CUDA build)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.distributed.device_mesh import init_device_mesh
    if dist.is_initialized():
        raise RuntimeError("the rehearsal makes its own (fake) process group; one exists already")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    try:
        mesh = init_device_mesh(torch.device(device).type, (ranks,))
        mode = FakeTensorMode() if fake else contextlib.nullcontext()
        counter = MemoryCounter()
        with mode, counter, torch.device(device):
            yield World(ranks, counter, mesh, torch.device(device))
    finally:
        dist.destroy_process_group()


def build_model(cfg: M.ModelConfig, dtype: torch.dtype) -> M.LLaVA:
    """The model at `dtype`, made under the active fake mode (init draws nothing real)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return M.LLaVA(cfg)
    finally:
        torch.set_default_dtype(prev)


def model_config(model_path: str, stage_preset: str) -> M.ModelConfig:
    """`preset:NAME` (a model preset), config.json of a local folder, else the model preset named like the
    stage preset."""
    if model_path.startswith("preset:"):
        if (name := model_path[len("preset:"):]) not in M.PRESETS:
            raise common.ConfigError(f"--model_path {model_path}: no model preset {name!r}; choose from {sorted(M.PRESETS)}")
        return M.ModelConfig.preset(name)
    if model_path:
        return M.config_from_folder(model_path)[0]
    name = next((p for p in sorted(M.PRESETS, key=len, reverse=True) if stage_preset.startswith(p)), None)
    if name is None:
        raise common.ConfigError(f"give --model_path (a folder with config.json) or a --preset named after a "
                                 f"model preset ({sorted(M.PRESETS)}); got {stage_preset!r}")
    return M.ModelConfig.preset(name)


def stage_result(w: World, phases: list[str], weights, grads, optim) -> dict:
    """Per phase and overall: GiB by kind at each phase's peak."""
    wk, gk, ok = w.counter.keys(weights), w.counter.keys(grads), w.counter.keys(optim)
    rows = {ph: w.counter.breakdown(ph, wk, gk, ok) for ph in phases if ph in w.counter.phases}
    worst = max(rows, key=lambda ph: rows[ph]["peak"])
    return {"phases": rows, "worst_phase": worst, "peak": rows[worst]["peak"]}


def _images(n: int, cfg: M.ModelConfig) -> torch.Tensor | None:
    return torch.zeros(n, 3, cfg.image_size, cfg.image_size) if n and not cfg.text_only else None


def _ids(rows: int, text_len: int, cfg: M.ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, T) ids and mask of text_len text ids with the image as one (T = text_len - 1 + the image
    tokens): BOS, the image, then text. Under the fake mode only the shapes matter."""
    n_img = cfg.num_image_tokens
    ids = torch.zeros(rows, text_len - 1 + n_img, dtype=torch.long)
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = M.IMAGE_TOKEN_INDEX
    return ids, torch.ones_like(ids)


def _optimizer_step(w: World, phase: str, params: list, opt, grad_clip: float, allreduce: bool) -> tuple[list, list]:
    """The stages' step: gradients summed over ranks (RM and PPO; DDP and FSDP do it in backward),
    clipped, AdamW. -> (the gradients, the optimizer's state tensors), for stage_result."""
    grads = [p.grad for p in params]        # allreduce_grads writes back into them
    w.counter.set_phase(phase)
    if allreduce:
        common.allreduce_grads(params)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return grads, [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]


# ----------------------------------------------------------------------------------------------------
# The stages, each through its own code

def rehearse_sft(cfg, mcfg: M.ModelConfig, ranks: int, dtype: torch.dtype = torch.bfloat16, fake: bool = True,
                 device: str = "cpu") -> dict:
    """sft.py: one optimizer step at micro_batch sequences of max_len text ids (+ the image tokens), as
    sft.main trains (set_trainable, fp32 masters, wrap_model: FSDP/DDP, SFTLoss, clip, AdamW)."""
    import sft
    with fake_world(ranks, fake, device) as w:
        m = build_model(mcfg, dtype)
        sft.set_trainable(m, cfg)
        m.gradient_checkpointing = cfg.grad_ckpt
        m.train()
        common.fp32_trainable([p for p in m.parameters() if p.requires_grad])
        buckets = []
        if cfg.fsdp:
            train_m, _ = sft.wrap_model(m, cfg, w.dist, dtype, mesh=w.mesh)
        else:
            # DDP cannot be built on fake tensors (it reads the parameters' data); its gradient buckets are
            # one more copy of the trainable gradients, made here instead and counted as gradients
            train_m = sft.SFTLoss(m)
            buckets = [torch.empty_like(p) for p in m.parameters() if p.requires_grad]
        params = [p for p in train_m.parameters() if p.requires_grad]    # after fully_shard: its DTensors
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                foreach=True)
        ids, mask = _ids(cfg.micro_batch, cfg.max_len, mcfg)
        images = _images(cfg.micro_batch, mcfg)
        w.counter.set_phase("forward+backward")
        with common.autocast(w.device, dtype):
            s = train_m(ids, images, mask, torch.zeros_like(ids))   # every position supervised: the worst case
        s.backward()
        grads, optim = _optimizer_step(w, "optimizer step", params, opt, cfg.grad_clip, allreduce=False)
        res = stage_result(w, ["forward+backward", "optimizer step"], list(m.parameters()) + list(m.buffers()),
                           grads + buckets, optim)
        opt.zero_grad(set_to_none=True)
    return res


def rehearse_rm(cfg, mcfg: M.ModelConfig, ranks: int, dtype: torch.dtype = torch.bfloat16, fake: bool = True,
                 device: str = "cpu") -> dict:
    """reward_model.py: one optimizer step at micro_batch pairs (2 x micro_batch rows) of max_len text ids."""
    import reward_model as RM
    with fake_world(ranks, fake, device) as w:
        m = build_model(mcfg, dtype)
        m.requires_grad_(False)
        m.add_adapter("reward", r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      targets=tuple(cfg.lora_targets.split(",")))
        for p in m.adapter_parameters("reward"):
            p.requires_grad_(True)
        head = M.ScalarHead(m.config.hidden)   # fp32 here: a fake tensor cannot be moved like reward_model.py's
        m.gradient_checkpointing = cfg.grad_ckpt
        rm = RM.RewardModel(m, "reward", head).train()
        params = common.fp32_trainable(m.adapter_parameters("reward") + list(head.parameters()))
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        ids, mask = _ids(2 * cfg.micro_batch, cfg.max_len, mcfg)
        batch = {"ids": ids, "mask": mask, "images": _images(2 * cfg.micro_batch, mcfg),
                 "preference": torch.ones(cfg.micro_batch, dtype=torch.long)}
        w.counter.set_phase("forward+backward")
        loss, _ = RM.pair_loss(rm, batch, w.device, cfg.center_coef)
        loss.backward()
        grads, optim = _optimizer_step(w, "optimizer step", params, opt, cfg.grad_clip, allreduce=True)
        return stage_result(w, ["forward+backward", "optimizer step"],
                            list(m.parameters()) + list(m.buffers()) + list(head.parameters()), grads, optim)


def rehearse_ppo(cfg, mcfg: M.ModelConfig, ranks: int, rm_mcfg: M.ModelConfig | None = None,
                 rm_max_len: int = 2048, dtype: torch.dtype = torch.bfloat16, fake: bool = True,
                 decode_steps: int | None = None, device: str = "cpu") -> dict:
    """ppo.py: one rollout micro-batch at the worst case (prompts of max_prompt_len text ids, responses of
    max_new_tokens with no EOS), its scoring passes and the reward model on rm_max_len ids, then one
    optimizer step over step_batch / ranks rollouts in micro-batches: ppo.collate, generate,
    ppo.score_passes, RM.RewardModel, ppo._micro_update, clip, AdamW. The policy, reference, value and
    reward adapters sit on one base, or value and reward on a second (rm_mcfg: --rm_base_path).
    decode_steps < max_new_tokens samples fewer tokens into the full-length KV cache (a quicker, slightly
    low estimate: the tests)."""
    import ppo
    import reward_model as RM
    B, R = cfg.micro_batch, cfg.max_new_tokens
    with fake_world(ranks, fake, device) as w:
        pb = build_model(mcfg, dtype)
        pb.requires_grad_(False)
        lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets.split(",")))
        pb.add_adapter("policy", **lora)       # the RL-init adapter, trained
        pb.add_adapter("ref", **lora)          # ... and its frozen copy
        vb = pb
        if rm_mcfg is not None:
            vb = build_model(rm_mcfg, dtype)
            vb.requires_grad_(False)
        vb.add_adapter("reward", **lora)
        vb.add_adapter("value", **lora)        # the critic starts from the RM adapter
        for p in pb.adapter_parameters("policy") + vb.adapter_parameters("value"):
            p.requires_grad_(True)
        scorer = RM.RewardModel(vb, "reward", M.ScalarHead(vb.config.hidden))
        models = ppo.Models(pb, "ref", vb, M.ScalarHead(vb.config.hidden, zero_init=True), None)
        for base in (pb, vb):
            base.gradient_checkpointing = cfg.grad_ckpt
        params = common.fp32_trainable(models.trainable())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

        # -- rollout: one micro-batch, everything at its longest
        for base in (pb, vb):
            base.eval()
        prompt = [1, M.IMAGE_TOKEN_INDEX] + [0] * (cfg.max_prompt_len - 2)        # the image counted as one id
        images = {c.image_size: torch.zeros(3, c.image_size, c.image_size) for c in (mcfg, vb.config)}
        rows = [ppo.Row({"id": str(i)}, prompt, images) for i in range(B)]
        w.counter.set_phase("rollout: generate")
        ppo.image_features(rows, [pb, vb])     # vision once per base, as ppo.rollout: every pass reads the features
        b = ppo.collate(rows, pb)
        pb.set_adapter("policy")
        pb.generate(b["ids"], b["images"], b["mask"], max_new_tokens=R, temperature=cfg.temperature, top_p=cfg.top_p,
                    decode_fn=_stop_after(pb, decode_steps) if decode_steps else None)
        w.counter.set_phase("rollout: score")
        for r in rows:
            r.response = torch.full((R,), 5, dtype=torch.long)                    # no EOS anywhere
        ppo.score_passes(models, rows, cfg)
        rm_rows = min(B, 8)                   # RewardScorer's batch
        rm_ids, rm_mask = _ids(rm_rows, rm_max_len, vb.config)
        with torch.no_grad():
            scorer(rm_ids, ppo.collate(rows[:rm_rows], vb)["images"], rm_mask)

        # -- update: step_batch / ranks rollouts, micro_batch at a time, then the optimizer step
        for base in (pb, vb):
            base.train()
        for r in rows:
            r.adv, r.ret = torch.zeros(R), torch.zeros(R)
        w.counter.set_phase("update: forward+backward")
        for _ in range(max(1, min(2, cfg.step_batch // ranks // B))):   # the 2nd adds to existing grads
            ppo._micro_update(models, rows, cfg, float(B * R))
        grads, optim = _optimizer_step(w, "update: optimizer step", params, opt, cfg.grad_clip, allreduce=True)
        weights = list(pb.parameters()) + list(pb.buffers()) + list(models.value_head.parameters()) + \
            list(scorer.head.parameters()) + ([] if vb is pb else list(vb.parameters()) + list(vb.buffers()))
        return stage_result(w, ["rollout: generate", "rollout: score", "update: forward+backward",
                                "update: optimizer step"], weights, grads, optim)


def _stop_after(m: M.LLaVA, n: int):
    """A decode_fn for generate: the model's own decode step for the first n tokens, then the last logits
    again without running it (the KV cache stays allocated at its full length)."""
    state = {"i": 0, "logits": None}

    def step(tok, pos, cache, start, key_valid):
        if state["i"] < n:
            state["i"] += 1
            state["logits"] = m.decode_one(tok, pos, cache, start, key_valid)
        return state["logits"]
    return step


# ----------------------------------------------------------------------------------------------------
# Command line

STAGES = ("sft", "rm", "ppo")     # the scripts; sft.py's --mode (pretrain | sft | lora) picks its stage
# (script, its preset, flags) of the README table: every stage of both presets, and the paper's 7B
# policy beside a 13B reward model and critic
TABLE = [("sft", "llava-rlhf-7b-pretrain", []), ("sft", "llava-rlhf-13b-pretrain", []),
         ("sft", "llava-rlhf-7b", []), ("sft", "llava-rlhf-13b", []),
         ("sft", "llava-rlhf-7b-rlinit", []), ("sft", "llava-rlhf-13b-rlinit", []),
         ("rm", "llava-rlhf-7b", []), ("rm", "llava-rlhf-13b", []),
         ("ppo", "llava-rlhf-7b", []), ("ppo", "llava-rlhf-13b", []),
         ("ppo", "llava-rlhf-7b", ["--rm_base_path", "preset:llava-rlhf-13b"])]


def run_stage(stage: str, argv: list[str], ranks: int, decode_steps: int | None = 8) -> dict:
    """Parse `argv` with the stage's own Config and presets, then rehearse it. -> the result dict, with
    "stage", "preset", "ranks" and "what" (a short description) added."""
    import ppo
    import reward_model as RM
    import sft
    if stage == "sft":
        cfg = common.parse_config(sft.Config, argv, sft.PRESETS)
        stage = "rl-init" if cfg.mode == "lora" else cfg.mode
        mcfg = model_config(cfg.model_path, cfg.preset)
        res = rehearse_sft(cfg, mcfg, ranks)
        what = f"micro {cfg.micro_batch} x {cfg.max_len} text ids" + (", FSDP" if cfg.fsdp else ", DDP") + \
            (", ckpt" if cfg.grad_ckpt else "")
    elif stage == "rm":
        cfg = common.parse_config(RM.Config, argv, RM.PRESETS)
        mcfg = model_config(cfg.model_path, cfg.preset)
        res = rehearse_rm(cfg, mcfg, ranks)
        what = f"micro {cfg.micro_batch} pairs x {cfg.max_len} ids" + (", ckpt" if cfg.grad_ckpt else "")
    else:
        cfg = common.parse_config(ppo.Config, argv, ppo.PRESETS)
        mcfg = model_config(cfg.model_path, cfg.preset)
        rm_mcfg = model_config(cfg.rm_base_path, "") if cfg.rm_base_path else None
        rm_max_len = RM.Config.max_len
        if cfg.rm_dir:
            rm_max_len = RM.read_rm_config(cfg.rm_dir)["max_len"]
        res = rehearse_ppo(cfg, mcfg, ranks, rm_mcfg, rm_max_len, decode_steps=decode_steps)
        what = (f"micro {cfg.micro_batch}, prompt {cfg.max_prompt_len} + {cfg.max_new_tokens} new"
                + (f", RM+critic on {rm_mcfg.hidden}x{rm_mcfg.layers} {rm_mcfg.image_size}px" if rm_mcfg else "")
                + (", ckpt" if cfg.grad_ckpt else ""))
    return {**res, "stage": stage, "preset": cfg.preset or "-", "ranks": ranks, "what": what}


def format_row(r: dict) -> str:
    ph = r["phases"][r["worst_phase"]]
    fits = "  ".join(("yes" if r["peak"] <= usable_gib(g) else "NO ") for g in GPUS.values())
    gen = r["phases"].get("rollout: generate")
    gen = f"; generate {gen['peak']:.1f} with KV {gen['kv_cache']:.1f}" if gen else ""
    return (f"{r['stage']:<9}{r['preset']:<24}{r['ranks']:>4}  {ph['weights']:>7.1f}{ph['gradients']:>7.1f}"
            f"{ph['optimizer']:>7.1f}{ph['activations']:>7.1f}{ph['kv_cache']:>6.1f}{r['peak']:>7.1f}   {fits}   "
            f"{r['worst_phase']}; {r['what']}{gen} [{r['seconds']:.0f} s]")


HEADER = (f"{'stage':<9}{'preset':<24}{'GPUs':>4}  {'weights':>7}{'grads':>7}{'optim':>7}{'activ':>7}{'kv':>6}"
          f"{'peak':>7}   80GB 40GB  at (GiB per GPU)")


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        print("rehearse.py flags: --stage sft|rm|ppo|all (all), --ranks N (8), "
              "--decode_steps K (8; 0: every one of max_new_tokens); any other flag goes to the stage's Config "
              "(see `python STAGE.py --help`); --rm_base_path preset:NAME takes a model preset.")
        return []
    own = {"stage": "all", "ranks": "8", "decode_steps": "8"}     # rehearse.py's flags; the rest: the stage's
    rest, args = [], iter(argv)
    for a in args:
        key, eq, val = a[2:].partition("=")
        key = key.replace("-", "_")
        if a.startswith("--") and key in own:
            own[key] = val if eq else next(args, "")
        else:
            rest.append(a)
    try:
        ranks, steps = int(own["ranks"]), int(own["decode_steps"])
    except ValueError:
        raise common.ConfigError(f"--ranks and --decode_steps take integers, got {own['ranks']!r}, "
                                 f"{own['decode_steps']!r}") from None
    if ranks < 1:
        raise common.ConfigError(f"--ranks must be >= 1, got {ranks}")
    if own["stage"] != "all" and own["stage"] not in STAGES:
        raise common.ConfigError(f"--stage must be one of {', '.join(STAGES)} (or all), got {own['stage']!r}")
    if own["stage"] == "all" and not rest:
        jobs = TABLE
    else:
        jobs = [(s, None, []) for s in (STAGES if own["stage"] == "all" else (own["stage"],))]
    print(f"rehearsal: rank 0 of {ranks}, bf16 base, fake tensors (no weights allocated); "
          f"fits = peak <= (GPU GiB - 1.5) x 0.95")
    print(HEADER)
    out = []
    for stage, preset, flags in jobs:
        t0 = time.time()
        r = run_stage(stage, (["--preset", preset] if preset else []) + flags + rest, ranks, steps or None)
        r["seconds"] = time.time() - t0
        print(format_row(r), flush=True)
        out.append(r)
    return out


if __name__ == "__main__":
    common.run_cli(main)
