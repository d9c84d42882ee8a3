"""The paper-scale path: NCCL's device rules, fp32 master weights over a bf16 base, SFT's DDP with
--compile, and the full-size rehearsal (rehearse.py) with its memory counter checked against the CPU
allocator."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

import common
import ppo
import reward_model as RM
import sft
import test_ppo
import test_reward_model
import test_sft


@contextlib.contextmanager
def nccl_like_group(backend: str):
    """A one-rank process group whose CUDA backend is torch's fake one. `backend` as init_process_group
    takes it; "cuda:fake" alone is what NCCL is: it refuses CPU tensors with NCCL's error."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stage_runs(w, model_dir, tmp_path, backend: str) -> None:
    """One short run of each stage in this process, inside a process group made with `backend`: every
    collective of the stages (token counts, flags, metrics, pickled generator states) goes through it."""
    with nccl_like_group(backend):
        sft.main(test_sft._args(w, tmp_path / "sft", model_path=model_dir, max_steps=2))
    prefs = test_reward_model._separable_prefs(w, tmp_path / "prefs.json", n=40)
    with nccl_like_group(backend):
        RM.main(test_reward_model._args(w, tmp_path / "rm", prefs, model_path=model_dir, max_steps=2, eval_size=8,
                                        eval_every=1))
    with nccl_like_group(backend):
        ppo.main(test_ppo._args(w, model_dir, tmp_path / "ppo", max_steps=2, save_every=1))


def test_collectives_on_a_gpu_process_group(tiny_world, paper_model, tmp_path):
    """On a GPU, setup_distributed's group must take the stages' CPU tensors: with NCCL alone (emulated
    by 'cuda:fake') the first all-reduce of a CPU tensor fails; with the backend we start it runs.
    256 image tokens (224 px / patch 14)."""
    backend = common.process_group_backend("cuda", gpu_backend="fake")
    assert backend.replace("fake", "nccl") == common.process_group_backend("cuda")
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        _stage_runs(tiny_world, paper_model, tmp_path / "nccl_only", "cuda:fake")
    _stage_runs(tiny_world, paper_model, tmp_path / "ours", backend)
    assert not dist.is_initialized()


def _ckpt(out, step):
    return common.load_checkpoint(str(out / f"ckpt_{step:07d}.pt"))


def test_bf16_base_trains_fp32_master_weights(tiny_world, paper_model, tmp_path):
    """A bf16 base (what dtype auto loads on a GPU; here on the CPU): the adapter, the head and AdamW's
    state are fp32, so updates of lr 3e-5 move every LoRA weight. Pure bf16 rounds nearly all away
    (a bf16 weight near 0.1 moves in steps of 4e-4)."""
    prefs = test_reward_model._separable_prefs(tiny_world, tmp_path / "prefs.json", n=80)
    out = tmp_path / "rm"
    RM.main(test_reward_model._args(tiny_world, out, prefs, model_path=paper_model, dtype="bf16", lr=3e-5,
                                    max_steps=4, save_every=1, keep_last=10, eval_every=1000, eval_size=8))
    first, last = _ckpt(out, 1), _ckpt(out, 4)
    a_keys = [k for k in last["model"] if "lora_A" in k]
    assert a_keys and all(v.dtype == torch.float32 for v in last["model"].values())
    moved = torch.cat([(last["model"][k] != first["model"][k]).flatten() for k in a_keys]).float().mean()
    assert moved > 0.99, float(moved)
    states = [t for st in last["optimizer"]["state"].values() for t in st.values() if t.dim() > 0]
    assert states and all(t.dtype == torch.float32 for t in states)
    # the saved reward model still scores on a bf16 base
    scorer = RM.RewardScorer.load(str(out / "final"), dtype=torch.bfloat16)
    assert next(scorer.rm.m.llm.parameters()).dtype == torch.bfloat16


def test_bf16_full_finetuning_keeps_fp32_masters_and_saves_bf16(tiny_world, paper_model, tmp_path):
    from safetensors.torch import load_file
    import glob
    out = tmp_path / "sft"
    sft.main(test_sft._args(tiny_world, out, model_path=paper_model, dtype="bf16", max_steps=2, save_every=1,
                            train_vision="false"))
    ck = _ckpt(out, 2)
    assert ck["model"] and all(v.dtype == torch.float32 for v in ck["model"].values())
    saved = {k: v for f in glob.glob(str(out / "final" / "*.safetensors")) for k, v in load_file(f).items()}
    assert saved and {v.dtype for v in saved.values()} == {torch.bfloat16}


