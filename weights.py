"""How models and adapters are laid out on disk: every layout we read or write, in one place.

A layout is a config.json reader (-> ModelConfig fields) and one key-mapping table, read in both
directions: loading renames each file key to ours, saving renames ours to the layout's.

    llava       transformers' LlavaForConditionalGeneration (save_pretrained writes it; 4.x and 5.x names)
    llava_orig  the original LLaVA repo and LLaVA-RLHF: LlamaForCausalLM keys plus model.mm_projector.*
    llama       a bare LLaMA / Vicuna folder (LlamaForCausalLM)
    clip        a CLIPModel or CLIPVisionModel folder (the vision tower)
    peft        a LoRA adapter folder: adapter_config.json + adapter_model.safetensors

Models are built on the meta device and each tensor is assigned as it is read, one shard at a time:
a 13B checkpoint never sits in memory twice. This file knows nothing of the model's code (model.py
imports it): it sees an nn.Module with named parameters and a config dataclass.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, fields, replace
from typing import Iterator

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from common import UserError, atomic_file


class ModelError(UserError):
    """A model or adapter folder that cannot be used; the message names the folder/file and the tensor."""


def has_values(t: torch.Tensor) -> bool:
    """False for a tensor without data: a fake tensor (rehearse.py runs the stages at full size under
    FakeTensorMode) or a meta one. The few checks that read a tensor's values skip themselves then."""
    return not (t.is_meta or isinstance(t, FakeTensor))


def check_finite(t: torch.Tensor, where: str) -> None:
    """ModelError unless every value of a floating tensor is finite. `where`: "FILE: tensor 'KEY'".
    One pass over the tensor; the counts are taken only when something is wrong."""
    if not (t.is_floating_point() and has_values(t)) or bool(torch.isfinite(t).all()):
        return
    raise ModelError(f"{where} holds {int(torch.isnan(t).sum())} NaN / {int(torch.isinf(t).sum())} inf values")

# ----------------------------------------------------------------------------------------------------
# Key-mapping tables: rows (our prefix, the layout's prefix)
#
# Loading renames a file key by the row with the longest matching layout prefix; `None` as ours marks
# tensors we do not keep. Saving renames our key by the row with the longest matching prefix of ours,
# the first such row: the layout's canonical name. A key no row matches is not in that layout.

Table = tuple[tuple[str | None, str], ...]

LLAMA: Table = (
    ("llm.", "model."),
    ("lm_head.", "lm_head."),
)

LLAVA: Table = (
    # the 4.x names come first: transformers 4.x reads only them, 5.x converts them on load
    ("llm.", "language_model.model."), ("llm.", "model.language_model."),
    ("lm_head.", "language_model.lm_head."), ("lm_head.", "lm_head."),
    ("vision.", "vision_tower.vision_model."), ("vision.", "model.vision_tower.vision_model."),
    ("vision.", "vision_tower."), ("vision.", "model.vision_tower."),
    ("projector.", "multi_modal_projector."), ("projector.", "model.multi_modal_projector."),
)

# Llava's projector is always two linears. Our one-linear projector is stored as linear_1 = W with
# linear_2 = identity and activation "linear" (exact in fp32 and bf16); loading skips the identity.
LLAVA_LINEAR_PROJECTOR: Table = (
    ("projector.linear.", "multi_modal_projector.linear_1."),
    ("projector.linear.", "model.multi_modal_projector.linear_1."),
    (None, "multi_modal_projector.linear_2."), (None, "model.multi_modal_projector.linear_2."),
) + LLAVA

LLAVA_ORIG: Table = LLAMA + (
    ("projector.linear.", "model.mm_projector."),       # mm_projector_type "linear": one nn.Linear
    ("projector.linear_1.", "model.mm_projector.0."),   # "mlp2x_gelu": Sequential(Linear, GELU, Linear)
    ("projector.linear_2.", "model.mm_projector.2."),
    # LLaVA-RLHF checkpoints sometimes keep the (frozen) tower: CLIPVisionTower wraps CLIPVisionModel
    ("vision.", "model.vision_tower.vision_tower.vision_model."),
    ("vision.", "model.vision_tower.vision_model."),
    (None, "model.vision_tower."),
)

