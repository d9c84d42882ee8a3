"""common.py: the Checkpointer (keeps the last K, finds the newest, resumes exactly, stops on SIGTERM) and
the shared checks of devices, dtypes and batch geometry."""
import dataclasses
import json
import os
import random
import re
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


@dataclass
class _HelpCfg:
    """A config as the stages write one. A docstring line that looks like a field is not one:
    lr: not this"""
    name: str                        # required: no default
    # data
    path: str = "a#b"                # a '#' inside the default is not the comment
    ids: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    # --- optimisation
    lr: float = 0.5                  # the step size,
    #                                  continued on a comment-only line
    fast: bool = False
    steps: int = 3                   # steps to run
                                     # (continued, indented past the fields)


_HELP_PRESETS = {"small": {"lr": 0.1, "fast": True}, "none": {}}


def test_help_shows_types_defaults_comments_groups_and_presets():
    got = common.config_help(_HelpCfg, _HELP_PRESETS, prog="python x.py").splitlines()
    want = [
        "usage: python x.py [--key value ...]   (--key value, --key=value, or --flag alone for a true boolean)",
        "Keys of _HelpCfg: `--key type = default    what it is`. A boolean also takes true/false",
        "(yes/no, 1/0), a list is comma-separated, and - or _ in a key is the same.",
        "",
        "  --name str (required)       required: no default",
        "",
        "data:",
        "  --path str = 'a#b'          a '#' inside the default is not the comment",
        "  --ids list[int] = [1, 2]",
        "",
        "optimisation:",
        "  --lr float = 0.5            the step size, continued on a comment-only line",
        "  --fast bool = False",
        "  --steps int = 3             steps to run (continued, indented past the fields)",
        "",
        "presets (--preset NAME sets these first; every flag given overrides them):",
        "  small  lr=0.1 fast=True",
        "  none   (nothing)",
    ]
    assert got == want


def test_help_of_every_script_lists_every_key(capsys):
    """Every entry point answers --help with a row per key of its config, in-process (one import each)."""
    import bench
    import eval_mmhal
    import ppo
    import prepare_data
    import rehearse
    import reward_model
    import sft
    import tinyworld

    def help_of(main, argv) -> str:
        try:
            main(argv)
        except SystemExit as e:
            assert e.code in (0, None)
        return capsys.readouterr().out
    cases = [(sft.main, [], sft.Config), (reward_model.main, [], reward_model.Config), (ppo.main, [], ppo.Config),
             (reward_model.main, ["eval"], reward_model.EvalConfig),
             (reward_model.main, ["render"], reward_model.RenderConfig),
             (eval_mmhal.main, [], eval_mmhal.EvalConfig), (bench.main, [], bench.Flags),
             (tinyworld.main, ["pipeline"], tinyworld.PipelineConfig), (tinyworld.main, ["make"], tinyworld.MakeConfig),
             (prepare_data.main, ["check"], prepare_data.CheckConfig)]
    for main, cmd, cls in cases:
        out = help_of(main, cmd + ["--help"])
        assert out.startswith("usage: python "), (cmd, out[:200])
        rows = [x for x in out.splitlines() if x.startswith("  --")]
        assert [r.split()[0] for r in rows] == [f"--{f.name}" for f in dataclasses.fields(cls)], cls
    out = help_of(sft.main, ["--help"])
    assert "\ndata:\n  --data_path str = ''" in out and "\nmodel:\n  --model_path str = ''" in out
    assert re.search(r"\n  --max_len int = 1280 +ids per sample, the image counted as one \(SPEC", out)
    for name, sets in sft.PRESETS.items():    # each preset with every key it sets
        block = out.split("\n  " + name + " ", 1)[1].split("\n  llava" if name == "tiny" else "\n\n")[0]
        assert all(f"{k}={v!r}" in block.split() for k, v in sets.items()), name
    out = help_of(ppo.main, ["--help"])
    assert re.search(r"--grad_ckpt bool = False +recompute each decoder layer in backward \(policy and value "
                     r"updates\): activation memory of one layer instead of all, ~1/3 more compute\n", out)
    assert "python rehearse.py" in help_of(rehearse.main, ["--help"])
    assert "tiny world" in help_of(tinyworld.main, ["--help"])