def test_compiled_sft_under_ddp_syncs_once_per_optimizer_step(tiny_world, paper_model, tmp_path, monkeypatch):
    """--compile with DDP: gradient accumulation must skip the all-reduce on all but the last micro-step
    (no_sync on the DDP module). Counted with a DDP communication hook; 2 steps x 2 micro-steps."""
    calls = []

    class CountingDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)

            def hook(state, bucket):   # DDP's default all-reduce, counted
                calls.append(bucket.index())
                return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])
            self.register_comm_hook(None, hook)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", CountingDDP)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, backend="eager"))
    with nccl_like_group("gloo"):
        r = sft.main(test_sft._args(tiny_world, tmp_path / "sft", model_path=paper_model, compile="true", max_steps=2,
                                    global_batch=8, micro_batch=4))
    assert r["step"] == 2
    buckets = len(set(calls))
    assert buckets >= 1 and len(calls) == 2 * buckets, calls


def test_checkpointed_layers_recompute_under_the_adapter_of_their_forward():
    """Gradient checkpointing recomputes each layer in backward. With two adapters on one base (PPO's
    policy and value), the active adapter may have changed by then: the gradients must still be those of
    the adapter the forward ran (compared with no checkpointing)."""
    import model as M
    torch.manual_seed(0)
    cfg = M.ModelConfig.preset("tiny", image_size=32, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
                               vision_intermediate=64, hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64,
                               vocab_size=50)
    m = M.LLaVA(cfg)
    m.requires_grad_(False)
    for name in ("a", "b"):
        m.add_adapter(name, r=4, alpha=8.0)
        for p in m.adapter_parameters(name):
            p.data.normal_(0, 0.1)
            p.requires_grad_(True)
    ids = torch.randint(3, 50, (2, 12))
    target = torch.randn(2, 12, 32)
    grads = []
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        m.train()
        m.set_adapter("a")
        loss = (m.hidden_states(ids, None) * target).sum()
        m.set_adapter("b")                      # as PPO's value forward does before the policy's backward
        loss.backward()
        grads.append([p.grad.clone() for p in m.adapter_parameters("a")])
        assert all(p.grad is None for p in m.adapter_parameters("b"))
        m.zero_grad(set_to_none=True)
    for g0, g1 in zip(*grads):
        assert g0.abs().max() > 1e-3 and torch.allclose(g0, g1, rtol=1e-4, atol=1e-7), (g0 - g1).abs().max()


# --------------------------------------------------------------------------------------------------
# The rehearsal (rehearse.py): checked against the CPU allocator, then run at the paper's shapes

