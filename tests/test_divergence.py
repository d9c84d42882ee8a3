"""common.Divergence: the rules on synthetic series, and each stage stopping a diverged run (--lr 1e3)
before it saves, keeping the checkpoint from before the divergence."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import common
from helpers import ROOT

LN_V = math.log(1024)


def _watch(tmp_path, **kw) -> "common.Divergence":
    return common.Divergence(str(tmp_path), ceiling={"loss": LN_V, "nll": LN_V}, **kw)


def _healthy_run(seed: int, steps: int = 500):
    """Signals of a healthy run, noisier than the tiny world's: a loss falling from ln V after an lr
    warm-up, with noise of 10% (and a few batches 80% harder) of what the model has learned (a model that
    knows nothing predicts every batch alike); gradient norms with tenfold spikes; a KL per token drifting
    up from 0; -log p of the policy's samples wandering between 2 and 4."""
    rng = random.Random(seed)
    for t in range(steps):
        warm = min(1.0, (t + 1) / 30)
        mean = 0.8 + (LN_V - 0.8) * math.exp(-warm * t / 60)
        learned = 1 - mean / LN_V
        loss = mean * math.exp(rng.gauss(0, 0.1 * learned + 0.005)) * (1 + 0.8 * learned * (rng.random() < 0.02))
        grad = 0.5 * math.exp(rng.gauss(0, 0.5)) * (10.0 if rng.random() < 0.03 else 1.0)
        kl = max(0.0, 0.002 * t * math.exp(rng.gauss(0, 0.3)))
        nll = 3.0 + math.sin(t / 40) + rng.gauss(0, 0.2)
        yield t, {"loss": loss, "grad_norm": grad, "kl_per_token": kl, "nll": nll}


def _near_zero_loss(seed: int, steps: int = 500):
    """A reward model's loss once it separates the pairs: ~0.003, and now and then a batch 30x worse."""
    rng = random.Random(seed)
    for t in range(steps):
        yield t, {"loss": 0.003 * math.exp(rng.gauss(0, 0.5)) * (30.0 if rng.random() < 0.05 else 1.0)}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_healthy_series_never_trip(tmp_path, seed):
    for series in (_healthy_run, _near_zero_loss):
        w = _watch(tmp_path)
        for t, signals in series(seed):
            w.check(t, **signals)


def test_a_jump_trips_at_its_step(tmp_path):
    w = _watch(tmp_path)
    for t, signals in _healthy_run(0, 200):
        w.check(t, **signals)
    with pytest.raises(common.DivergenceError, match=r"after step 200: loss 5000 is far above its recent range"):
        w.check(200, loss=5000.0, grad_norm=0.5)
    # the first jump after one healthy value trips too: lr 1e3 explodes in its first update
    w = _watch(tmp_path)
    w.check(0, loss=6.97)
    with pytest.raises(common.DivergenceError, match=r"after step 1: loss 1\.2e\+07 .* limit 13\.9"):
        w.check(1, loss=1.2e7)


def test_a_zero_gradient_trips(tmp_path):
    w = _watch(tmp_path)
    w.check(0, loss=3.0, grad_norm=0.4)
    with pytest.raises(common.DivergenceError, match="grad_norm 0 is exactly 0 after it was not: .*a dead run"):
        w.check(1, loss=3.0, grad_norm=0.0)
    quiet = _watch(tmp_path)          # nothing to learn from the start (PPO with all rewards 0): not a death
    for step in range(3):
        quiet.check(step, grad_norm=0.0)



def test_a_resumed_watch_judges_as_the_uninterrupted_one(tmp_path):
    """The recent values travel in the checkpoint (plain lists: weights_only loads them): after a resume
    the same jump trips at the same step; a watch that had forgotten them would let it through."""
    w = _watch(tmp_path)
    for step in range(6):
        w.check(step, loss=2.0 + 0.01 * step)
    torch.save({"divergence": w.state_dict()}, tmp_path / "sd.pt")
    resumed = _watch(tmp_path)
    resumed.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True)["divergence"])
    with pytest.raises(common.DivergenceError, match="after step 6: loss 5 is far above its recent range"):
        resumed.check(6, loss=5.0)
    _watch(tmp_path).check(6, loss=5.0)          # no history: the first value is never a jump

