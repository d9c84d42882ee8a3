"""common.py: the Checkpointer (keeps the last K, finds the newest, resumes exactly, stops on SIGTERM) and
the shared checks of devices, dtypes and batch geometry."""
import dataclasses
import json
import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import common
import model
import data


@dataclass
class _Cfg:
    out_dir: str
    keep_last: int = 2
    save_every: int = 2
    stop_at_step: int = 0
    lr: float = 0.1


def _state(seed: int):
    """A model with a frozen part, its AdamW, a sampler (the run's seed, 0: its order is the config's) and a
    rollout generator; weights and generator drawn from `seed`."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    opt = torch.optim.AdamW([model.weight], lr=0.1)
    sampler = data.ResumableSampler(10, seed=0)
    gen = torch.Generator().manual_seed(seed)
    return model, opt, sampler, gen


def _train_step(model, opt, sampler, gen) -> None:
    x = torch.randn(len(sampler.take(3)), 4, generator=gen)
    model(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def _what_comes_next(model, opt, sampler, gen) -> dict:
    """Everything a resumed run draws or computes next: the sampler's indices (across an epoch end), each
    RNG's next numbers, and the weights after one more AdamW step (which reads the optimizer's moments)."""
    nxt = {"indices": sampler.take(12), "python": random.random(), "numpy": float(np.random.rand()),
           "torch": torch.rand(3), "gen": torch.rand(3, generator=gen)}
    _train_step(model, opt, sampler, gen)
    nxt["weight"] = model.weight.detach().clone()
    return nxt


def test_checkpointer_keeps_last_k_and_resumes_exactly(tmp_path):
    cfg = _Cfg(out_dir=str(tmp_path))
    model, opt, sampler, gen = _state(0)
    ck = common.Checkpointer(cfg, model, opt, sampler, generator=gen)
    assert ck.resume() is None                                   # nothing there yet: a fresh start
    for step in range(1, 6):
        _train_step(model, opt, sampler, gen)
        ck.save(step, best=0.1 * step)
    # the last keep_last are kept; the newest is the highest step, never a half-written file
    open(tmp_path / "ckpt_0000009.pt.tmp.123", "w").write("a crash while writing")
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == ["ckpt_0000004.pt", "ckpt_0000005.pt"]
    assert common.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt_0000005.pt")
    saved_weight = model.weight.detach().clone()
    saved_bias = model.bias.detach().clone()
    saved_moments = {k: v.clone() for k, v in opt.state[model.weight].items()}
    want = _what_comes_next(model, opt, sampler, gen)
    ck.stop.restore()

    # a new process: other weights, other RNG states, a fresh optimizer and sampler
    model2, opt2, sampler2, gen2 = _state(7)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    ck2 = common.Checkpointer(cfg, model2, opt2, sampler2, generator=gen2)
    state = ck2.resume()
    ck2.stop.restore()
    assert state == {"step": 5, "best": 0.1 * 5}
    assert torch.equal(model2.weight, saved_weight) and not torch.equal(model2.bias, saved_bias)  # frozen: not saved
    with torch.no_grad():
        model2.bias.copy_(saved_bias)               # the frozen base comes from its folder, as in the stages
    assert set(opt2.state[model2.weight]) == set(saved_moments)
    for k, v in saved_moments.items():
        assert torch.equal(opt2.state[model2.weight][k], v), k
    got = _what_comes_next(model2, opt2, sampler2, gen2)
    assert got["indices"] == want["indices"]
    assert got["python"] == want["python"] and got["numpy"] == want["numpy"]
    for k in ("torch", "gen", "weight"):
        assert torch.equal(got[k], want[k]), k
    ck5 = common.load_checkpoint(str(tmp_path / "ckpt_0000005.pt"))
    assert set(ck5["model"]) == {"weight"}          # the frozen bias is reloaded from the base, not saved
    assert ck5["config"] == {"out_dir": str(tmp_path), "keep_last": 2, "save_every": 2, "stop_at_step": 0, "lr": 0.1}


def test_checkpointer_saves_every_k_and_stops_on_sigterm_or_stop_at_step(tmp_path):
    model, opt, sampler, _ = _state(0)
    before = signal.getsignal(signal.SIGTERM)
    ck = common.Checkpointer(_Cfg(out_dir=str(tmp_path / "a"), keep_last=0, save_every=2), model, opt, sampler)
    assert [ck.after_step(s) for s in (1, 2, 3)] == [False, False, False]
    assert os.listdir(tmp_path / "a") == ["ckpt_0000002.pt"]
    os.kill(os.getpid(), signal.SIGTERM)             # caught: only a flag is set
    assert ck.after_step(5, bad=1) is True           # not a multiple of save_every: saved because it stops
    assert common.load_checkpoint(str(tmp_path / "a" / "ckpt_0000005.pt"))["bad"] == 1
    assert signal.getsignal(signal.SIGTERM) == before
    ck = common.Checkpointer(_Cfg(out_dir=str(tmp_path / "b"), save_every=100, stop_at_step=3), model, opt, sampler)
    assert [ck.after_step(s) for s in (1, 2, 3)] == [False, False, True]
    assert common.latest_checkpoint(str(tmp_path / "b")).endswith("ckpt_0000003.pt")
    assert ck.finish(3).endswith("ckpt_0000003.pt") and signal.getsignal(signal.SIGTERM) == before


def test_device_dtype_and_batch_geometry():
    cpu = torch.device("cpu")
    assert common.resolve_device("cpu") == cpu
    with pytest.raises(common.ConfigError, match="--device: expected auto, cpu, cuda or cuda:N, got 'gpu0'"):
        common.resolve_device("gpu0")
    assert common.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert model.torch_dtype("auto", cpu) is torch.float32
    assert model.torch_dtype("auto", torch.device("cuda")) is torch.bfloat16
    for names, dt in ((("fp32", "float32"), torch.float32), (("bf16", "bfloat16"), torch.bfloat16),
                      (("fp16", "float16"), torch.float16)):
        assert all(model.torch_dtype(n, cpu) is dt for n in names)
    with pytest.raises(ValueError, match="dtype must be auto"):
        model.torch_dtype("fp8", cpu)
    assert common.accumulation(32, 4, 2) == 4
    with pytest.raises(common.ConfigError, match=r"--step_batch 12 must be a multiple of micro_batch x ranks = 4 x 2"):
        common.accumulation(12, 4, 2, "step_batch")


def test_help_lists_every_key_with_its_default_comment_and_the_presets(capsys):
    import sft
    with pytest.raises(SystemExit) as e:
        common.parse_config(sft.Config, ["--lr", "1", "--help"], sft.PRESETS)
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("  --")]
    assert len(lines) == len(dataclasses.fields(sft.Config))          # one line per key, none left out
    assert "  --max_len int = 1280    ids per sample, the image counted as one" in out
    assert "presets (--preset NAME): " in out and "llava-rlhf-7b" in out


class _Payload:
    """A pickle that runs code when loaded: what a tampered or foreign checkpoint can carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))       # loading it would create the marker file