def _allocator_peak_gib(fn) -> float:
    """Peak bytes held by the CPU allocator while fn() runs, from the profiler's allocation events (they
    carry the allocator's running total): an account independent of rehearse.py's storage counting."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        n = stack.pop()
        if n.tag == _EventType.Allocation:
            peak = max(peak, n.extra_fields.total_allocated)
        stack.extend(n.children)
    return peak / 2 ** 30


SMALL = dict(image_size=224, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=2, vision_intermediate=128,
             hidden=256, layers=4, heads=4, kv_heads=4, intermediate=512, vocab_size=2000, max_seq_len=2048)


@pytest.mark.parametrize("stage", ["rm", "sft_fsdp", "ppo"])
def test_rehearsal_estimate_matches_real_memory(stage):
    """The same rehearsal on real tensors (a small model, 256 image tokens, fp32, 8 fake ranks): the fake
    run's peak is within 10% of the real run's allocator peak."""
    import rehearse
    import model as M
    mcfg = M.ModelConfig.preset("tiny", **SMALL)
    if stage == "rm":
        cfg = common.parse_config(RM.Config, ["--micro_batch", "2", "--max_len", "512", "--lora_r", "16"], RM.PRESETS)
        run = lambda fake: rehearse.rehearse_rm(cfg, mcfg, 8, torch.float32, fake)          # noqa: E731
    elif stage == "sft_fsdp":
        cfg = common.parse_config(sft.Config, ["--micro_batch", "2", "--max_len", "512", "--fsdp", "true",
                                               "--grad_ckpt", "true"], sft.PRESETS)
        run = lambda fake: rehearse.rehearse_sft(cfg, mcfg, 8, torch.float32, fake)         # noqa: E731
    else:
        cfg = common.parse_config(ppo.Config, ["--micro_batch", "4", "--step_batch", "64", "--max_new_tokens", "96",
                                               "--lora_r", "16", "--grad_ckpt", "true"], ppo.PRESETS)
        run = lambda fake: rehearse.rehearse_ppo(cfg, mcfg, 8, None, 512, torch.float32, fake,   # noqa: E731
                                                 decode_steps=8)
    est = run(True)["peak"]
    real = _allocator_peak_gib(lambda: run(False))
    print(f"{stage}: estimate {est:.4f} GiB, allocator {real:.4f} GiB, ratio {est / real:.3f}")
    assert abs(est / real - 1) < 0.10, (est, real)


def _params(cfg) -> int:
    import model as M
    with torch.device("meta"):
        return M.count_params(M.LLaVA(cfg))


def _lora_params(cfg, r: int = 64) -> int:
    """LoRA r on q, k, v, o, gate, up, down of every layer: r x (in + out) each."""
    kv = cfg.kv_heads * cfg.head_dim
    per_layer = 2 * (cfg.hidden + cfg.hidden) + 2 * (cfg.hidden + kv) + 3 * (cfg.hidden + cfg.intermediate)
    return r * per_layer * cfg.layers


def _fits_80gb() -> float:
    import rehearse
    return rehearse.usable_gib(rehearse.GPUS["80 GB"])


@pytest.mark.parametrize("preset", ["llava-rlhf-7b", "llava-rlhf-13b"])
def test_rehearsal_rm_at_paper_shapes(preset):
    """Fact-RM: CLIP ViT-L/14 + Vicuna at full size, 8 ranks. Weights = bf16 base + fp32 LoRA and head
    (closed form); the peak fits an 80 GB GPU."""
    import rehearse
    import model as M
    cfg = common.parse_config(RM.Config, ["--preset", preset], RM.PRESETS)
    mcfg = M.ModelConfig.preset(preset)
    r = rehearse.rehearse_rm(cfg, mcfg, 8)
    want = (2 * _params(mcfg) + 4 * (_lora_params(mcfg) + mcfg.hidden + 1)) / 2 ** 30
    ph = r["phases"]["optimizer step"]
    assert abs(ph["weights"] - want) < 0.01 * want, (ph["weights"], want)
    assert abs(ph["optimizer"] - 2 * 4 * _lora_params(mcfg) / 2 ** 30) < 0.01, ph   # AdamW: 2 fp32 moments
    assert r["peak"] < _fits_80gb(), r


@pytest.mark.parametrize("preset", ["llava-rlhf-7b", "llava-rlhf-13b"])
def test_rehearsal_sft_fsdp_8_ranks(preset):
    """Full fine-tuning with FSDP over a fake 8-rank group: each rank holds 1/8 of the fp32 masters
    (vision tower frozen in bf16), of the gradients and of AdamW's two moments."""
    import rehearse
    import model as M
    cfg = common.parse_config(sft.Config, ["--preset", preset], sft.PRESETS)
    assert cfg.fsdp and cfg.grad_ckpt
    mcfg = M.ModelConfig.preset(preset)
    r = rehearse.rehearse_sft(cfg, mcfg, 8)
    with torch.device("meta"):
        m = M.LLaVA(mcfg)
    n_vision = M.count_params(m.vision)
    n_train = M.count_params(m) - n_vision
    ph = r["phases"]["optimizer step"]
    assert abs(ph["weights"] - (4 * n_train + 2 * n_vision) / 8 / 2 ** 30) < 0.02 * ph["weights"], ph
    assert abs(ph["gradients"] - 4 * n_train / 8 / 2 ** 30) < 0.02 * ph["gradients"], ph
    assert abs(ph["optimizer"] - 2 * 4 * n_train / 8 / 2 ** 30) < 0.02 * ph["optimizer"], ph
    assert r["peak"] < _fits_80gb(), r


@pytest.mark.parametrize("preset,rm_base", [("llava-rlhf-7b", None), ("llava-rlhf-13b", None),
                                            ("llava-rlhf-7b", "llava-rlhf-13b")])
def test_rehearsal_ppo_at_paper_shapes(preset, rm_base):
    """PPO at the paper's lengths (prompt 128 text ids + 256/576 image tokens, 896 new tokens), 8 ranks,
    the 7B policy also beside a 13B RM and critic. Generation holds the KV cache of the whole length
    (closed form); only 2 decode steps run (each costs a full-size step on fake tensors; the cache is
    allocated at full length up front). The peak fits an 80 GB GPU."""
    import rehearse
    import model as M
    cfg = common.parse_config(ppo.Config, ["--preset", preset], ppo.PRESETS)
    mcfg = M.ModelConfig.preset(preset)
    rm_mcfg = M.ModelConfig.preset(rm_base) if rm_base else None
    r = rehearse.rehearse_ppo(cfg, mcfg, 8, rm_mcfg, decode_steps=2)
    S = cfg.max_prompt_len - 1 + mcfg.num_image_tokens + cfg.max_new_tokens
    kv = 2 * mcfg.layers * cfg.micro_batch * mcfg.kv_heads * S * mcfg.head_dim * 2 / 2 ** 30
    assert abs(r["phases"]["rollout: generate"]["kv_cache"] - kv) < 1e-6, (r["phases"]["rollout: generate"], kv)
    bases = 2 * (_params(mcfg) + (_params(rm_mcfg) if rm_mcfg else 0)) / 2 ** 30
    assert bases < r["phases"]["update: optimizer step"]["weights"] < bases * 1.25
    assert r["peak"] < _fits_80gb(), r


def test_rehearsal_names_an_unknown_model_preset():
    import rehearse
    with pytest.raises(common.ConfigError, match="--model_path preset:llava-9b: no model preset 'llava-9b'"):
        rehearse.model_config("preset:llava-9b", "")
