"""Every stage checks its flags before anything loads (#22 item 14); a resume at the last step finishes
cleanly and writes valid JSON (item 6); a corrupt image in the reward model's pairs or PPO's prompts
goes through --on_error like SFT's (item 11)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import common
import data
import model as M
import ppo
import reward_model as RM
import sft
from helpers import ROOT

STAGES = {"sft": sft, "rm": RM, "ppo": ppo}


# ----------------------------------------------------------------------------------------------------
# Item 14: validation before any load

@pytest.fixture
def inputs(tmp_path):
    """Paths that exist, of the right kind, for every input flag; nothing in them is read by validation."""
    p = {k: tmp_path / k for k in ("data.json", "images", "model", "captions.json", "template.txt", "rm",
                                   "adapter", "empty", "a_file")}
    for k in ("images", "model", "rm", "adapter", "empty"):
        p[k].mkdir()
    (p["model"] / "tokenizer.model").write_bytes(b"not read by validation")
    (p["rm"] / "rm_config.json").write_text("{}")
    for k in ("data.json", "captions.json", "template.txt", "a_file"):
        p[k].write_text("[]")
    p["out"] = tmp_path / "out"
    return p


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model or a tokenizer is loaded: validation must come first."""
    def refuse(*a, **kw):
        raise AssertionError("a model or tokenizer was loaded before the config was validated")
    monkeypatch.setattr(M, "load_model", refuse)
    monkeypatch.setattr(M.LLaVA, "from_pretrained", staticmethod(refuse))
    monkeypatch.setattr(data, "Tokenizer", refuse)


def _base(stage: str, p: dict) -> dict:
    common_args = {"model_path": p["model"], "out_dir": p["out"], "progress": "false"}
    if stage == "sft":
        return {"data_path": p["data.json"], "image_folder": p["images"], **common_args}
    if stage == "rm":
        return {"data_path": p["data.json"], "image_folder": p["images"], "captions": p["captions.json"], **common_args}
    if stage == "rm_eval":
        return {"rm_dir": p["rm"], "data_path": p["data.json"], "image_folder": p["images"]}
    return {"prompts_path": p["data.json"], "image_folder": p["images"], "captions": p["captions.json"],
            "toy_reward": "contains:red", "rollout_batch": 16, "step_batch": 8, "micro_batch": 8, **common_args}


def _argv(stage: str, p: dict, **kw) -> list[str]:
    a = {**_base(stage, p), **kw}
    return (["eval"] if stage == "rm_eval" else []) + sum(([f"--{k}", str(v)] for k, v in a.items()), [])


def _main(stage: str):
    return {"sft": sft.main, "rm": RM.main, "rm_eval": RM.main, "ppo": ppo.main}[stage]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: --device cuda is valid")
# (flag, value, what the message says after "--flag"); a value "<name>" is inputs[name], "<missing>" a path
# that does not exist
COMMON = [("micro_batch", 0, "must be >= 1, got 0"), ("max_steps", -5, "must be >= 0, got -5"),
          ("lr", 0, "must be > 0, got 0.0"), ("lr", "nan", "must be a finite number"), ("epochs", 0, "must be > 0"),
          ("keep_last", -1, "must be >= 0"), ("lora_r", 0, "must be >= 1"),
          ("on_error", "ignore", "must be one of 'raise', 'skip'"), ("dtype", "fp8", "must be one of 'auto'"),
          ("logger", "mlflow", "must be one of 'none'"), ("save_every", -1, "must be >= 0"),
          ("stop_at_step", -1, "must be >= 0"), ("model_path", "", "is required"),
          ("model_path", "<missing>", ": no such folder"), ("model_path", "<a_file>", ": is a file, not a folder"),
          ("image_folder", "<missing>", ": no such folder"), ("tokenizer", "<missing>", ": no such file or folder"),
          ("tokenizer", "<empty>", ": no tokenizer.model in the folder"),
          ("vision_tower", "<missing>", ": no such folder"),
          pytest.param("device", "cuda", " cuda, but torch sees no CUDA GPU", marks=NO_CUDA),
          ("device", "bogus", ": expected auto, cpu, cuda or cuda:N, got 'bogus'"), ("out_dir", "<a_file>", ": is a file, not a folder"),
          ("out_dir", "<a_file>/sub", "cannot be created, .*a_file is not a writable folder"),
          ("resume", "maybe", " must be one of false, true, auto, got 'maybe'")]
