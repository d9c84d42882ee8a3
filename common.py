"""Code that every stage needs: command-line config, device/dtype/batch-geometry checks, distributed setup,
atomic files, the Checkpointer (exact resume, SIGTERM), metrics logging and a progress bar. Kept small on
purpose; each stage script stays a plain loop."""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import textwrap
import time
import tokenize
import typing
from dataclasses import MISSING, dataclass, fields, asdict
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


def _close_words(word: str, choices, n: int = 3) -> list[str]:
    """The choices `word` was probably meant to be (a typo, a prefix), best first: for did-you-mean hints."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    starts = sorted(c for c in choices if len(word) >= 3 and c.startswith(word[:3]) and c not in close)
    return (close + starts)[:n]


def _did_you_mean(word: str, choices) -> str:
    close = _close_words(word, choices)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _convert(name: str, raw: str, typ: Any) -> Any:
    """A command-line string as the field's type (bool, int, float, str or list of them), else ConfigError
    naming the key, what it expects, and what was probably meant."""
    if typ is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"--{name}: expected a boolean (true/false), got {raw!r}"
                          + _did_you_mean(low, ("true", "false")))
    if typ in (int, float):
        try:
            return typ(raw)
        except ValueError:
            what = "an integer" if typ is int else "a number"
            hint = ""
            with contextlib.suppress(ValueError, OverflowError):   # 1e3 or 8.0 for an integer
                if typ is int and float(raw).is_integer():
                    hint = f" (did you mean {int(float(raw))}?)"
            raise ConfigError(f"--{name}: expected {what}, got {raw!r}{hint}") from None
    if typ is str:
        return raw
    if typing.get_origin(typ) is list:
        return [_convert(name, x, typing.get_args(typ)[0]) for x in raw.split(",") if x != ""]
    raise ConfigError(f"--{name}: unsupported type {typ}")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is list:
        return f"list[{_type_name(typing.get_args(typ)[0])}]"
    return getattr(typ, "__name__", str(typ))


def _field_docs(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """({field: its comment}, {field: its group}) read from the source of `cls` and its dataclass bases:
    the comment beside a field (continued on comment-only lines indented past the fields, or starting with
    several spaces after the #), and the group named by the last comment line between fields (`# data`,
    `# --- judging`). The dataclass is the one place a key is documented."""
    names = {f.name for f in fields(cls)}
    notes: dict[str, str] = {}
    groups: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not hasattr(klass, "__dataclass_fields__"):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
            toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
        except (OSError, TypeError, tokenize.TokenError, SyntaxError):   # no source (built at run time)
            continue
        comments = {t.start[0]: (t.start[1], t.string) for t in toks if t.type == tokenize.COMMENT}
        in_string = {n for t in toks if t.type == tokenize.STRING for n in range(t.start[0] + 1, t.end[0] + 1)}
        body_indent, group, last = None, "", None
        for i, line in enumerate(src.splitlines(), 1):
            stripped, indent = line.strip(), len(line) - len(line.lstrip())
            m = re.match(r"(\w+)\s*:", stripped)
            if i in in_string:
                continue
            if m and m.group(1) in names and body_indent in (None, indent):
                body_indent, last = indent, m.group(1)
                groups[last] = group
                if i in comments:
                    notes[last] = comments[i][1][1:].strip()
            elif stripped.startswith("#") and i in comments:
                col, text = comments[i]
                if last and (col > (body_indent or 0) or text[1:].startswith("  ")):   # a comment continued
                    notes[last] = (notes.get(last, "") + " " + text[1:].strip()).strip()
                else:
                    group, last = text[1:].strip(" -#"), None
            elif stripped:
                last = None
    return notes, groups


def _default_text(f) -> str:
    if f.default is not MISSING:
        return f"= {f.default!r}"
    if f.default_factory is not MISSING:
        return f"= {f.default_factory()!r}"
    return "(required)"


def config_help(cls: type, presets: dict[str, dict] | None = None, prog: str = "") -> str:
    """--help: every key of the config class as `--key type = default    comment` (the comment beside the
    field in the source), in the config's groups, then the presets with what each sets."""
    notes, groups = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    prog = prog or "python " + os.path.basename(sys.argv[0])
    out = [f"usage: {prog} [--key value ...]   (--key value, --key=value, or --flag alone for a true boolean)",
           f"Keys of {cls.__name__}: `--key type = default    what it is`. A boolean also takes true/false",
           "(yes/no, 1/0), a list is comma-separated, and - or _ in a key is the same."]
    rows = {f.name: f"  --{f.name} {_type_name(hints[f.name])} {_default_text(f)}" for f in fields(cls)}
    col = min(44, max(map(len, rows.values()))) + 4     # comments in one column; a long default pushes its own out
    group = None
    for f in fields(cls):
        if groups.get(f.name, "") != group:
            group = groups.get(f.name, "")
            out += ["", f"{group}:" if group else ""]
        note = notes.get(f.name, "")
        out.append(f"{rows[f.name]:<{col - 4}}    {note}".rstrip() if note else rows[f.name])
    if presets:
        out += ["", "presets (--preset NAME sets these first; every flag given overrides them):"]
        w = max(len(p) for p in presets) + 4
        for name, sets in presets.items():
            text = " ".join(f"{k}={v!r}" for k, v in sets.items()) or "(nothing)"
            out += textwrap.wrap(text, width=max(60, 118 - w), initial_indent=f"  {name:<{w - 2}}",
                                 subsequent_indent=" " * w, break_on_hyphens=False) if text else []
    return "\n".join(x for i, x in enumerate(out) if x or (i + 1 < len(out) and out[i + 1]))