@pytest.mark.parametrize("enabled", [True, False])
def test_non_finite_trips_even_when_the_check_is_off(tmp_path, enabled):
    w = _watch(tmp_path, enabled=enabled)
    w.check(0, loss=3.0)
    with pytest.raises(common.DivergenceError, match="after step 1: loss nan is not finite"):
        w.check(1, loss=float("nan"))
    with pytest.raises(common.DivergenceError, match="grad_norm inf is not finite"):
        w.check(1, grad_norm=float("inf"))


def test_off_keeps_only_the_non_finite_rule(tmp_path):
    w = _watch(tmp_path, enabled=False)
    w.check(0, loss=3.0, grad_norm=1.0)
    w.check(1, loss=1e9, grad_norm=0.0)
    w.check(2, loss=LN_V)


def test_uniform_predictions_trip_once_the_model_had_learned(tmp_path):
    w = _watch(tmp_path)
    for t in range(5):                       # a model trained from scratch starts at ln V: fine
        w.check(t, nll=LN_V - 0.01 * t)
    for t in range(5, 40):                   # learning, then creeping up slowly (no jump)
        w.check(t, nll=max(3.0, LN_V - 0.3 * (t - 4)) + 0.15 * max(0, t - 25))
    with pytest.raises(common.DivergenceError, match=r"after step 40: nll 6\.931 is at ln V = 6\.931, the value of "
                                                     r"uniform predictions .*after it had been 3"):
        w.check(40, nll=LN_V)


def test_stop_sets_aside_the_diverged_checkpoint_and_names_the_good_one(tmp_path):
    for s in (3, 4):
        torch.save({"step": s}, tmp_path / f"ckpt_{s:07d}.pt")
    w = _watch(tmp_path)
    w.check(3, loss=2.0)
    with pytest.raises(common.DivergenceError) as e:
        w.check(4, loss=1e6)
    msg = str(e.value)
    assert "stopping without saving" in msg.lower() and "--lr" in msg and "\n" not in msg
    assert f"the last good checkpoint is {tmp_path / 'ckpt_0000003.pt'}" in msg
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000003.pt", "ckpt_0000004.pt.diverged"]
    assert common.latest_checkpoint(str(tmp_path)).endswith("ckpt_0000003.pt")
    assert isinstance(e.value, common.UserError) and isinstance(e.value, FloatingPointError)


# --------------------------------------------------------------------------------------------------
# Each stage: the lr jumps to 1e3 after a few good steps; save_every 1 and keep_last 2 would rotate every good
# checkpoint away by the end of the run. It stops at the first diverged step, before saving, and the checkpoint
# left is the one before it, with finite weights.

def _argv(a: dict) -> list[str]:
    return sum(([f"--{k}", str(v)] for k, v in a.items()), [])


def _sft_args(w, out, **kw):
    a = {"data_path": w["data"] / "sft.json", "image_folder": w["data"] / "images", "model_path": w["model"],
         "out_dir": out, "mode": "sft", "train_vision": "true", "lr": 3e-3, "warmup_ratio": 0.0,
         "global_batch": 8, "micro_batch": 8, "max_len": 256, "eval_size": 16, "eval_every": 1000,
         "save_every": 1, "keep_last": 2, "progress": "false", "max_steps": 10}
    return _argv({**a, **kw})


def _prefs(w, path, n=48):
    """Pairs where the right answer beats "There is no shape." + a wrong one, in random order."""
    prompts = json.load(open(w["data"] / "preference_prompts.json"))
    rng = random.Random(0)
    recs = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        good, bad = p["gt_answer"], "There is no shape. " + p["gt_answer"].replace("red", "green")
        pref = rng.choice([1, 2])
        recs.append({"id": f"s{i}", "image": p["image"], "conversations": p["conversations"],
                     "output_1": {"value": good if pref == 1 else bad},
                     "output_2": {"value": bad if pref == 1 else good}, "preference": pref})
    json.dump(recs, open(path, "w"))
    return path


