"""Code that every stage needs: command-line config, device/dtype/batch-geometry checks, distributed setup,
atomic files, the Checkpointer (exact resume, SIGTERM), metrics logging and a progress bar. Kept small on
purpose; each stage script stays a plain loop."""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
import typing
from dataclasses import dataclass, fields, asdict
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, distribute_tensor   # FSDP's sharded parameters
except ImportError:   # a torch built without distributed: nothing is ever sharded
    DTensor = ()


# ----------------------------------------------------------------------------------------------------
# Config: a dataclass, overridable from the command line as `--key value` or `--key=value`.

class UserError(ValueError):
    """An error the person running the script can fix (a bad flag, file, record, model or checkpoint).
    Its message names the flag, file, record or tensor; run_cli prints it as one line and exits 2."""


class ConfigError(UserError):
    """A bad command-line setting; the message names the flag."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used (corrupt, from another run, missing); the message names the file."""


def _convert(name: str, raw: str, typ: Any) -> Any:
    """A command-line string as the field's type (bool, int, float, str or list of them), else ConfigError
    naming the key."""
    if typ is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name}: expected a boolean (true/false), got {raw!r}")
    if typ in (int, float):
        try:
            return typ(raw)
        except ValueError:
            what = "an integer" if typ is int else "a number"
            raise ConfigError(f"--{name}: expected {what}, got {raw!r}") from None
    if typ is str:
        return raw
    if typing.get_origin(typ) is list:
        return [_convert(name, x, typing.get_args(typ)[0]) for x in raw.split(",") if x != ""]
    raise ConfigError(f"--{name}: unsupported type {typ}")


def config_help(cls: type, presets: dict[str, dict] | None = None, prog: str = "") -> str:
    """--help: every key of the config class with its default and the comment beside it in the source
    (the dataclass is the one place a key is documented), then the presets."""
    notes = {}
    for line in inspect.getsource(cls).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and name.isidentifier() and "#" in rest:
            notes[name] = rest.split("#", 1)[1].strip()
    hints, default = typing.get_type_hints(cls), cls()
    rows = [f"  --{f.name} {getattr(hints[f.name], '__name__', hints[f.name])} = {getattr(default, f.name)!r}"
            + (f"    {notes[f.name]}" if f.name in notes else "") for f in fields(cls)]
    head = f"usage: {prog or 'python ' + os.path.basename(sys.argv[0])} [--key value ...]   (keys of {cls.__name__}):"
    tail = [f"presets (--preset NAME): {', '.join(presets)}"] if presets else []
    return "\n".join([head] + rows + tail)


def parse_config(cls: type, argv: list[str] | None = None, presets: dict[str, dict] | None = None):
    """Build `cls` from `argv`. `--preset NAME` (when presets are given) applies a named set of defaults
    first; every other key must be a field of `cls`, else ConfigError names it. --help / -h prints
    config_help and exits 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(config_help(cls, presets))
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: options are --key value")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
        else:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val = argv[i + 1]
                i += 1
            elif hints.get(key.replace("-", "_")) is bool:
                val = "true"  # a bare boolean flag
            else:
                raise ConfigError(f"--{key} needs a value")
        pairs.append((key.replace("-", "_"), val))
        i += 1
    values: dict[str, Any] = {}
    for key, val in sorted(pairs, key=lambda kv: kv[0] != "preset"):   # presets first: every flag overrides them
        if key == "preset":
            if not presets:
                raise ConfigError("this script has no presets")
            if val not in presets:
                raise ConfigError(f"unknown preset {val!r}; choose from {sorted(presets)}")
            values.update(presets[val])
            if "preset" in names:
                values["preset"] = val
        elif key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"unknown config key --{key}{hint}")
        else:
            values[key] = _convert(key, val, hints[key])
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"preset sets unknown keys {sorted(unknown)}")
    return cls(**values)


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's main(); an expected error prints one line and exits 2: a UserError (its message names
    the flag, file, record or tensor), or an OSError from the file system (a missing or unreadable path,
    a read-only or full disk: its message names the file). Anything else is a bug: a full traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)


def print_config(cfg) -> None:
    if is_main():
        print(f"{type(cfg).__name__}:")
        for k, v in asdict(cfg).items():
            print(f"  {k} = {v!r}")


# ----------------------------------------------------------------------------------------------------
# Device, precision and batch geometry: the same flags mean the same thing in every script.

def resolve_device(name: str = "auto") -> torch.device:
    """auto: the GPU when torch sees one, else the CPU; otherwise the device named (cpu, cuda, cuda:1)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}, but torch sees no CUDA GPU (a CPU-only build, or no driver)")
    return dev


