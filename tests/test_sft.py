"""sft.py: learning, exact resume, torchrun equivalence, SIGTERM, config errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from helpers import ROOT, torchrun
import sft



def _args(w, out, **kw):
    a = {"data_path": w["data"] / "sft.json", "image_folder": w["data"] / "images", "model_path": w["model"],
         "out_dir": out, "mode": "sft", "train_vision": "true", "lr": 3e-3, "warmup_ratio": 0.0,
         "global_batch": 8, "micro_batch": 4, "max_len": 256, "eval_size": 16, "eval_every": 1000,
         "save_every": 1000, "log_every": 1, "progress": "false", "max_steps": 6}
    a.update(kw)
    return sum(([f"--{k}", str(v)] for k, v in a.items()), [])


def _final_state(out):
    return common.load_checkpoint(common.latest_checkpoint(str(out)))["model"]


def _losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl"))]


def test_training_lowers_loss(tiny_world, tmp_path):
    r = sft.main(_args(tiny_world, tmp_path / "run", max_steps=40, lr=5e-3))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 40 and r["step"] == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    # the final model is saved in transformers' Llava layout and loads back
    import model
    m = model.LLaVA.from_pretrained(str(tmp_path / "run" / "final"))
    assert m.config.hidden == 32 and os.path.exists(tmp_path / "run" / "final" / "tokenizer.model")


def test_exact_resume(tiny_world, tmp_path):
    sft.main(_args(tiny_world, tmp_path / "full"))
    r = sft.main(_args(tiny_world, tmp_path / "part", stop_at_step=3))
    assert r["stopped"] and r["step"] == 3
    sft.main(_args(tiny_world, tmp_path / "part", resume="true"))
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")


def test_lora_mode_trains_only_adapter(tiny_world, tmp_path):
    sft.main(_args(tiny_world, tmp_path / "lora", mode="lora", lora_r=4, lora_alpha=8, max_steps=2))
    sd = _final_state(tmp_path / "lora")
    assert sd and all(".lora_" in k for k in sd)
    assert os.path.exists(tmp_path / "lora" / "final_adapter" / "adapter_model.safetensors")


def _torchrun(args, nproc=2):
    for attempt in range(2):
        r = torchrun("sft.py", args, nproc)
        # Known, rare (about 1 run in 10 here): with FSDP on gloo a rank can abort in C++ teardown
        # ("terminate called without an active exception") after the run has finished. Retried once,
        # only for that message; any other failure fails the test at once.
        if r.returncode == 0 or "terminate called without an active exception" not in r.stderr or attempt:
            break
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("fsdp", ["false", "true"])
def test_torchrun_matches_single_process(tiny_world, tmp_path, fsdp):
    sft.main(_args(tiny_world, tmp_path / "one", max_steps=3))
    _torchrun(_args(tiny_world, tmp_path / "two", max_steps=3, fsdp=fsdp))
    a, b = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())


def test_fsdp_exact_resume(tiny_world, tmp_path):
    """Under FSDP the checkpoint holds the whole weights and optimizer state (gathered from the shards) and a
    resumed run puts them back sharded: the same final state and losses as a run that never stopped."""
    _torchrun(_args(tiny_world, tmp_path / "full", max_steps=4, fsdp="true"))
    _torchrun(_args(tiny_world, tmp_path / "part", max_steps=4, fsdp="true", stop_at_step=2))
    assert common.load_checkpoint(common.latest_checkpoint(str(tmp_path / "part")))["step"] == 2
    _torchrun(_args(tiny_world, tmp_path / "part", max_steps=4, fsdp="true", resume="true"))
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")


def test_sigterm_leaves_loadable_checkpoint(tiny_world, tmp_path):
    out = tmp_path / "sig"
    p = subprocess.Popen([sys.executable, "sft.py"] + _args(tiny_world, out, max_steps=10000), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.time() - t0 < 120
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert "stopped at step" in stdout
    ck = common.load_checkpoint(common.latest_checkpoint(str(out)))
    assert ck["step"] >= 2 and ck["config"]["max_steps"] == 10000
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_config_errors():
    with pytest.raises(common.ConfigError, match="unknown config key --lrr"):
        common.parse_config(sft.Config, ["--lrr", "1e-3"], sft.PRESETS)
    with pytest.raises(common.ConfigError, match="--max_steps: expected an integer, got 'ten'"):
        common.parse_config(sft.Config, ["--max_steps", "ten"], sft.PRESETS)
    with pytest.raises(common.ConfigError, match="--grad_ckpt: expected a boolean"):
        common.parse_config(sft.Config, ["--grad_ckpt", "maybe"], sft.PRESETS)
    with pytest.raises(common.ConfigError, match="unknown preset 'huge'"):
        common.parse_config(sft.Config, ["--preset", "huge"], sft.PRESETS)
    c = common.parse_config(sft.Config, ["--preset", "tiny", "--lr", "3e-5", "--grad_ckpt"], sft.PRESETS)
    assert c.lr == 3e-5 and c.grad_ckpt is True and c.model_preset == "tiny" and c.preset == "tiny"
    r = subprocess.run([sys.executable, "sft.py", "--bogus", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown config key --bogus" in r.stderr


def test_pretrain_mode_uses_the_plain_template(tiny_world, paper_model, tmp_path, monkeypatch):
    """--mode pretrain renders LLaVA's plain `<image>CAPTION\\n` (SPEC §2-3): only the caption and its "\\n" are
    supervised; sft and lora keep the Vicuna v1 template."""
    import data
    from model import IMAGE_TOKEN_INDEX
    made = []

    class Spy(data.SFTDataset):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(data, "SFTDataset", Spy)
    sft.main(_args(tiny_world, tmp_path / "pre", model_path=paper_model, mode="pretrain", train_vision="false",
                   max_steps=1))
    assert made and all(ds.template is data.PLAIN_TEMPLATE for ds in made)
    ds = made[0]
    i = next(k for k, r in enumerate(ds.records) if r["image"] and len(r["conversations"]) == 2)
    caption = ds.records[i]["conversations"][1]["value"]
    item, n, tok = ds[i], ds.num_image_tokens, ds.tok
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert ids == [tok.bos_id] + [IMAGE_TOKEN_INDEX] * n + tok.encode(caption + "\n")
    assert labels == [data.IGNORE_INDEX] * (1 + n) + ids[1 + n:]
    for mode in ("sft", "lora"):
        t = sft.template_for(common.parse_config(sft.Config, ["--mode", mode, "--system", "Be brief."]))
        assert t.style == "vicuna_v1" and t.system == "Be brief."