def _prog(argv: list[str]) -> str:
    """`python SCRIPT.py [COMMAND ...]` for the usage line: the words before `argv` on the real command line
    (reward_model.py eval, tinyworld.py pipeline) when argv is its tail."""
    real = sys.argv[1:]
    words = real[:len(real) - len(argv)] if argv and real[len(real) - len(argv):] == argv else []
    words = [w for w in words if not w.startswith("-")]
    return " ".join(["python", os.path.basename(sys.argv[0])] + words)


def parse_config(cls: type, argv: list[str] | None = None, presets: dict[str, dict] | None = None):
    """Build `cls` from `argv`: `--key value`, `--key=value`, or a bare `--flag` for a boolean that is true.
    `--preset NAME` (when presets are given) applies a named set of defaults first; every other key must
    be a field of `cls`, else ConfigError names it and the keys it was probably meant to be; a value of the
    wrong type names the key and the type. --help / -h prints config_help and exits 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(config_help(cls, presets, prog=_prog(argv)))
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
            typ = hints.get(key.replace("-", "_"))
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val = argv[i + 1]
                i += 1
            elif typ is bool:
                val = "true"  # a bare boolean flag
            else:
                want = f" ({_type_name(typ)})" if typ is not None else ""
                raise ConfigError(f"--{key} needs a value{want}")
        pairs.append((key.replace("-", "_"), val))
        i += 1
    values: dict[str, Any] = {}
    for key, val in sorted(pairs, key=lambda kv: kv[0] != "preset"):   # presets first: every flag overrides them
        if key == "preset":
            if not presets:
                raise ConfigError("this script has no presets")
            if val not in presets:
                raise ConfigError(f"unknown preset {val!r}; choose from {sorted(presets)}{_did_you_mean(val, presets)}")
            values.update(presets[val])
            if "preset" in names:
                values["preset"] = val
        elif key not in names:
            raise ConfigError(f"unknown config key --{key}{_did_you_mean(key, sorted(names))}")
        else:
            values[key] = _convert(key, val, hints[key])
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"preset sets unknown keys {sorted(unknown)}")
    return cls(**values)


def error_line(e: BaseException) -> str:
    """The one line a person sees for an expected error (a UserError or an OSError, which names its file)."""
    if isinstance(e, OSError) and not isinstance(e, UserError):
        return f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}"
    return f"error: {e}"


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's main() and exit with its return code when it gives one. An expected error prints one
    line and exits 2: a UserError (its message names the flag, file, record or tensor), or an OSError from
    the file system (a missing or unreadable path, a read-only or full disk: it names the file). Anything
    else is a bug: a full traceback."""
    try:
        code = main()
    except (UserError, OSError) as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(2)
    if isinstance(code, int) and not isinstance(code, bool):
        sys.exit(code)


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
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}, but torch sees no CUDA GPU (a CPU-only build, or no driver)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
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