def accumulation(total: int, micro_batch: int, world: int, name: str = "global_batch") -> int:
    """Micro-batches per rank that make `total` rows over all ranks: total / (micro_batch x ranks), which
    must be whole, else ConfigError names the flag."""
    if total % (micro_batch * world):
        raise ConfigError(f"--{name} {total} must be a multiple of micro_batch x ranks = {micro_batch} x {world}")
    return total // (micro_batch * world)


# ----------------------------------------------------------------------------------------------------
# Distributed: the same script runs alone or under torchrun.

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def process_group_backend(device_type: str, gpu_backend: str = "nccl") -> str:
    """The backend string for init_process_group. NCCL takes CUDA tensors only, and the stages reduce
    small CPU tensors too (token counts, the skip flag, metrics, pickled objects), so a GPU run registers
    gloo for CPU tensors beside NCCL in the same group: each collective goes to its tensors' device."""
    return f"cpu:gloo,cuda:{gpu_backend}" if device_type == "cuda" else "gloo"


def setup_distributed(device: str = "auto") -> Dist:
    """Init the process group when launched by torchrun (even with one process: the GPU smoke test runs
    NCCL at --nproc_per_node=1), or reuse one the caller made (the tests, the rehearsal)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:   # torchrun: one GPU per process
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    launched = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(dev.type))
    if not dist.is_initialized():
        return Dist(local_rank=local_rank, device=dev)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=dev)


def start_run(cfg) -> Dist:
    """What every stage does first: process group, the config printed, seeds set, out_dir made."""
    d = setup_distributed(cfg.device)
    print_config(cfg)
    seed_everything(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    return d


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum across ranks (a no-op alone); returns a new tensor."""
    t = t.clone()
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank tears down while another still has collectives in flight
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Files: written to a temporary name, fsynced, renamed, so that a crash never leaves half of one.

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:   # a file system that cannot sync a folder: the rename is as durable as it gets
        pass