def test_load_checkpoint_refuses_a_pickled_payload_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "ckpt_0000001.pt"
    torch.save({"model": {}, "step": 1, "evil": _Payload(str(marker))}, bad)
    with pytest.raises(common.CheckpointError, match="refused to load checkpoint .*ckpt_0000001.pt"):
        common.load_checkpoint(str(bad))
    assert not marker.exists()
    # what the Checkpointer writes loads under weights_only=True (numpy's RNG state kept as a tensor)
    np.random.seed(3)
    state = common._rng_state()
    torch.save({"rng": state}, tmp_path / "ok.pt")
    want = np.random.rand(4)
    np.random.seed(99)
    common._set_rng_state(torch.load(tmp_path / "ok.pt", weights_only=True)["rng"])
    assert np.array_equal(np.random.rand(4), want)


def test_stale_temp_files_of_killed_writes_are_swept(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()                 # a pid whose process has exited
    stale = tmp_path / f"ckpt_0000004.pt.tmp.{dead}"
    live = tmp_path / f"ckpt_0000006.pt.tmp.{os.getppid()}"          # a running writer's: kept
    for p in (stale, live):
        p.write_bytes(b"x" * 100)
    (tmp_path / "ckpt_0000002.pt").write_bytes(b"y")
    assert common.sweep_stale_temps(str(tmp_path)) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt_0000002.pt", live.name])


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    common.atomic_write_text("old", str(path))

    def full_disk(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("partial")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        common.atomic_file(str(path), full_disk)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


# ----------------------------------------------------------------------------------------------------
# Trustworthy checkpoints (#22 items 1-4, 6, 8): corruption detected, fallback, resume modes, pruning by
# step, a signal during the final save, logs cut back to the resumed step.

def _saved_run(out, steps=(2, 4), **cfg) -> list[str]:
    """Checkpoints at `steps` of a toy run in `out` (keep_last 0: all kept). -> their paths."""
    model, opt, sampler, gen = _state(0)
    ck = common.Checkpointer(_Cfg(out_dir=str(out), keep_last=0, **cfg), model, opt, sampler, generator=gen)
    ck.stop.restore()
    paths = []
    for step in range(1, max(steps) + 1):
        _train_step(model, opt, sampler, gen)
        if step in steps:
            paths.append(ck.save(step, best=float(step)))
    return paths


def _resumer(out, resume="true", overwrite=False):
    @dataclass
    class Cfg(_Cfg):
        resume: str = "false"
        overwrite: bool = False
    model, opt, sampler, gen = _state(7)
    ck = common.Checkpointer(Cfg(out_dir=str(out), resume=resume, overwrite=overwrite), model, opt, sampler,
                             generator=gen)
    ck.stop.restore()
    return ck, model


def test_a_flipped_bit_or_garbage_inside_a_checkpoint_is_detected(tmp_path):
    """The content checksum: one flipped bit in a tensor's bytes (a read that torch.load itself accepts)
    or 4 KB of garbage in the middle of the file -> CheckpointError naming the file."""
    path = _saved_run(tmp_path, steps=(2,))[0]
    good = common.load_checkpoint(path)
    raw = open(path, "rb").read()
    weight = good["model"]["weight"].numpy().tobytes()
    at = raw.find(weight)
    assert at > 0
    flipped = bytearray(raw)
    flipped[at + 5] ^= 0x10
    open(path, "wb").write(bytes(flipped))
    loaded = torch.load(path, weights_only=True)      # torch reads it without a word: only the checksum sees it
    assert not torch.equal(loaded["model"]["weight"], good["model"]["weight"])
    with pytest.raises(common.CheckpointError, match=r"ckpt_0000002.pt is corrupt: its content's checksum"):
        common.load_checkpoint(path)
    garbage = bytearray(raw)
    garbage[len(raw) // 3: len(raw) // 3 + 4096] = np.random.default_rng(0).bytes(4096)
    open(path, "wb").write(bytes(garbage))
    with pytest.raises(common.CheckpointError, match=r"ckpt_0000002.pt"):
        common.load_checkpoint(path)
    torch.save({"model": {}, "step": 1}, path)     # a torch file of another program (or an older version)
    with pytest.raises(common.CheckpointError, match="is not a llava-rlhf-checkpoint/2 checkpoint"):
        common.load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "flipped"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, damage, capsys):
    p2, p4, p6 = _saved_run(tmp_path, steps=(2, 4, 6))
    raw = open(p6, "rb").read()
    bad = {"truncated": raw[: len(raw) // 2], "empty": b"", "garbage": b"\x00garbage" * 100,
           "flipped": raw[:-200] + bytes([raw[-200] ^ 1]) + raw[-199:]}[damage]
    open(p6, "wb").write(bad)
    ck, model = _resumer(tmp_path)
    state = ck.start()
    assert state["step"] == 4 and state["best"] == 4.0
    assert torch.equal(model.weight, common.load_checkpoint(p4)["model"]["weight"])
    err = capsys.readouterr().err
    assert "ckpt_0000006.pt" in err and "resuming from ckpt_0000004.pt instead" in err
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000002.pt", "ckpt_0000004.pt", "ckpt_0000006.pt.corrupt"]
    # none usable: stop, listing each file and why
    for p in (p2, p4):
        open(p, "wb").write(b"")
    ck, _ = _resumer(tmp_path)
    with pytest.raises(common.CheckpointError, match=r"none of the 2 checkpoints .* can be used") as e:
        ck.start()
    assert "ckpt_0000002.pt" in str(e.value) and "ckpt_0000004.pt" in str(e.value)


def test_resume_modes_and_a_fresh_run_over_another_runs_checkpoints(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(common.CheckpointError, match=r"--resume true: no checkpoint in .*empty"):
        _resumer(empty, "true")[0].start()
    assert _resumer(empty, "auto")[0].start() is None
    assert "starting fresh" in capsys.readouterr().out
    with pytest.raises(common.ConfigError, match="--resume must be one of false, true, auto, got 'maybe'"):
        _resumer(empty, "maybe")
    # a fresh run into a folder holding another run's checkpoints (of higher steps than it will write)
    _saved_run(tmp_path / "old", steps=(20, 30))
    (tmp_path / "old" / "metrics.jsonl").write_text('{"step": 20, "loss": 1.0}\n')
    with pytest.raises(common.CheckpointError, match=r"holds checkpoints of an earlier run \(2, steps 20..30\)"):
        _resumer(tmp_path / "old", "false")[0].start()
    assert len(os.listdir(tmp_path / "old")) == 3                        # refused: nothing touched
    ck, _ = _resumer(tmp_path / "old", "false", overwrite=True)
    assert ck.start() is None
    assert os.listdir(tmp_path / "old") == []                            # checkpoints and logs of the old run gone
    assert _resumer(tmp_path / "old", "auto")[0].start() is None


def test_pruning_goes_by_step_and_never_removes_what_it_just_wrote(tmp_path):
    out = tmp_path / "run"
    model, opt, sampler, gen = _state(0)
    ck = common.Checkpointer(_Cfg(out_dir=str(out), keep_last=2), model, opt, sampler, generator=gen)
    ck.stop.restore()
    ck.save(10000000)                            # 8 digits: a later step whose name sorts first
    for step in (8, 9, 10, 11):
        written = ck.save(step)
        assert os.path.exists(written)
    assert sorted(os.listdir(out)) == ["ckpt_0000010.pt", "ckpt_0000011.pt", "ckpt_10000000.pt"]
    assert [common.checkpoint_step(p) for p in common._checkpoints(str(out))] == [10, 11, 10000000]


def test_a_signal_during_the_final_save_does_not_kill_it(tmp_path, monkeypatch, capsys):
    model, opt, sampler, _ = _state(0)
    ck = common.Checkpointer(_Cfg(out_dir=str(tmp_path)), model, opt, sampler)
    real_save = torch.save

    def save_and_get_killed(obj, f):
        os.kill(os.getpid(), signal.SIGTERM)   # the default action would end the process here
        real_save(obj, f)
    monkeypatch.setattr(torch, "save", save_and_get_killed)
    path = ck.finish(3)
    assert common.load_checkpoint(path)["step"] == 3
    assert "a stop signal came during the final checkpoint" in capsys.readouterr().out


def test_resume_cuts_the_logs_back_to_the_resumed_step(tmp_path):
    _saved_run(tmp_path, steps=(2, 4))
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 7, "lo')     # torn by a kill
    (tmp_path / "samples.jsonl").write_text("".join(lines[:5]))
    _resumer(tmp_path)[0].start()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:4])
    assert (tmp_path / "samples.jsonl").read_text() == "".join(lines[:4])


def test_run_cli_prints_expected_errors_as_one_line_and_lets_bugs_through(tmp_path, capsys):
    def exits(main) -> tuple[int, str]:
        with pytest.raises(SystemExit) as e:
            common.run_cli(main)
        return e.value.code, capsys.readouterr().err
    missing = str(tmp_path / "nowhere" / "x.json")
    assert exits(lambda: open(missing)) == (2, f"error: {missing}: No such file or directory\n")
    assert exits(lambda: (_ for _ in ()).throw(common.CheckpointError("ckpt_0000002.pt is corrupt"))) == \
        (2, "error: ckpt_0000002.pt is corrupt\n")
    assert exits(lambda: 1) == (1, "")                   # a main's return code is the exit code
    common.run_cli(lambda: {"step": 3})                  # a stage's result: exit normally
    with pytest.raises(KeyError):                        # a bug is not an expected error: its traceback shows
        common.run_cli(lambda: {}["x"])


def test_metrics_log_is_valid_json_even_for_undefined_values(tmp_path):
    log = common.MetricsLogger(str(tmp_path))
    log.log(1, {"loss": 0.5, "value_explained_var": float("nan"), "kl": np.float32("inf"), "n": 3, "tag": "a"})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}")) == \
        {"step": 1, "loss": 0.5, "value_explained_var": None, "kl": None, "n": 3.0, "tag": "a"}