CLIP: Table = (
    ("vision.", "vision_model."),
    ("vision.", ""),                                    # a bare CLIPVisionTransformer's keys
    (None, "text_model."), (None, "text_projection"), (None, "visual_projection"), (None, "logit_scale"),
)

TABLES: dict[str, Table] = {"llava": LLAVA, "llava_orig": LLAVA_ORIG, "llama": LLAMA, "clip": CLIP}


def table(layout: str, projector: str = "mlp2x_gelu") -> Table:
    if layout == "llava" and projector == "linear":
        return LLAVA_LINEAR_PROJECTOR
    return TABLES[layout]


def our_key(key: str, rows: Table) -> str | None:
    """A file key -> our name; None: not a tensor of ours."""
    hits = [(ours, theirs) for ours, theirs in rows if key.startswith(theirs)]
    if not hits:
        return None
    ours, theirs = max(hits, key=lambda r: len(r[1]))
    return None if ours is None else ours + key[len(theirs):]


def layout_key(key: str, rows: Table) -> str | None:
    """Our name -> the layout's key; None: the layout does not hold it."""
    hits = [(ours, theirs) for ours, theirs in rows if ours is not None and key.startswith(ours)]
    if not hits:
        return None
    ours, theirs = max(hits, key=lambda r: len(r[0]))   # max keeps the first of equal lengths
    return theirs + key[len(ours):]


def to_layout(sd: dict[str, torch.Tensor], rows: Table) -> dict[str, torch.Tensor]:
    """Our state dict -> the layout's, dropping what the layout does not hold."""
    return {k2: v for k, v in sd.items() if (k2 := layout_key(k, rows)) is not None}


def from_layout(sd: dict[str, torch.Tensor], rows: Table) -> dict[str, torch.Tensor]:
    return {k2: v for k, v in sd.items() if (k2 := our_key(k, rows)) is not None}


# ----------------------------------------------------------------------------------------------------
# config.json of each layout -> ModelConfig fields