def test_the_command_line_forms_and_their_errors():
    @dataclass
    class Cfg:
        max_len: int = 0
        lr: float = 1.0
        fast: bool = False
        slow: bool = True
        name: str = ""
        ids: list[int] = dataclasses.field(default_factory=list)
    presets = {"tiny": {"max_len": 7, "fast": True}}
    parse = common.parse_config
    c = parse(Cfg, ["--max_len", "5", "--lr=-2.5", "--fast", "--slow", "false", "--name=a=b", "--ids", "1,2,3"])
    assert (c.max_len, c.lr, c.fast, c.slow, c.name, c.ids) == (5, -2.5, True, False, "a=b", [1, 2, 3])
    assert parse(Cfg, ["--max-len", "9", "--slow=no", "--fast"]) == Cfg(max_len=9, slow=False, fast=True)
    # a preset first whatever its place, then every flag over it
    assert parse(Cfg, ["--max_len", "3", "--preset", "tiny"], presets) == Cfg(max_len=3, fast=True)
    errors = [(["--max_lenn", "3"], "unknown config key --max_lenn (did you mean max_len?)"),
              (["--zzz", "3"], "unknown config key --zzz"),
              (["--max_len", "1e3"], "--max_len: expected an integer, got '1e3' (did you mean 1000?)"),
              (["--max_len", "ten"], "--max_len: expected an integer, got 'ten'"),
              (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
              (["--fast", "ture"], "--fast: expected a boolean (true/false), got 'ture' (did you mean true?)"),
              (["--ids", "1,x"], "--ids: expected an integer, got 'x'"),
              (["--lr"], "--lr needs a value (float)"),
              (["--name", "--fast"], "--name needs a value (str)"),
              (["lr", "3"], "unexpected argument 'lr': options are --key value"),
              (["--preset", "tinyy"], "unknown preset 'tinyy'; choose from ['tiny'] (did you mean tiny?)")]
    for argv, msg in errors:
        with pytest.raises(common.ConfigError) as e:
            parse(Cfg, argv, presets)
        assert str(e.value) == msg, argv
    with pytest.raises(common.ConfigError, match="this script has no presets"):
        parse(Cfg, ["--preset", "tiny"])


class _FakeStream:
    """stderr as a test sees it: what was written, and whether it claims to be a terminal."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def _run_bar(total: int, dt: float, tty: bool, steps: int | None = None) -> tuple[str, list[float]]:
    """A bar of `total` driven by a fake clock advancing `dt` per update (`steps` updates, default all).
    -> what it wrote, and the times at which each line ended (non-tty) or was drawn (tty)."""
    now = [0.0]
    out = _FakeStream(tty)
    bar = common.Progress(total, "sft", stream=out, clock=lambda: now[0])
    times = []
    for _ in range(total if steps is None else steps):
        now[0] += dt
        before = len(out.text)
        bar.update(1, loss=0.5)
        if len(out.text) > before:
            times.append(round(now[0], 6))
    bar.close()
    return out.text, times


def test_progress_in_a_log_file_writes_a_line_per_10_s_and_5_percent_plus_the_last():
    # slow steps (1 s): 5% is 5 s, so the 10 s rule decides: t = 10, 20, ..., 100 (the last)
    text, times = _run_bar(100, 1.0, tty=False)
    assert times == [10.0 * k for k in range(1, 11)] and text.count("\n") == 10 and "\r" not in text
    first = text.splitlines()[0]
    # 10 of 100 after 10 s: 1 it/s, 90 left -> 1:30
    assert first == "sft [##                  ] 10/100  10% 1.00 it/s, 0:10 elapsed, eta 1:30  loss=0.5"
    assert text.splitlines()[-1].startswith("sft [####################] 100/100 100% 1.00 it/s, 1:40 elapsed, eta 0:00")
    # fast steps (0.5 s of 1000): 10 s is 20 steps, so 5% (50 steps = 25 s) decides: 20 lines
    _, times = _run_bar(1000, 0.5, tty=False)
    assert times == [25.0 * k for k in range(1, 21)]
    # a whole bar inside 10 s: only its last line
    text, times = _run_bar(900, 0.01, tty=False)
    assert times == [9.0] and text.count("\n") == 1 and "900/900" in text
    # very slow steps (60 s, 5% = 50 steps): a heartbeat every 300 s shows the run is alive
    _, times = _run_bar(1000, 60.0, tty=False, steps=20)
    assert times == [300.0, 600.0, 900.0, 1200.0]
    # stopped before the total (--stop_at_step): close writes where it stopped, once
    text, times = _run_bar(100, 1.0, tty=False, steps=15)
    assert times == [10.0] and text.splitlines()[-1].startswith("sft [###                 ] 15/100  15% 1.00 it/s")
    assert text.count("\n") == 2
    # under 1 it/s the rate reads as seconds per step
    text, _ = _run_bar(10, 20.0, tty=False, steps=1)
    assert "1/10  10% 20.00 s/it, 0:20 elapsed, eta 3:00" in text


def test_progress_in_a_terminal_redraws_one_line():
    text, times = _run_bar(50, 0.0625, tty=True)
    # drawn at the first update, then at most every 0.1 s (every second update of 0.0625 s), and the last
    assert times == [0.0625 * k for k in [*range(1, 50, 2), 50]]
    assert text.count("\r") == 26 and text.count("\n") == 1 and text.endswith("\n")
    assert all(part.endswith("\x1b[K") or part.endswith("\x1b[K\n") for part in text.split("\r")[1:])
    assert "50/50 100%" in text.split("\r")[-1]
    text, _ = _run_bar(50, 0.0625, tty=True, steps=10)   # stopped early: close ends the line
    assert text.endswith("\n") and text.count("\n") == 1 and "10/50" in text.split("\r")[-1]
    out = _FakeStream(tty=False)
    bar = common.Progress(10, "x", stream=out, enabled=False)
    bar.update(10)
    bar.close()
    assert out.text == ""


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