def atomic_file(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then rename onto `path`, so that a crash leaves either the old file or the new one,
    never a half; the file and its folder are fsynced. The one atomic file write of the project."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(d)


def atomic_write_text(text: str, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_file(path, write)


def write_dir(out: str, fill) -> None:
    """Build a folder with fill(tmp_path) beside `out`, then swap it in: a crash never leaves half a model."""
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    fill(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def save_model_dir(m, out: str, tokenizer_path: str) -> None:
    """A final model: transformers' Llava layout (m.save_pretrained) plus its tokenizer.model."""
    def fill(tmp: str) -> None:
        m.save_pretrained(tmp)
        shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
    write_dir(out, fill)


# ----------------------------------------------------------------------------------------------------
# Training state: exact resume and SIGTERM checkpoints, the same for every stage.

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    # plain values and tensors only, so that checkpoints load with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _on_host(x: Any, keep: bool = True) -> Any:
    """x (a tensor, or dicts and lists of them) as one process holds it, on the CPU. An FSDP-sharded
    tensor (DTensor) is gathered whole, a collective that every rank joins in the same order; only where
    `keep` (the writer, rank 0) is the copy kept, so host memory holds one full state per node, not one per rank."""
    if isinstance(x, dict):
        return {k: _on_host(v, keep) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_on_host(v, keep) for v in x)
    if not isinstance(x, torch.Tensor):
        return x
    if isinstance(x, DTensor):
        x = x.full_tensor()
    return x.detach().cpu() if keep else None


def _laid_out_like(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A full tensor from a checkpoint, on p's device and, when p is FSDP-sharded, sharded the way p is."""
    v = v.to(p.device)
    return distribute_tensor(v, p.device_mesh, p.placements) if isinstance(p, DTensor) else v


def trainable_state_dict(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes: checkpoints stay small and the frozen base is reloaded from its folder."""
    return {k: _on_host(p).clone() for k, p in m.named_parameters() if p.requires_grad}


def load_trainable_state(m: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    params = dict(m.named_parameters())
    want = {k for k, p in params.items() if p.requires_grad}
    if set(sd) != want:
        missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
        raise ValueError(f"{what} does not match the trainable parameters of this run: "
                         f"missing {missing[:4]}, unexpected {extra[:4]} (was it made with other settings?)")
    with torch.no_grad():
        for k, v in sd.items():
            if tuple(v.shape) != tuple(params[k].shape):
                raise ValueError(f"{what}: {k} has shape {tuple(v.shape)}, the model expects {tuple(params[k].shape)}")
            params[k].copy_(_laid_out_like(v, params[k]))


def _load_optimizer(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Optimizer state saved whole goes back sharded like its parameters (FSDP); AdamW's 0-d step stays."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {i: {k: _laid_out_like(v, params[i]) if isinstance(v, torch.Tensor) and v.dim() else v
                 for k, v in st.items()} for i, st in sd["state"].items()}
    opt.load_state_dict({**sd, "state": state})


def _checkpoints(out_dir: str) -> list[str]:
    """The checkpoints in out_dir, oldest step first. Files appear only complete (atomic rename), so the
    newest one on disk is always whole."""
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    return [os.path.join(out_dir, f) for f in names if f.startswith("ckpt_") and f.endswith(".pt")]


def latest_checkpoint(out_dir: str) -> str | None:
    """The checkpoint of the highest step in out_dir (None if there is none)."""
    paths = _checkpoints(out_dir)
    return paths[-1] if paths else None


def load_checkpoint(path: str) -> dict:
    """A checkpoint holds tensors and plain values only, and is read with weights_only=True: resuming
    from a run folder someone else made must not run whatever code a pickle in it carries."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(f"refused to load checkpoint {path}: it holds more than tensors and plain values "
                           f"(a pickled object: written by other code, or tampered with): {e}") from e
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise RuntimeError(f"could not read checkpoint {path}: {e}") from e


def sweep_stale_temps(out_dir: str) -> list[str]:
    """Remove the temporary files (NAME.tmp.PID) that writes killed mid-way left in out_dir, so they do
    not pile up; only those whose writer process is gone. -> the paths removed."""
    gone = []
    for f in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        head, sep, pid = f.rpartition(".tmp.")
        if not sep or not head or not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue
        path = os.path.join(out_dir, f)
        if os.path.isfile(path):
            os.remove(path)
            gone.append(path)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop writes a checkpoint at the next step boundary and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank got a signal."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Checkpointer:
    """Exact resume for a stage's loop. A checkpoint, out_dir/ckpt_{step:07d}.pt, holds everything that
    decides the rest of the run: the trainable weights of `model`, the optimizer, the sampler's position,
    every RNG (and `generator`, the rollout sampler of each rank), the step, the stage's extras and the
    config. The last cfg.keep_last are kept. SIGTERM/SIGINT only set a flag: the loop finishes its step,
    writes a checkpoint and returns, so a preempted job goes on with --resume true as if never stopped.
    FSDP-sharded weights and optimizer state are saved whole: the file is the one a single process writes.

        ck = common.Checkpointer(cfg, model, opt, sampler)   # cfg: out_dir, keep_last, save_every, stop_at_step
        if cfg.resume and (state := ck.resume()):
            step = state["step"]                             # and the extras given to save
        while step < total_steps:
            ...; step += 1
            if ck.after_step(step, **extras):                # saved; a signal or stop_at_step: return now
                return ...
        ck.finish(step, **extras)
    """

    def __init__(self, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler,
                 generator: torch.Generator | None = None):
        self.out_dir, self.keep_last = cfg.out_dir, cfg.keep_last
        self.save_every, self.stop_at_step = cfg.save_every, cfg.stop_at_step
        self.config = asdict(cfg)
        self.model, self.optimizer, self.sampler, self.generator = model, optimizer, sampler, generator
        if is_main():
            for p in sweep_stale_temps(self.out_dir):
                print(f"removed {p}: the temporary file of a checkpoint write that was killed")
        self.stop = StopSignal()

    def resume(self) -> dict | None:
        """Load the newest checkpoint of out_dir into the model, optimizer, sampler and RNGs.
        -> {"step": ..., and the extras given to save}, or None when there is none yet."""
        path = latest_checkpoint(self.out_dir)
        if path is None:
            if is_main():
                print(f"--resume: no checkpoint in {self.out_dir}; starting fresh")
            return None
        ck = load_checkpoint(path)
        load_trainable_state(self.model, ck.pop("model"), path)
        _load_optimizer(self.optimizer, ck.pop("optimizer"))
        self.sampler.load_state_dict(ck.pop("sampler"))
        _set_rng_state(ck.pop("rng"))
        gens = ck.pop("gen", None)
        if self.generator is not None:
            rank = dist.get_rank() if dist.is_initialized() else 0
            self.generator.set_state(gens[rank])
        ck.pop("config")
        if is_main():
            print(f"resumed from {path} at step {ck['step']}")
        return ck

    def save(self, step: int, **extras) -> str:
        """Write the checkpoint of `step`. Every rank calls it (sharded state is gathered, each rank's
        generator collected); rank 0 writes, the others wait for it. -> the file's path."""
        keep = is_main()
        state = {"model": _on_host({k: p for k, p in self.model.named_parameters() if p.requires_grad}, keep),
                 "optimizer": _on_host(self.optimizer.state_dict(), keep), "step": step,
                 "sampler": self.sampler.state_dict(), "rng": _rng_state(), "config": self.config, **extras}
        if self.generator is not None:
            gens = [self.generator.get_state()]
            if dist.is_initialized():
                gens = [None] * dist.get_world_size()
                dist.all_gather_object(gens, self.generator.get_state().cpu())
            state["gen"] = gens
        path = os.path.join(self.out_dir, f"ckpt_{step:07d}.pt")
        if keep:
            atomic_file(path, lambda tmp: torch.save(state, tmp))
            if self.keep_last > 0:
                for old in _checkpoints(self.out_dir)[:-self.keep_last]:
                    os.remove(old)
        if dist.is_initialized():
            dist.barrier()
        return path

    def after_step(self, step: int, **extras) -> bool:
        """End of a step: save every save_every steps, and when the run must stop here (a signal on any
        rank, or stop_at_step reached). -> True when it stopped: the loop returns at once."""
        stopping = self.stop.should_stop() or bool(self.stop_at_step and step >= self.stop_at_step)
        if stopping or (self.save_every and step % self.save_every == 0):
            self.save(step, **extras)
        if stopping:
            self.stop.restore()
            if is_main():
                print(f"\nstopped at step {step}; checkpoint written to {self.out_dir} (continue with --resume true)")
        return stopping

    def finish(self, step: int, **extras) -> str:
        """The last checkpoint of a run that reached its end; SIGTERM/SIGINT act as usual again."""
        self.stop.restore()
        return self.save(step, **extras)


# ----------------------------------------------------------------------------------------------------
# Logging: JSON lines on rank 0, optional wandb/tensorboard, and a progress bar without dependencies.

class MetricsLogger:
    def __init__(self, out_dir: str, backend: str = "none", run_name: str = "run", config: dict | None = None):
        self.active = is_main()
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._wandb = self._tb = None
        if not self.active:
            return
        os.makedirs(out_dir, exist_ok=True)
        try:   # both optional
            if backend == "wandb":
                import wandb
                self._wandb = wandb.init(project="llava-rlhf", name=run_name, config=config)
            elif backend == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:
            print(f"{backend} is not installed; logging to metrics.jsonl only")

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float, np.floating)) else v)
                                for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)