def _rm_args(w, out, **kw):
    a = {"data_path": _prefs(w, out.parent / "prefs.json"), "image_folder": w["data"] / "images",
         "captions": w["data"] / "captions.json", "model_path": w["model"], "out_dir": out, "lora_r": 8,
         "lora_alpha": 16, "lr": 3e-3, "warmup_ratio": 0.0, "global_batch": 8, "micro_batch": 8, "max_len": 512,
         "eval_size": 8, "eval_every": 1000, "save_every": 1, "keep_last": 2, "progress": "false",
         "max_steps": 10, "grad_clip": 1.0}
    return _argv({**a, **kw})


def _ppo_args(w, sft_dir, out, **kw):
    a = {"prompts_path": w["data"] / "ppo_prompts.json", "image_folder": w["data"] / "images",
         "captions": w["data"] / "captions.json", "model_path": sft_dir, "out_dir": out, "rollout_batch": 16,
         "step_batch": 16, "micro_batch": 16, "ppo_epochs": 1, "max_new_tokens": 12, "length_budget": 12,
         "lr": 1e-2, "kl_coef": 0.0, "reward_scale": 1.0, "max_steps": 8, "lora_r": 8, "lora_alpha": 16,
         "progress": "false", "length_penalty": 0.0, "no_eos_penalty": 0.0, "warmup_steps": 0,
         "toy_reward": "contains:red", "save_every": 1, "keep_last": 2}
    return _argv({**a, **kw})


def _lr_jumps_at(good_steps: int, lr: float):
    """A schedule: `lr` for the first good_steps updates, then 1e3."""
    return lambda step, *a, **kw: lr if step < good_steps else 1e3


def _assert_stopped_before(out, diverged: int) -> None:
    """The run dir holds the diverged step's checkpoint set aside, and as its newest checkpoint the one
    before: an earlier step, finite weights."""
    assert os.path.exists(out / f"ckpt_{diverged:07d}.pt.diverged")
    ck = common.load_checkpoint(common.latest_checkpoint(str(out)))
    assert ck["step"] == diverged - 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not os.path.exists(out / "final")


def test_sft_stops_at_the_diverged_step(tiny_world, tmp_path, monkeypatch):
    import sft
    monkeypatch.setattr(common, "cosine_lr", _lr_jumps_at(4, 3e-3))
    with pytest.raises(common.DivergenceError, match=r"after step 5: (loss|grad_norm) .*the last good checkpoint is "
                                                     r".*ckpt_0000004\.pt"):
        sft.main(_sft_args(tiny_world, tmp_path / "run"))
    _assert_stopped_before(tmp_path / "run", 5)


def test_sft_lr_1e3_exits_2_in_one_line(tiny_world, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "sft.py"] + _sft_args(tiny_world, out, lr=1e3), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged after step 1: loss "), last
    assert "there is no checkpoint from before it" in last and "lower --lr" in last
    assert "Traceback" not in r.stderr
    assert [f for f in os.listdir(out) if f.startswith("ckpt_")] == ["ckpt_0000001.pt.diverged"]


def test_reward_model_stops_at_the_diverged_step(tiny_world, tmp_path, monkeypatch):
    import reward_model as RM
    monkeypatch.setattr(common, "constant_lr", _lr_jumps_at(3, 3e-3))   # the RM's (published) schedule
    with pytest.raises(common.DivergenceError, match=r"after step 4: loss"):
        RM.main(_rm_args(tiny_world, tmp_path / "rm"))
    _assert_stopped_before(tmp_path / "rm", 4)


def test_ppo_stops_at_the_diverged_step(tiny_world, tiny_sft, tmp_path, monkeypatch):
    import ppo
    monkeypatch.setattr(ppo, "ppo_lr", _lr_jumps_at(2, 1e-2))
    with pytest.raises(common.DivergenceError, match=r"after step 3: (kl_per_token|nll) "):
        ppo.main(_ppo_args(tiny_world, tiny_sft, tmp_path / "ppo"))
    _assert_stopped_before(tmp_path / "ppo", 3)


def test_divergence_check_false_trains_on(tiny_world, tmp_path, monkeypatch):
    """The flag turns the range rules off: the same diverging SFT run goes to its end (a loss that is
    still finite), as before the check existed."""
    import sft
    monkeypatch.setattr(common, "cosine_lr", _lr_jumps_at(4, 3e-3))
    r = sft.main(_sft_args(tiny_world, tmp_path / "run", max_steps=8, divergence_check="false"))
    assert r["step"] == 8 and math.isfinite(r["loss"])