TABLES = {
    "sft": COMMON + [
        ("global_batch", -1, "must be >= 1"),        ("data_path", "", "is required"), ("data_path", "<missing>", ": no such file"),
        ("data_path", "<images>", ": is a folder, not a file"), ("eval_data_path", "<missing>", ": no such file"),
        ("max_len", 0, "must be >= 1"), ("log_every", 0, "must be >= 1"), ("eval_size", -1, "must be >= 0"),
        ("eval_every", -1, "must be >= 0"), ("warmup_ratio", 1.5, "must be between 0 and 1"),
        ("lora_dropout", 2, "must be between 0 and 1"), ("beta2", 1, "must be < 1"), ("grad_clip", -1, "must be >= 0"),
        ("mode", "bogus", "must be one of 'pretrain', 'sft', 'lora'"), ("model_preset", "huge", "must be one of"),
        ("lora_targets", ",", "names no module")],
    "rm": COMMON + [
        ("global_batch", 0, "must be >= 1"),        ("data_path", "", "is required"), ("data_path", "<missing>", ": no such file"),
        ("eval_data_path", "<missing>", ": no such file"), ("captions", "<missing>", ": no such file"),
        ("request_file", "<missing>", ": no such file"), ("facts_intro_file", "<missing>", ": no such file"), ("facts", "some", "must be one of 'captions', 'none'"),
        ("eval_every", 0, "must be >= 1"), ("center_coef", -1, "must be >= 0"), ("max_len", 0, "must be >= 1"),
        ("min_lr_ratio", -0.5, "must be between 0 and 1")],
    "rm_eval": [
        ("batch", 0, "must be >= 1"), ("rm_dir", "", "is required"), ("rm_dir", "<missing>", ": no such folder"),
        ("rm_dir", "<empty>", ": no rm_config.json"), ("data_path", "<missing>", ": no such file"),
        ("captions", "<missing>", ": no such file"), ("image_folder", "<missing>", ": no such folder"),
        ("out", "<images>", ": is a folder, not a file"), ("device", "bogus", ": expected auto, cpu, cuda or cuda:N, got 'bogus'")],
    "ppo": COMMON + [
        ("prompts_path", "", "is required"), ("prompts_path", "<missing>", ": no such file"),
        ("max_new_tokens", 0, "must be >= 1, got 0"), ("temperature", -1, "must be >= 0, got -1.0"),
        ("top_p", 1.5, "must be between 0 and 1"), ("kl_estimator", "k2", "must be one of 'k1', 'k3', got 'k2'"),
        ("gamma", 2, "must be between 0 and 1"), ("lam", -1, "must be between 0 and 1"),
        ("grad_clip", 0, "must be > 0"), ("ppo_epochs", 0, "must be >= 1"), ("step_batch", 0, "must be >= 1"),
        ("rollout_batch", 12, " 12 must be a multiple of --step_batch 8"), ("max_prompt_len", 0, "must be >= 1"),
        ("kl_target", 0, "must be > 0"), ("kl_coef", -0.1, "must be >= 0"), ("clip", 0, "must be > 0"),
        ("max_bad_steps", 0, "must be >= 1"), ("rm_dir", "<missing>", ": no such folder"),
        ("rm_dir", "<empty>", ": no rm_config.json"), ("policy_adapter", "<missing>", ": no such folder"),
        ("rm_base_path", "<missing>", ": no such folder"), ("toy_reward", "has:red", "must look like contains:WORD"),
        ("no_eos_penalty", "inf", "must be a finite number")],
}


def _value(v, p: dict, tmp_path) -> str:
    v = str(v)
    if v.startswith("<missing>"):
        return str(tmp_path / "nowhere")
    m = re.match(r"<(\w[\w.]*)>(.*)", v)
    return str(p[m.group(1)]) + m.group(2) if m else v


def _cases():
    for stage, rows in TABLES.items():
        for r in rows:
            values, marks = (r.values, r.marks) if hasattr(r, "values") else (r, ())
            yield pytest.param(stage, *values, marks=marks, id=f"{stage}-{values[0]}={values[1]}")


@pytest.mark.parametrize("stage,flag,value,says", list(_cases()))
def test_bad_flag_is_refused_before_any_load(stage, flag, value, says, inputs, no_load, tmp_path):
    with pytest.raises(common.ConfigError) as e:
        _main(stage)(_argv(stage, inputs, **{flag: _value(value, inputs, tmp_path)}))
    assert str(e.value).startswith(f"--{flag}"), str(e.value)
    assert re.search(says, str(e.value)), str(e.value)
    assert not inputs["out"].exists()       # before start_run too: nothing written


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_checkpoints_in_out_dir_against_resume_are_checked_before_any_load(stage, inputs, no_load):
    """A fresh run over another run's checkpoints, and --resume true with none, stop before the model loads."""
    inputs["out"].mkdir()
    with pytest.raises(common.CheckpointError, match=r"--resume true: no checkpoint in .* to resume from"):
        _main(stage)(_argv(stage, inputs, resume="true"))
    (inputs["out"] / "ckpt_0000040.pt").write_bytes(b"an earlier run's")
    with pytest.raises(common.CheckpointError, match=r"holds checkpoints of an earlier run \(1, steps 40..40\)"):
        _main(stage)(_argv(stage, inputs))