class Progress:
    """A one-line progress bar on rank 0 (stderr), with free-form stats after it."""

    def __init__(self, total: int, desc: str = "", start: int = 0, enabled: bool = True):
        self.total, self.desc, self.n = total, desc, start
        self.enabled = enabled and is_main()
        self.t0 = time.time()
        self.start = start

    def update(self, n: int = 1, **stats) -> None:
        self.n += n
        if not self.enabled:
            return
        frac = self.n / max(1, self.total)
        bar = "#" * int(20 * frac)
        rate = (self.n - self.start) / max(1e-9, time.time() - self.t0)
        s = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
        end = "\n" if self.n >= self.total or not sys.stderr.isatty() else ""
        sys.stderr.write(f"\r{self.desc} [{bar:<20}] {self.n}/{self.total} {rate:.2f}it/s {s}" + end)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and sys.stderr.isatty():
            sys.stderr.write("\n")


def cosine_lr(step: int, total: int, warmup: int, base_lr: float, min_ratio: float = 0.0) -> float:
    """Linear warmup for `warmup` steps, then cosine decay to base_lr * min_ratio at `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------
# Divergence: stop a run whose training has gone wrong, before it saves and its rotation removes the
# good checkpoints.

class DivergenceError(UserError, FloatingPointError):
    """Training diverged (a non-finite, dead or exploded loss, KL, entropy or gradient): the run stopped
    without saving. A FloatingPointError too, what the stages raised for a non-finite loss before."""


class Divergence:
    """Watches the per-step signals of a training loop and raises DivergenceError when they show that
    training diverged. check(step, **signals) is called once the signals of the weights after `step`
    updates are known and before those weights are updated again or saved; a signal given as None is
    not checked. Every rank must see the same values (all-reduced), so that all ranks stop together.
    Rules:
      non-finite  any signal NaN or inf (always on);
      dead        grad_norm exactly 0: no trainable tensor gets a gradient any more;
      jump        any other signal more than max(K * MAD, max(|median|, 1)) above the median of its last
                  WINDOW values (from the second value on): a healthy loss does not double in a step, and
                  noise, warm-up and a drifting KL stay within K median absolute deviations. The gradient
                  norm has no jump rule: a healthy run's spikes tenfold, and clipping absorbs them;
      uniform     a signal named in `ceiling` (a language model's loss, or its samples' -log p) within
                  UNIFORM_TOL of its ceiling ln V, the value of uniform predictions, once it had been below
                  (1 - CLEAR) ln V: the model forgot everything and predicts nothing.
    enabled=False keeps only the non-finite rule. The checkpoint of the weights that diverged (ckpt of
    `step`, written before their signals were known) is renamed *.diverged so that --resume continues from
    the one before; the message names that one."""

    WINDOW, K = 20, 10.0
    UNIFORM_TOL, CLEAR = 0.03, 0.1

    def __init__(self, out_dir: str, enabled: bool = True, ceiling: dict[str, float] | None = None):
        self.out_dir, self.enabled, self.ceiling = out_dir, enabled, ceiling or {}
        self.history: dict[str, list[float]] = {}
        self.lowest: dict[str, float] = {}

    def check(self, step: int, **signals: float | None) -> None:
        for name, value in signals.items():
            if value is None:
                continue
            value = float(value)
            why = self._rule_broken(name, value)
            if why:
                self._stop(step, f"{name} {value:.4g} {why}")
            recent = self.history.setdefault(name, [])
            recent.append(value)
            del recent[:-self.WINDOW]
            self.lowest[name] = min(value, self.lowest.get(name, value))

    def _rule_broken(self, name: str, value: float) -> str:
        """Why `value` shows divergence, or '' when it does not."""
        if not math.isfinite(value):
            return "is not finite"
        if not self.enabled:
            return ""
        if name == "grad_norm":
            return "is exactly 0: no trainable tensor gets a gradient any more (a dead run)" if value == 0 else ""
        recent = self.history.get(name, [])
        if recent:
            med = float(np.median(recent))
            mad = float(np.median(np.abs(np.array(recent) - med)))
            limit = med + max(self.K * mad, max(abs(med), 1.0))
            if value > limit:
                lo, hi = min(recent), max(recent)
                seen = f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"
                return (f"is far above its recent range {seen} (the last {len(recent)} steps: median {med:.4g}, "
                        f"limit {limit:.4g})")
        top = self.ceiling.get(name)
        if top is not None and value >= (1 - self.UNIFORM_TOL) * top \
                and self.lowest.get(name, top) < (1 - self.CLEAR) * top:
            return (f"is at ln V = {top:.4g}, the value of uniform predictions over the vocabulary, after it "
                    f"had been {self.lowest[name]:.4g}")
        return ""

    def _stop(self, step: int, what: str) -> None:
        bad = os.path.join(self.out_dir, f"ckpt_{step:07d}.pt")
        note = ""
        if is_main() and os.path.exists(bad):   # written at the end of the step whose update diverged
            os.replace(bad, bad + ".diverged")
            note = f"{bad} holds these weights and was renamed {os.path.basename(bad)}.diverged; "
        good = [p for p in _checkpoints(self.out_dir) if p < bad]
        where = (f"the last good checkpoint is {good[-1]}: continue from it with --resume true and a lower --lr"
                 if good else f"there is no checkpoint from before it in {self.out_dir}: start again with a lower --lr")
        raise DivergenceError(f"training diverged after step {step}: {what}. Stopping without saving; {note}{where} "
                              f"(--divergence_check false turns this check off)")


# ----------------------------------------------------------------------------------------------------
# Training helpers: gradients over ranks, precision.

def allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks in one flat buffer. The stages that run several adapters through one
    base (reward model, PPO) use this instead of DDP, which expects one forward per backward."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for p in params:   # back into the gradients in place: at most one extra copy of them alive
        n = p.grad.numel()
        p.grad.copy_(flat[i:i + n].view_as(p.grad))
        i += n


def autocast(device: torch.device, dtype: torch.dtype | None = None):
    """bf16 autocast on GPU, and wherever the base weights are half precision (dtype: the base's):
    trainable tensors are fp32 masters (fp32_trainable) while the matmuls run at the base's precision.
    A no-op for an fp32 model on CPU."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fp32_trainable(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Keep every trainable tensor in fp32, in place: AdamW on bf16 weights loses most small updates
    (a bf16 weight near 1e-2 cannot move by 3e-7), so the optimizer steps fp32 masters and its state
    is fp32 too; the frozen base stays in its (bf16) dtype and the compute runs under autocast.
    Call before the optimizer is made. -> params."""
    with torch.no_grad():
        for p in params:
            if p.dtype != torch.float32:
                p.data = p.data.float()
    return params