CHECKPOINT_FORMAT = "llava-rlhf-checkpoint/2"   # 2: with a content checksum


def checkpoint_step(path: str) -> int | None:
    """The step in a checkpoint's name (ckpt_0000042.pt -> 42), None for any other file."""
    m = re.fullmatch(r"ckpt_(\d+)\.pt", os.path.basename(path))
    return int(m.group(1)) if m else None


def _checkpoints(out_dir: str) -> list[str]:
    """The checkpoints in out_dir, lowest step first (by the number, not the name). Files appear only
    complete (atomic rename); whether one is also intact is for load_checkpoint to say."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    found = [(checkpoint_step(f), f) for f in names]
    return [os.path.join(out_dir, f) for step, f in sorted((s, f) for s, f in found if s is not None)]


def latest_checkpoint(out_dir: str) -> str | None:
    """The checkpoint of the highest step in out_dir (None if there is none)."""
    paths = _checkpoints(out_dir)
    return paths[-1] if paths else None


def state_digest(x: Any) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes and every plain value, in
    the order they are stored (saving and loading keep it). A flipped bit anywhere in what a resume reads
    changes it; it does not depend on how torch.save lays the file out."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            if t.numel():   # a copy: .numpy() marks the storage it sees unresizable, and FSDP resizes its own
                h.update(t.reshape(-1).clone().view(torch.uint8).numpy())
        elif isinstance(v, dict):
            h.update(f"D{len(v)};".encode())
            for k, u in v.items():
                walk(k)
                walk(u)
        elif isinstance(v, (list, tuple)):
            h.update(f"{'L' if isinstance(v, list) else 'U'}{len(v)};".encode())
            for u in v:
                walk(u)
        else:   # str, int, float, bool, None: repr is exact for each
            h.update(f"V{type(v).__name__}:{v!r};".encode("utf-8", "surrogatepass"))

    walk(x)
    return h.hexdigest()


def load_checkpoint(path: str) -> dict:
    """A checkpoint, verified. It holds tensors and plain values only and is read with weights_only=True
    (resuming from a run folder someone else made must not run whatever code a pickle in it carries), and
    its content must match the checksum written with it. -> the state, without the format and checksum.
    CheckpointError names the file and what is wrong with it."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), "")
        raise CheckpointError(f"refused to load checkpoint {path}: it holds more than tensors and plain values "
                              f"(a pickled object: written by other code, or tampered with). {why}") from e
    except Exception as e:  # noqa: BLE001 - truncated, garbage, unreadable: name the file whatever went wrong
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or "checksum" not in ck:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint (format {got!r}: "
                              f"written by another program or an older version of this one)")
    stored = ck.pop("checksum")
    ck.pop("format")
    if (got := state_digest(ck)) != stored:
        raise CheckpointError(f"checkpoint {path} is corrupt: its content's checksum is {got[:16]}..., "
                              f"it was written with {stored[:16]}...")
    return ck


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


RESUME_MODES = ("false", "true", "auto")
# config keys that may change between a run and its resume without changing what it computes
_RUN_CONTROL = {"resume", "overwrite", "stop_at_step", "save_every", "keep_last", "log_every", "progress", "logger"}