@pytest.mark.parametrize("stage", ["sft", "rm", "rm_eval", "ppo"])
def test_the_base_flags_of_the_table_are_valid(stage, inputs):
    """What the table changes one flag of passes validation: each refusal above is the flag's."""
    argv = _argv(stage, inputs)
    if stage == "rm_eval":
        RM.validate_eval(common.parse_config(RM.EvalConfig, argv[1:]))
    else:
        mod = STAGES[stage]
        mod.validate(common.parse_config(mod.Config, argv, mod.PRESETS))


def test_ppo_temperature_zero_is_greedy_and_valid(inputs):
    """model.sample_next and ppo.logprob_temperature document temperature 0 as greedy sampling."""
    ppo.validate(common.parse_config(ppo.Config, _argv("ppo", inputs, temperature=0)))


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_read_only_out_dir_is_named(stage, inputs, no_load, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real = os.access
    # root may write anywhere, so os.access says True for root even here: answer as for anyone else
    monkeypatch.setattr(os, "access", lambda path, mode: False if os.path.abspath(path) == str(ro) else real(path, mode))
    try:
        for out, says in ((ro, f"--out_dir {ro}: not writable"),
                          (ro / "run", f"--out_dir {ro / 'run'}: cannot be created, {ro} is not a writable folder")):
            with pytest.raises(common.ConfigError) as e:
                _main(stage)(_argv(stage, inputs, out_dir=out))
            assert str(e.value) == says
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("stage,script", [("sft", "sft.py"), ("rm", "reward_model.py"), ("rm_eval", "reward_model.py"),
                                          ("ppo", "ppo.py")])
def test_command_line_bad_flag_is_one_line_exit_2(stage, script, inputs):
    flag = "batch" if stage == "rm_eval" else "micro_batch"
    r = subprocess.run([sys.executable, script] + _argv(stage, inputs, **{flag: 0}), cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --{flag} must be >= 1, got 0"], r.stderr
    assert not inputs["out"].exists()


# ----------------------------------------------------------------------------------------------------
# Item 6: a resume at the last step

def _no_nan_json(path) -> dict:
    def refuse(name):
        raise AssertionError(f"{path}: {name} is not JSON")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def _tensors(folder) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update({f"{f}:{k}": v for k, v in load_file(os.path.join(folder, f)).items()})
    assert out, folder
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


NAN = re.compile(r"\bnan\b", re.IGNORECASE)


@pytest.mark.parametrize("mode", ["sft", "lora"])
def test_sft_resume_at_the_last_step(tiny_world, tmp_path, capfd, mode):
    import test_sft
    out = tmp_path / "run"
    args = test_sft._args(tiny_world, out, max_steps=2, mode=mode, lora_r=4, lora_alpha=8)
    sft.main(args)
    final = out / ("final_adapter" if mode == "lora" else "final")
    before = _tensors(final)
    capfd.readouterr()
    r = sft.main(args + ["--resume", "true"])
    text = "".join(capfd.readouterr())
    assert r["step"] == 2 and not r["stopped"]
    assert "already at step 2 of 2" in text and "done: 2 steps" in text
    assert not NAN.search(text), text
    _same(before, _tensors(final))


def test_rm_resume_at_the_last_step_writes_valid_json(tiny_world, tmp_path, capfd):
    import test_reward_model as T
    prefs = T._separable_prefs(tiny_world, tmp_path / "prefs.json", n=24)
    out = tmp_path / "rm"
    args = T._args(tiny_world, out, prefs, max_steps=2, eval_size=8, eval_every=1)
    r1 = RM.main(args)
    first = _no_nan_json(out / "final" / "rm_config.json")
    assert first["eval_accuracy"] == r1["final_accuracy"] is not None
    before = _tensors(out / "final")
    capfd.readouterr()
    r2 = RM.main(args + ["--resume", "true"])
    text = "".join(capfd.readouterr())
    assert "already at step 2 of 2" in text and not NAN.search(text), text
    again = _no_nan_json(out / "final" / "rm_config.json")
    assert again == first and r2["final_accuracy"] == r1["final_accuracy"]
    _same(before, _tensors(out / "final"))


def test_rm_without_held_out_pairs_writes_null_not_nan(tiny_world, tmp_path):
    import test_reward_model as T
    prefs = T._separable_prefs(tiny_world, tmp_path / "prefs.json", n=8)
    RM.main(T._args(tiny_world, tmp_path / "rm", prefs, max_steps=1, eval_size=0))
    for d in ("final", "best"):
        assert _no_nan_json(tmp_path / "rm" / d / "rm_config.json")["eval_accuracy"] is None


def test_ppo_resume_at_the_last_step(tiny_world, tmp_path, capfd):
    import test_ppo
    out = tmp_path / "ppo"
    args = test_ppo._args(tiny_world, tiny_world["model"], out, max_steps=1, rollout_batch=8, step_batch=8)
    ppo.main(args)
    before = {**_tensors(out / "final"), **_tensors(out / "policy_adapter")}
    capfd.readouterr()
    r = ppo.main(args + ["--resume", "true"])
    text = "".join(capfd.readouterr())
    assert r["step"] == 1 and not r["stopped"] and r["history"] == []
    assert "already at step 1 of 1" in text and not NAN.search(text), text
    _same(before, {**_tensors(out / "final"), **_tensors(out / "policy_adapter")})


# ----------------------------------------------------------------------------------------------------
# Item 11: a corrupt image in the reward model's pairs and PPO's prompts

def _corrupt(tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return bad


def _assert_names(e, path, index: int, image) -> None:
    msg = str(e)
    assert msg.startswith(f"{path}: record {index}: "), msg
    assert f"(image {image})" in msg, msg


def test_rm_corrupt_image_raises_naming_file_record_image(tiny_world, tmp_path):
    import test_reward_model as T
    prefs = json.load(open(T._separable_prefs(tiny_world, tmp_path / "p.json", n=24)))
    bad = _corrupt(tmp_path)
    prefs[12]["image"] = str(bad)
    path = tmp_path / "bad_prefs.json"
    json.dump(prefs, open(path, "w"))
    # one epoch of 16 training pairs (records 8..23) in two steps: record 12 is served
    with pytest.raises(data.DataError) as e:
        RM.main(T._args(tiny_world, tmp_path / "x", path, max_steps=2, eval_size=8, global_batch=8))
    _assert_names(e.value, path, 12, bad)


def test_rm_corrupt_image_skipped_and_counted(tiny_world, tmp_path, capfd, monkeypatch):
    import test_reward_model as T
    prefs = json.load(open(T._separable_prefs(tiny_world, tmp_path / "p.json", n=24)))
    prefs[12]["image"] = str(_corrupt(tmp_path))
    path = tmp_path / "bad_prefs.json"
    json.dump(prefs, open(path, "w"))
    sizes, collate = [], RM.collate_pairs
    monkeypatch.setattr(RM, "collate_pairs", lambda items, pad_id: (sizes.append(len(items)), collate(items, pad_id))[1])
    capfd.readouterr()
    r = RM.main(T._args(tiny_world, tmp_path / "x", path, max_steps=2, eval_size=8, global_batch=8, on_error="skip", num_workers=0))   # sizes seen in this process
    text = "".join(capfd.readouterr())
    assert r["step"] == 2 and not r["stopped"]
    assert "skipped records: 1" in text, text
    assert sizes[:4] == [4, 4, 4, 4]        # the training micro-batches: the next pair served in its place


def _bad_prompts(w, tmp_path, n: int = 8, at: int = 3):
    recs = json.load(open(w["data"] / "ppo_prompts.json"))[:n]
    bad = _corrupt(tmp_path)
    recs[at]["image"] = str(bad)
    path = tmp_path / "bad_prompts.json"
    json.dump(recs, open(path, "w"))
    return path, bad


def test_ppo_corrupt_image_raises_naming_file_record_image(tiny_world, tmp_path):
    import test_ppo
    path, bad = _bad_prompts(tiny_world, tmp_path)
    with pytest.raises(data.DataError) as e:
        ppo.main(test_ppo._args(tiny_world, tiny_world["model"], tmp_path / "x", prompts_path=path, rollout_batch=8,
                                step_batch=8, max_steps=1))
    _assert_names(e.value, path, 3, bad)


def test_ppo_corrupt_image_skipped_and_counted(tiny_world, tmp_path, capfd):
    import test_ppo
    path, _ = _bad_prompts(tiny_world, tmp_path)
    capfd.readouterr()
    r = ppo.main(test_ppo._args(tiny_world, tiny_world["model"], tmp_path / "x", prompts_path=path, rollout_batch=8,
                                step_batch=8, max_steps=1, on_error="skip", samples_to_log=8))
    text = "".join(capfd.readouterr())
    assert r["step"] == 1 and not r["stopped"]
    assert "skipped records: 1" in text, text
    samples = [json.loads(line) for line in open(tmp_path / "x" / "samples.jsonl")]
    assert len(samples) == 8 and all("corrupt" not in s["image"] for s in samples)   # the next prompt served instead