def read_json(path: str) -> dict:
    """A JSON object from a model or adapter folder (config.json, an index), else ModelError naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def clip_fields(vc: dict) -> dict:
    """transformers' CLIPVisionConfig dict -> ModelConfig's vision fields."""
    return dict(image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 32),
                vision_hidden=vc.get("hidden_size", 768), vision_layers=vc.get("num_hidden_layers", 12),
                vision_heads=vc.get("num_attention_heads", 12), vision_intermediate=vc.get("intermediate_size", 3072),
                vision_eps=vc.get("layer_norm_eps", 1e-5))


def llama_fields(tc: dict) -> dict:
    """transformers' LlamaConfig dict -> ModelConfig's language-model fields."""
    heads = tc.get("num_attention_heads", 32)
    rope = tc.get("rope_theta") or (tc.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return dict(hidden=tc.get("hidden_size", 4096), layers=tc.get("num_hidden_layers", 32), heads=heads,
                kv_heads=tc.get("num_key_value_heads") or heads, intermediate=tc.get("intermediate_size", 11008),
                vocab_size=tc.get("vocab_size", 32000), rms_eps=tc.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope), max_seq_len=tc.get("max_position_embeddings", 2048))


def clip_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise ModelError(f"vision tower folder {path} does not exist")
    c = read_json(os.path.join(path, "config.json"))
    if c.get("model_type") == "clip":
        if not isinstance(c.get("vision_config"), dict):
            raise ModelError(f"{path}/config.json: a CLIPModel config without a vision_config")
        c = c["vision_config"]
    elif c.get("model_type") not in ("clip_vision_model", None):
        raise ModelError(f"{path}: expected a CLIP model folder, config.json has model_type {c.get('model_type')!r}")
    return c


def config_from_folder(path: str, config_cls: type, vision_tower: str | None = None, **overrides):
    """-> (config_cls instance, layout, folder to take the vision tower from or None)."""
    if not os.path.isdir(path):
        raise ModelError(f"model folder {path} does not exist")
    c = read_json(os.path.join(path, "config.json"))
    try:
        cfg, layout, vt_path = _parse_config(c, path, config_cls, vision_tower)
    except UserError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        # a field of the wrong type or value, or sizes that do not fit together (ModelConfig's checks)
        raise ModelError(f"{path}/config.json: {type(e).__name__}: {e}") from None
    return replace(cfg, **overrides), layout, vt_path


def _parse_config(c: dict, path: str, config_cls: type, vision_tower: str | None):
    mt = c.get("model_type")
    vt_path = None
    if "llava_rlhf_config" in c:   # written by save_llava: every field exactly
        names = {f.name for f in fields(config_cls)}
        cfg = config_cls(**{k: v for k, v in c["llava_rlhf_config"].items() if k in names})
        layout = "llava"
    elif mt == "llava" and "text_config" in c and "vision_config" in c:
        act = c.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise ModelError(f"{path}: projector_hidden_act {act!r} is not supported (LLaVA uses gelu)")
        cfg = config_cls(**clip_fields(c["vision_config"]), **llama_fields(c["text_config"]),
                         projector="mlp2x_gelu", vision_feature_layer=c.get("vision_feature_layer", -2),
                         vision_keep_cls=c.get("vision_feature_select_strategy", "default") == "full",
                         image_token_index=c.get("image_token_index"))
        layout = "llava"
    elif mt in ("llava_llama", "llava") or "mm_vision_tower" in c:
        # the original LLaVA repo: a LLaMA config plus mm_* fields; vision weights usually not saved
        vt = vision_tower or c.get("mm_vision_tower")
        if vt is None:
            raise ModelError(f"{path}: original-LLaVA config names no mm_vision_tower; pass vision_tower=<local CLIP folder>")
        if not os.path.isdir(vt):
            raise ModelError(f"{path}: the vision tower {vt!r} is not a local folder; pass "
                             f"vision_tower=<local CLIP folder> (nothing is downloaded)")
        ptype = c.get("mm_projector_type", "linear")
        if ptype not in ("linear", "mlp2x_gelu"):
            raise ModelError(f"{path}: mm_projector_type {ptype!r} is not supported")
        cfg = config_cls(**clip_fields(clip_config(vt)), **llama_fields(c), projector=ptype,
                         vision_feature_layer=c.get("mm_vision_select_layer", -2),
                         vision_keep_cls=c.get("mm_vision_select_feature", "patch") == "cls_patch")
        layout, vt_path = "llava_orig", vt
    elif mt == "llama":
        if vision_tower is None:   # a text-only LLaMA: no tower, no projector
            cfg = config_cls(**llama_fields(c), text_only=True)
            layout = "llama"
        else:                      # the start of pretraining: LLaMA + CLIP + a fresh projector
            cfg = config_cls(**clip_fields(clip_config(vision_tower)), **llama_fields(c))
            layout, vt_path = "llama", vision_tower
    else:
        raise ModelError(f"{path}: unsupported model_type {mt!r} (expected llava, llava_llama or llama)")
    if vision_tower is not None and layout == "llava":
        vt_path = vision_tower  # replace the saved tower with the named one
    return cfg, layout, vt_path


def llava_config_json(cfg, image_token_index: int, vocab_size: int, dtype: torch.dtype) -> dict:
    """transformers' LlavaConfig for our config, plus our own fields so that loading restores each one."""
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": image_token_index, "image_seq_length": cfg.num_image_tokens,
        "projector_hidden_act": "linear" if cfg.projector == "linear" else "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": "full" if cfg.vision_keep_cls else "default",
        "tie_word_embeddings": False,
        "dtype": str(dtype).replace("torch.", ""),
        "text_config": {
            "model_type": "llama", "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
            "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.kv_heads, "vocab_size": vocab_size, "rms_norm_eps": cfg.rms_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
            "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu", "head_dim": cfg.head_dim,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": cfg.vision_hidden,
            "intermediate_size": cfg.vision_intermediate, "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_heads, "image_size": cfg.image_size,
            "patch_size": cfg.patch_size, "hidden_act": "quick_gelu", "layer_norm_eps": cfg.vision_eps,
            "num_channels": 3, "projection_dim": cfg.vision_hidden,
        },
        "llava_rlhf_config": {**asdict(cfg), "image_token_index": image_token_index},
    }


# ----------------------------------------------------------------------------------------------------
# Weight files: safetensors (sharded with an index, or one file) or torch .bin