def truncate_jsonl(path: str, step: int) -> int:
    """Keep the records of a JSON-lines log up to `step` (a resumed run re-runs the steps after it, and
    a kill may have torn the last line), so that a resumed run's log equals an uninterrupted run's.
    -> the number of lines dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:   # a line torn by a kill mid-write
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] <= step:
            keep.append(line if line.endswith(b"\n") else line + b"\n")
    if len(keep) != len(lines):
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.writelines(keep)
        atomic_file(path, write)
    return len(lines) - len(keep)


def resume_mode(resume: str | bool) -> str:
    """--resume as one of RESUME_MODES (a bool from an older config reads as "true" / "false")."""
    mode = str(resume).lower()
    if mode not in RESUME_MODES:
        raise ConfigError(f"--resume must be one of {', '.join(RESUME_MODES)}, got {resume!r}")
    return mode


def check_resume(out_dir: str, resume: str, overwrite: bool = False) -> list[str]:
    """--resume and --overwrite against the checkpoints out_dir holds (see Checkpointer): the stages call it
    before any model loads, the Checkpointer again when it starts. -> those checkpoints."""
    mode = resume_mode(resume)
    found = _checkpoints(out_dir)
    if mode == "false" and found and not overwrite:
        steps = [checkpoint_step(p) for p in found]
        raise CheckpointError(f"{out_dir} holds checkpoints of an earlier run ({len(found)}, steps {steps[0]}..{steps[-1]}); "
                              f"continue it with --resume true, or start over with --overwrite true (deletes them)")
    if mode == "true" and not found:
        raise CheckpointError(f"--resume true: no checkpoint in {out_dir} to resume from "
                              f"(--resume auto starts fresh when there is none)")
    return found


class Checkpointer:
    """Exact resume for a stage's loop. A checkpoint, out_dir/ckpt_{step:07d}.pt, holds everything that
    decides the rest of the run: the trainable weights of `model`, the optimizer, the sampler's position,
    every RNG (and `generator`, the rollout sampler of each rank), the recent values of `watch` (the
    run's Divergence), the step, the stage's extras, the config and a checksum of all of it. The last cfg.keep_last are kept (by step). SIGTERM/SIGINT only set a flag:
    the loop finishes its step, writes a checkpoint and returns, so a preempted job goes on with
    --resume true as if never stopped. FSDP-sharded weights and optimizer state are saved whole: the file
    is the one a single process writes.

    cfg.resume: "true" continues from the newest checkpoint that verifies (falling back past corrupt ones,
    which are set aside as .corrupt) and stops when there is none; "auto" does the same but starts fresh
    when there is none (a job script that is requeued); "false" starts fresh, and refuses to when out_dir
    holds checkpoints already, unless cfg.overwrite (then they and the logs are deleted first).

        ck = common.Checkpointer(cfg, model, opt, sampler)   # cfg: out_dir, keep_last, save_every, stop_at_step, resume, overwrite
        if state := ck.start():                              # None: a fresh start
            step = state["step"]                             # and the extras given to save
        while step < total_steps:
            ...; step += 1
            if ck.after_step(step, **extras):                # saved; a signal or stop_at_step: return now
                return ...
        ck.finish(step, **extras)
    """

    LOGS = ("metrics.jsonl", "samples.jsonl")   # cut back to the resumed step

    def __init__(self, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler,
                 generator: torch.Generator | None = None, watch: "Divergence | None" = None):
        self.out_dir, self.keep_last = cfg.out_dir, cfg.keep_last
        self.save_every, self.stop_at_step = cfg.save_every, cfg.stop_at_step
        self.resume_mode = resume_mode(getattr(cfg, "resume", "false"))
        self.overwrite = bool(getattr(cfg, "overwrite", False))
        self.config = asdict(cfg)
        self.model, self.optimizer, self.sampler, self.generator = model, optimizer, sampler, generator
        self.watch = watch
        if is_main():
            for p in sweep_stale_temps(self.out_dir):
                print(f"removed {p}: the temporary file of a checkpoint write that was killed")
        self.stop = StopSignal()

    def start(self) -> dict | None:
        """Begin the run as cfg.resume says (see the class). -> the resumed state, None for a fresh start."""
        found = check_resume(self.out_dir, self.resume_mode, self.overwrite)
        if self.resume_mode == "false":
            self._clear(found)
            return None
        state = self.resume()
        if state is None:
            if is_main():
                print(f"--resume auto: no checkpoint in {self.out_dir}; starting fresh")
            self._clear([])
        return state

    def _clear(self, found: list[str]) -> None:
        """A fresh start: no checkpoint or log line of an earlier run may mix with this one's."""
        if is_main():
            for p in found:
                os.remove(p)
            for name in self.LOGS:
                if os.path.exists(log := os.path.join(self.out_dir, name)):
                    os.remove(log)
                    print(f"removed {log}: the log of an earlier run")
            if found:
                print(f"--overwrite: deleted {len(found)} checkpoints of an earlier run in {self.out_dir}")
        if dist.is_initialized():
            dist.barrier()

    def resume(self) -> dict | None:
        """Load the newest checkpoint of out_dir that verifies into the model, optimizer, sampler and RNGs;
        a newer one that does not (truncated, corrupt) is renamed NAME.corrupt, saying why.
        -> {"step": ..., and the extras given to save}, or None when out_dir has no checkpoint.
        CheckpointError when there are checkpoints but none verifies, or one does not fit this model."""
        found, bad, ck, path = _checkpoints(self.out_dir), [], None, None
        if not found:
            return None
        for path in reversed(found):
            try:
                ck = load_checkpoint(path)
                break
            except CheckpointError as e:
                bad.append((path, e))
        if ck is None:
            raise CheckpointError(f"none of the {len(found)} checkpoints in {self.out_dir} can be used: "
                                  + "; ".join(str(e) for _, e in bad))
        if dist.is_initialized():
            dist.barrier()   # every rank has read its checkpoint before rank 0 renames any
        for p, e in bad:
            if is_main():
                print(f"warning: {e}\n  set aside as {p}.corrupt; resuming from {os.path.basename(path)} instead",
                      file=sys.stderr)
                os.replace(p, p + ".corrupt")
        try:
            load_trainable_state(self.model, ck.pop("model"), path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        _load_optimizer(self.optimizer, ck.pop("optimizer"))
        self.sampler.load_state_dict(ck.pop("sampler"))
        _set_rng_state(ck.pop("rng"))
        gens = ck.pop("gen", None)
        if self.generator is not None:
            rank = dist.get_rank() if dist.is_initialized() else 0
            self.generator.set_state(gens[rank])
        if self.watch is not None:
            self.watch.load_state_dict(ck.pop("divergence"))
        saved = ck.pop("config")
        changed = {k: (saved.get(k), v) for k, v in self.config.items()
                   if k not in _RUN_CONTROL and k in saved and saved[k] != v}
        if is_main():
            print(f"resumed from {path} at step {ck['step']}")
            if changed:
                print("  note: these settings differ from the checkpoint's run: "
                      + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
            for name in self.LOGS:
                if (n := truncate_jsonl(os.path.join(self.out_dir, name), ck["step"])):
                    print(f"  {name}: dropped {n} lines after step {ck['step']} (they are re-run)")
        return ck

    def save(self, step: int, **extras) -> str:
        """Write the checkpoint of `step` with its checksum. Every rank calls it (sharded state is
        gathered, each rank's generator collected); rank 0 writes, the others wait for it. Older
        checkpoints beyond keep_last are then removed, by step. -> the file's path."""
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
        if self.watch is not None:
            state["divergence"] = self.watch.state_dict()
        path = os.path.join(self.out_dir, f"ckpt_{step:07d}.pt")
        if keep:
            state = {"format": CHECKPOINT_FORMAT, **state, "checksum": state_digest(state)}
            atomic_file(path, lambda tmp: torch.save(state, tmp))
            if self.keep_last > 0:   # a checkpoint of a later step (set aside, or of a run resumed earlier) is not counted
                older = [p for p in _checkpoints(self.out_dir) if checkpoint_step(p) <= step]
                for old in older[:-self.keep_last]:
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
        """The last checkpoint of a run that reached its end. A SIGTERM/SIGINT while it is written only sets
        the flag (the checkpoint completes); afterwards they act as usual again."""
        path = self.save(step, **extras)
        self.stop.restore()
        if self.stop.requested and is_main():
            print(f"a stop signal came during the final checkpoint; {path} is complete")
        return path


# ----------------------------------------------------------------------------------------------------
# Logging: JSON lines on rank 0, optional wandb/tensorboard, and a progress bar without dependencies.

def _json_number(v: Any) -> Any:
    """A metric as JSON takes it: numbers as floats, and an undefined one (NaN, inf: e.g. the explained
    variance of constant returns) as null, since NaN is not JSON and would break every reader."""
    if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool):
        return float(v) if math.isfinite(v) else None
    return v


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
        rec = {"step": step, **{k: _json_number(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)


def _clock_text(seconds: float) -> str:
    """1:05, 12:40, 3:02:09."""
    s = int(max(0.0, seconds) + 0.5)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class Progress:
    """A progress line on rank 0 (stderr): count, percent, rate, elapsed time, ETA and free-form stats.
    In a terminal one line is redrawn in place (at most every REDRAW_S). In a pipe or a file, where each
    redraw would be a line of its own, a line is written when both LOG_EVERY_S seconds and LOG_EVERY_FRAC
    of the total have passed since the last one (or HEARTBEAT_S whatever the progress, so that a slow run
    still shows it is alive), and always the last one: a log holds about 20 lines per bar, not one per step.
    `stream` (default: sys.stderr at each write) and `clock` are for tests."""

    REDRAW_S, LOG_EVERY_S, LOG_EVERY_FRAC, HEARTBEAT_S = 0.1, 10.0, 0.05, 300.0

    def __init__(self, total: int, desc: str = "", start: int = 0, enabled: bool = True, stream=None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.n, self.start = total, desc, start, start
        self.enabled = enabled and is_main()
        self.stream, self.clock = stream, clock
        self.t0 = clock()
        self.stats: dict = {}
        self._shown_n, self._shown_t = start, self.t0     # what the last line written showed, and when
        self._open = False      # a terminal line drawn without its newline yet
        self._done = False      # the last line written

    def _out(self):
        return self.stream if self.stream is not None else sys.stderr

    def _tty(self) -> bool:
        try:
            return bool(self._out().isatty())
        except (AttributeError, ValueError):   # a closed or minimal stream: treat it as a file
            return False

    def line(self, now: float) -> str:
        """The text of the progress line at time `now` (no \\r, no newline)."""
        frac = min(1.0, self.n / max(1, self.total))
        elapsed = now - self.t0
        done = self.n - self.start
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        if rate == 0:
            speed, eta = "? it/s", "?"
        else:
            speed = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it"
            eta = _clock_text(max(0, self.total - self.n) / rate)
        stats = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.stats.items())
        return (f"{self.desc} [{'#' * int(20 * frac):<20}] {self.n}/{self.total} {100 * frac:3.0f}% {speed}, "
                f"{_clock_text(elapsed)} elapsed, eta {eta}" + (f"  {stats}" if stats else ""))

    def _write(self, now: float, final: bool) -> None:
        out = self._out()
        if self._tty():
            out.write("\r" + self.line(now) + "\x1b[K" + ("\n" if final else ""))
            self._open = not final
        else:
            out.write(self.line(now) + "\n")
        out.flush()
        self._shown_n, self._shown_t, self._done = self.n, now, final

    def update(self, n: int = 1, **stats) -> None:
        self.n += n
        self.stats = stats
        if not self.enabled or self._done:
            return
        now = self.clock()
        final = self.n >= self.total
        since = now - self._shown_t
        if self._tty():
            due = since >= self.REDRAW_S or self._shown_n == self.start   # the first update at once
        else:
            moved = (self.n - self._shown_n) / max(1, self.total) >= self.LOG_EVERY_FRAC
            due = (since >= self.LOG_EVERY_S and moved) or since >= self.HEARTBEAT_S
        if final or due:
            self._write(now, final)

    def close(self) -> None:
        """The last line, when the loop ended before the total (a stop at a step, an early exit) or its
        last update was not shown."""
        if self.enabled and not self._done and (self.n != self._shown_n or self._open):
            self._write(self.clock(), final=True)
        self._done = True


def constant_lr(step: int, warmup: int, base_lr: float) -> float:
    """transformers' constant schedule with warm-up (the official RM's): factor step / warmup while
    step < warmup (0 at the first step), then 1."""
    return base_lr * step / warmup if step < warmup else base_lr


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
      dead        grad_norm exactly 0 after it was not: no trainable tensor gets a gradient any more;
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

    def state_dict(self) -> dict:
        """The recent values, saved in each checkpoint: a resumed run judges its next steps as the
        uninterrupted run does."""
        return {"history": {k: list(v) for k, v in self.history.items()}, "lowest": dict(self.lowest)}

    def load_state_dict(self, sd: dict) -> None:
        self.history = {k: list(v) for k, v in sd["history"].items()}
        self.lowest = dict(sd["lowest"])

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
        recent = self.history.get(name, [])
        if name == "grad_norm":   # 0 from the start is a run with nothing to learn yet (all rewards 0), not a death
            dead = value == 0 and any(v > 0 for v in recent)
            return "is exactly 0 after it was not: no trainable tensor gets a gradient any more (a dead run)" if dead else ""
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
        good = [p for p in _checkpoints(self.out_dir) if checkpoint_step(p) < step]
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


# ----------------------------------------------------------------------------------------------------
# Config validation: every flag checked before anything loads, so that a mistake costs seconds, not a
# model load, and is one line naming the flag and the value given.

def _bad(name: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"--{name} must be {want}, got {value!r}")


def _check_out(name: str, path: str, folder: bool) -> None:
    """`path` (a folder to write in, or a file to write) can be written: an existing one is of the right
    kind and writable, a missing one has a writable nearest existing parent folder to be made in."""
    if folder and os.path.isfile(path):
        raise ConfigError(f"--{name} {path}: is a file, not a folder")
    if not folder and os.path.isdir(path):
        raise ConfigError(f"--{name} {path}: is a folder, not a file")
    if os.path.exists(path):
        if not os.access(path if folder else os.path.dirname(os.path.abspath(path)), os.W_OK | os.X_OK):
            raise ConfigError(f"--{name} {path}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--{name} {path}: cannot be created, {parent} is not a writable folder")


def check_config(cfg, required: tuple[str, ...] = (), positive: tuple[str, ...] = (), nonneg: tuple[str, ...] = (),
                 fractions: tuple[str, ...] = (), choices: dict[str, tuple] | None = None,
                 files: tuple[str, ...] = (), dirs: tuple[str, ...] = (), out_dirs: tuple[str, ...] = (),
                 out_files: tuple[str, ...] = (), device: str = "") -> None:
    """ConfigError naming the first bad flag of `cfg` (a config dataclass) and its value. Every float
    field must be finite; then, by field name: required (a non-empty string), positive (an int >= 1, a
    float > 0), nonneg (>= 0), fractions (in [0, 1]), choices ({field: allowed values}), files / dirs
    (an existing file / folder, when given: empty means not given), out_dirs / out_files (writable, see
    _check_out; when given) and device (a device torch has, common.resolve_device)."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise _bad(f.name, v, "a finite number")
    for name in required:
        if not getattr(cfg, name):
            raise ConfigError(f"--{name} is required")
    for name in positive:
        v = getattr(cfg, name)
        if not v > 0:
            raise _bad(name, v, ">= 1" if isinstance(v, int) else "> 0")
    for name in nonneg:
        if not getattr(cfg, name) >= 0:
            raise _bad(name, getattr(cfg, name), ">= 0")
    for name in fractions:
        if not 0 <= getattr(cfg, name) <= 1:
            raise _bad(name, getattr(cfg, name), "between 0 and 1")
    for name, allowed in (choices or {}).items():
        if getattr(cfg, name) not in allowed:
            raise _bad(name, getattr(cfg, name), "one of " + ", ".join(repr(a) for a in allowed))
    for name in files:
        v = getattr(cfg, name)
        if v and not os.path.isfile(v):
            raise ConfigError(f"--{name} {v}: " + ("is a folder, not a file" if os.path.isdir(v) else "no such file"))
    for name in dirs:
        v = getattr(cfg, name)
        if v and not os.path.isdir(v):
            raise ConfigError(f"--{name} {v}: " + ("is a file, not a folder" if os.path.isfile(v) else "no such folder"))
    for name in out_dirs:
        if getattr(cfg, name):
            _check_out(name, getattr(cfg, name), folder=True)
    for name in out_files:
        if getattr(cfg, name):
            _check_out(name, getattr(cfg, name), folder=False)
    if device:
        resolve_device(getattr(cfg, device))
    if hasattr(cfg, "resume") and hasattr(cfg, "out_dir"):   # a run that checkpoints: refused now, not after a load
        check_resume(cfg.out_dir, cfg.resume, getattr(cfg, "overwrite", False))


def check_tokenizer(cfg) -> None:
    """--tokenizer, else --model_path (where the stages read it by default): a sentencepiece file, or a
    folder holding tokenizer.model."""
    path, name = (cfg.tokenizer, "tokenizer") if cfg.tokenizer else (cfg.model_path, "model_path")
    if not path:
        raise ConfigError("--tokenizer is required (a tokenizer.model, or a folder holding one)")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "tokenizer.model")):
            raise ConfigError(f"--{name} {path}: no tokenizer.model in the folder"
                              + (" (give --tokenizer)" if name == "model_path" else ""))
    elif not os.path.isfile(path):
        raise ConfigError(f"--{name} {path}: no such file or folder")