def weight_files(path: str, prefer=("model.safetensors", "pytorch_model.bin")) -> list[str]:
    if not os.path.isdir(path):
        raise ModelError(f"model folder {path} does not exist")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        ip = os.path.join(path, index)
        if os.path.exists(ip):
            wmap = read_json(ip).get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise ModelError(f"{ip}: no weight_map (the index of the weight shards)")
            files = [os.path.join(path, f) for f in sorted(set(map(str, wmap.values())))]
            for f in files:
                if not os.path.exists(f):
                    raise ModelError(f"{f} not found (a shard named in {ip})")
            return files
    for name in prefer:
        if os.path.exists(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise ModelError(f"{path}: no weights found (looked for {', '.join(prefer)} and their .index.json)")


def iter_tensors(file: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from one weight file, one tensor at a time, naming the file on any error."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            f = safe_open(file, framework="pt")
            keys = list(f.keys())
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot read {file} (truncated or corrupt safetensors file?): {e}") from None
        for k in keys:
            try:
                t = f.get_tensor(k)
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"cannot read tensor {k!r} from {file}: {e}") from None
            yield k, t
    else:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot read {file} (truncated or not a weights file?): {e}") from None
        if not isinstance(sd, dict):
            raise ModelError(f"{file}: expected a dict of tensors, got {type(sd).__name__}")
        for k, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise ModelError(f"{file}: entry {k!r} is a {type(t).__name__}, not a tensor")
            yield k, t


def _write_json(path: str, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_file(path, write)


def save_safetensors(sd: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> None:
    """model.safetensors, or shards of at most max_shard_bytes with model.safetensors.index.json."""
    from safetensors.torch import save_file
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, sh in zip(names, shards):
        atomic_file(os.path.join(out_dir, name), lambda p, sh=sh: save_file(sh, p, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": {k: name for name, sh in zip(names, shards) for k in sh}}
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)


# ----------------------------------------------------------------------------------------------------
# Loading into a model built on the meta device, and saving in transformers' Llava layout

def _set_tensor(m: nn.Module, key: str, t: torch.Tensor) -> None:
    mod_path, name = key.rsplit(".", 1)
    mod = m.get_submodule(mod_path)
    if name in mod._parameters:
        old = mod._parameters[name]
        mod._parameters[name] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        mod._buffers[name] = t


def load_folder_into(m: nn.Module, path: str, layout: str, dtype: torch.dtype | None, device,
                     skip_prefixes: tuple[str, ...] = ()) -> torch.dtype | None:
    """Assign every tensor of a checkpoint folder into `m` (built on meta), checking names, shapes and
    that every value is finite. -> the dtype the model now has: `dtype`, or the checkpoint's when None."""
    params = dict(m.named_parameters())
    cfg = m.config
    rows = table(layout, cfg.projector)
    seen = set()
    for file in weight_files(path):
        for k, t in iter_tensors(file):
            ours = our_key(k, rows)
            if ours is None or ours.startswith(skip_prefixes):
                continue
            if ours not in params:
                raise ModelError(f"{file}: unexpected tensor {k!r} (shape {tuple(t.shape)}) has no place in the model")
            want = params[ours]
            shape = tuple(t.shape)
            if (ours in ("llm.embed_tokens.weight", "lm_head.weight") and shape[0] > want.shape[0]
                    and cfg.image_token_index is not None and cfg.image_token_index == shape[0] - 1):
                t, shape = t[:want.shape[0]], tuple(want.shape)   # the image rows added by save_llava
            if shape != tuple(want.shape):
                raise ModelError(f"{file}: tensor {k!r} has shape {shape}, the model expects {tuple(want.shape)} "
                                 f"for {ours}")
            if not t.is_floating_point():
                raise ModelError(f"{file}: tensor {k!r} has dtype {t.dtype}; expected a floating-point tensor")
            if dtype is None:
                dtype = t.dtype  # one dtype for the whole model: the checkpoint's, unless asked otherwise
            # checked where it lands (on a GPU: a GPU pass): a NaN weight would only show as NaN losses
            stored, t = t.dtype, t.to(device=device, dtype=dtype)
            check_finite(t, f"{file}: tensor {k!r}" + (f" (as {dtype}, stored as {stored})" if dtype != stored else ""))
            _set_tensor(m, ours, t)
            seen.add(ours)
    if not seen:
        raise ModelError(f"{path}: no tensors matched the {layout} layout")
    return dtype


def init_fresh(m: nn.Module, prefix: str, dtype: torch.dtype | None, device) -> None:
    """Materialise the parameters under `prefix` that no checkpoint provided (a new projector) with
    nn.Linear's init."""
    names = sorted(k for k, v in m.named_parameters() if v.is_meta and k.startswith(prefix))
    ref = next((p for p in m.parameters() if not p.is_meta), None)
    dt = dtype or (ref.dtype if ref is not None else torch.float32)
    for n in names:
        mod_path, pname = n.rsplit(".", 1)
        mod = m.get_submodule(mod_path)
        mod._parameters[pname] = nn.Parameter(torch.empty(mod._parameters[pname].shape, device=device, dtype=dt))
    for n in {x.rsplit(".", 1)[0] for x in names}:
        mod = m.get_submodule(n)
        if isinstance(mod, nn.Linear):
            mod.reset_parameters()


def save_llava(cfg, sd: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> None:
    """Our base weights (no LoRA) -> transformers' Llava layout: config.json + safetensors shards."""
    if cfg.text_only:
        raise ValueError("a text-only LLaMA has no Llava layout; its weights are the LLaMA folder it came from")
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items() if ".lora_" not in k}
    dtype = next(iter(sd.values())).dtype
    out = to_layout(sd, table("llava", cfg.projector))
    if cfg.projector == "linear":
        w = out["multi_modal_projector.linear_1.weight"]
        out["multi_modal_projector.linear_2.weight"] = torch.eye(cfg.hidden, dtype=w.dtype)
        out["multi_modal_projector.linear_2.bias"] = torch.zeros(cfg.hidden, dtype=w.dtype)
    img_id = cfg.vocab_size if cfg.image_token_index is None else cfg.image_token_index
    vocab = cfg.vocab_size
    if img_id >= vocab:
        # transformers looks the image id up in the vocabulary: give it (unused, zero) rows up to it
        extra = img_id + 1 - vocab
        vocab += extra
        for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            out[k] = torch.cat([out[k], torch.zeros(extra, cfg.hidden, dtype=out[k].dtype)])
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(out, out_dir, max_shard_bytes)
    _write_json(os.path.join(out_dir, "config.json"), llava_config_json(cfg, img_id, vocab, dtype))


# ----------------------------------------------------------------------------------------------------
# LoRA adapters in peft's layout

# peft names a LoRA weight after the module it wraps in the base model: "base_model.model." + the
# module's name there + ".lora_A.weight" (".lora_A.<adapter name>.weight" in some versions). The
# language model's layers sit at a different name in each base a user loads an adapter onto:
PEFT_PREFIX = "base_model.model."
PEFT_LLM: dict[str, str] = {
    "llava": "model.language_model.",   # transformers' LlavaForConditionalGeneration (4.52+ and 5.x)
    "llava_orig": "model.",             # the original LLaVA's LlavaLlamaForCausalLM, and LlamaForCausalLM
    "llama": "model.",
}
# reading also takes the 4.x Llava name; a key under any other prefix is not our language model's
_PEFT_LLM_READ = ("model.language_model.", "language_model.model.", "model.")
_PEFT_KEY = re.compile(r"^(.*?)layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")

# adapter_config.json settings whose adapter computes something LoRALinear does not: (field, is it set?,
# what it does). Each is refused by name rather than loaded as a plain LoRA with different numbers.
_REFUSED: tuple[tuple[str, object, str], ...] = (
    ("use_dora", bool, "DoRA rescales each weight column by a learned magnitude"),
    ("bias", lambda v: v not in (None, "none"), "the adapter trains biases of the base model"),
    ("lora_bias", bool, "lora_B carries a bias"),
    ("modules_to_save", bool, "whole modules of the base are replaced by trained copies"),
    ("fan_in_fan_out", bool, "the weights are stored transposed (GPT-2 Conv1D layers)"),
    ("trainable_token_indices", bool, "embedding rows are trained"),
    ("target_parameters", bool, "LoRA on bare parameters"),
    ("layer_replication", bool, "the base's layers are duplicated"),
    ("use_qalora", bool, "QALoRA pools the input before lora_A"),
    ("alora_invocation_tokens", bool, "aLoRA activates only after its invocation tokens"),
    ("arrow_config", bool, "Arrow routes between adapters"),
    ("use_bdlora", bool, "block-diagonal LoRA"),
    ("velora_config", bool, "VeLoRA compresses activations"),
    ("monteclora_config", bool, "MonteCLoRA samples its weights"),
    ("kasa_config", bool, "KaSA adds singular values"),
    ("init_lora_weights", lambda v: v == "mica", "MiCA is a LoRA variant"),
)


def peft_module(path: str, layout: str) -> str:
    """Our module path (llm.layers.0.self_attn.q_proj) -> its name in the base peft wraps."""
    return PEFT_LLM[layout] + path[len("llm."):]


def peft_target_regex(targets: list[str], layout: str) -> str:
    """target_modules for adapter_config.json: peft fullmatches a string against each module name, so
    this names the language model's projections only, never the CLIP tower's q/k/v_proj."""
    return rf"{re.escape(PEFT_LLM[layout])}layers\.\d+\.(self_attn|mlp)\.({'|'.join(sorted(targets))})"


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern rule: the first key (in the file's order) that matches the
    end of the module name, after a '.' or at its start, as a regex; else the default."""
    for key, v in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return v
    return default


def save_adapter(out_dir: str, sd: dict[str, torch.Tensor], meta: dict, layout: str) -> None:
    """sd: our adapter keys (`llm.layers.0.self_attn.q_proj.lora_A`); meta: LLaVA.adapters' entry (r, alpha,
    dropout, targets, rslora, rank_pattern, alpha_pattern: patterns keyed by our module paths).
    layout: the base peft will load it onto (PEFT_LLM): the keys and patterns name its modules."""
    from safetensors.torch import save_file
    if layout not in PEFT_LLM:
        raise ValueError(f"layout must be one of {sorted(PEFT_LLM)}, got {layout!r}")
    out = {}
    for k, v in sd.items():
        path, ab = k.rsplit(".", 1)
        out[f"{PEFT_PREFIX}{peft_module(path, layout)}.{ab}.weight"] = v.contiguous().cpu()
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": meta["r"], "lora_alpha": meta["alpha"],
           "lora_dropout": meta["dropout"], "target_modules": peft_target_regex(meta["targets"], layout),
           "use_rslora": bool(meta.get("rslora", False)),
           "rank_pattern": {peft_module(p, layout): r for p, r in (meta.get("rank_pattern") or {}).items()},
           "alpha_pattern": {peft_module(p, layout): a for p, a in (meta.get("alpha_pattern") or {}).items()},
           "bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
           "inference_mode": True, "base_model_name_or_path": None}
    os.makedirs(out_dir, exist_ok=True)
    atomic_file(os.path.join(out_dir, "adapter_model.safetensors"),
                lambda p: save_file(out, p, metadata={"format": "pt"}))
    _write_json(os.path.join(out_dir, "adapter_config.json"), cfg)


def _check_settings(acfg: dict, cfg_path: str) -> None:
    """ModelError naming the first adapter_config.json setting this model cannot compute."""
    pt = acfg.get("peft_type", "LORA")
    if pt != "LORA":
        raise ModelError(f"{cfg_path}: peft_type {pt!r} is not supported: only LoRA adapters load (peft_type \"LORA\")")
    for name, is_set, what in _REFUSED:
        v = acfg.get(name)
        if v is not None and is_set(v):
            raise ModelError(f"{cfg_path}: {name} {json.dumps(v)} is not supported ({what}); the adapter is not loaded")
    for name in ("rank_pattern", "alpha_pattern"):
        v = acfg.get(name)
        if v is not None and not (isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())):
            raise ModelError(f"{cfg_path}: {name} must be an object of module pattern -> number, got {json.dumps(v)}")
        for key in v or {}:
            try:
                re.compile(key)
            except re.error as e:
                raise ModelError(f"{cfg_path}: {name} key {key!r} is not a valid regex: {e}") from None


def read_adapter(path: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """A peft adapter folder -> (add_adapter's r/alpha/dropout/targets/rslora/rank_pattern/alpha_pattern,
    tensors under our adapter keys, where each came from: our key -> "FILE: tensor 'KEY'" for the
    messages of the checks on load). The patterns come back resolved: our module path -> its rank /
    alpha where it differs from r / lora_alpha, by peft's rule over the module names in the file."""
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise ModelError(f"adapter folder {path} does not exist")
    if not os.path.exists(cfg_path):
        raise ModelError(f"{cfg_path} not found: not a peft adapter folder")
    acfg = read_json(cfg_path)
    _check_settings(acfg, cfg_path)
    sd: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    module_of: dict[str, str] = {}   # our module path -> its name in the file's base model
    for file in weight_files(path, prefer=("adapter_model.safetensors", "adapter_model.bin")):
        for k, v in iter_tensors(file):
            m = _PEFT_KEY.search(k)
            if m is None:
                if "lora_" in k or "modules_to_save" in k:
                    raise ModelError(f"{file}: adapter tensor {k!r} does not name a LLaMA layer projection")
                continue  # e.g. a base tensor peft saved alongside
            prefix = m[1][len(PEFT_PREFIX):] if m[1].startswith(PEFT_PREFIX) else m[1]
            if "vision" in prefix or "visual" in prefix:
                raise ModelError(f"{file}: tensor {k!r} adapts the vision tower (its layer {m[2]}); only the "
                                 f"language model's layers take LoRA here: an adapter targeting the tower is refused")
            if prefix not in _PEFT_LLM_READ:
                raise ModelError(f"{file}: tensor {k!r} is not under the language model (expected its layers at "
                                 f"{' or '.join(PEFT_PREFIX + p for p in _PEFT_LLM_READ)}layers.N)")
            ours = f"llm.layers.{m[2]}.{m[3]}.{m[4]}.lora_{m[5]}"
            if ours in sd:   # e.g. two adapter names in one file: which one is meant is not ours to guess
                raise ModelError(f"{file}: tensor {k!r} is {ours}, and so is {where[ours]}")
            if not v.is_floating_point():
                raise ModelError(f"{file}: tensor {k!r} has dtype {v.dtype}; expected a floating-point tensor")
            check_finite(v, f"{file}: tensor {k!r}")
            sd[ours], where[ours] = v, f"{file}: tensor {k!r}"
            module_of[ours.rsplit(".", 1)[0]] = f"{prefix}layers.{m[2]}.{m[3]}.{m[4]}"
    if not sd:
        raise ModelError(f"{path}: no LoRA tensors found")
    a = next((v for k, v in sd.items() if k.endswith("lora_A")), None)
    if "r" not in acfg and a is None:
        raise ModelError(f"{cfg_path}: no r, and no lora_A tensor to read the rank from")
    try:
        r = int(acfg["r"]) if "r" in acfg else a.shape[0]
        alpha = float(acfg.get("lora_alpha", r))
        meta = dict(r=r, alpha=alpha, dropout=float(acfg.get("lora_dropout", 0.0)),
                    targets=sorted({k.split(".")[-2] for k in sd}), rslora=bool(acfg.get("use_rslora", False)))
    except (TypeError, ValueError) as e:
        raise ModelError(f"{cfg_path}: r, lora_alpha and lora_dropout must be numbers: {e}") from None
    if r <= 0:
        raise ModelError(f"{cfg_path}: r is {r}; a LoRA rank is at least 1")
    ranks = {p: int(pattern_value(acfg.get("rank_pattern") or {}, name, r)) for p, name in sorted(module_of.items())}
    alphas = {p: float(pattern_value(acfg.get("alpha_pattern") or {}, name, alpha)) for p, name in sorted(module_of.items())}
    bad = next((p for p, x in ranks.items() if x <= 0), None)
    if bad is not None:
        raise ModelError(f"{cfg_path}: rank_pattern gives {module_of[bad]} rank {ranks[bad]}; a LoRA rank is at least 1")
    meta["rank_pattern"] = {p: x for p, x in ranks.items() if x != r}
    meta["alpha_pattern"] = {p: x for p, x in alphas.items() if x != alpha}
    return meta, sd, where
