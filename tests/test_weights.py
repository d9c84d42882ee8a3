"""Each layout's key-mapping table in weights.py, both directions, against transformers' own models:
save with ours -> transformers loads every tensor (nothing missing, nothing unexpected) and its
submodules hold our values; transformers saves -> ours loads the same values back."""
import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import weights
from model import LLaVA, ModelConfig
from helpers import hf_clip_config, hf_llama_config, _randomize


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _clean(info: dict) -> None:
    """transformers' output_loading_info: every tensor had a place and every place a tensor."""
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys"), info


def _tower(clip: nn.Module) -> nn.Module:
    """A CLIPVisionModel's transformer: `.vision_model` up to transformers 5.x, the model itself after."""
    return getattr(clip, "vision_model", clip)


def _random_llava(**kw) -> LLaVA:
    torch.manual_seed(0)
    m = LLaVA(ModelConfig.preset("tiny", vocab_size=64, image_size=16, patch_size=8, **kw)).eval()
    _randomize(m)
    return m


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_llava_table_roundtrip(tmp_path, projector):
    from transformers import LlavaForConditionalGeneration
    m = _random_llava(projector=projector)
    m.save_pretrained(str(tmp_path / "ours"))
    ref, info = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    _clean(info)
    _assert_same(_tower(ref.model.vision_tower).state_dict(), m.vision.state_dict())
    llm = ref.model.language_model.state_dict()
    # the image id (64) got a zero row of its own: transformers looks it up in the vocabulary
    assert ref.config.image_token_index == 64 and (llm["embed_tokens.weight"][64] == 0).all()
    llm["embed_tokens.weight"] = llm["embed_tokens.weight"][:64]
    _assert_same(llm, m.llm.state_dict())
    assert torch.equal(ref.lm_head.weight[:64], m.lm_head.weight) and (ref.lm_head.weight[64] == 0).all()
    proj = ref.model.multi_modal_projector
    if projector == "linear":   # W then identity, with no activation between
        assert ref.config.projector_hidden_act == "linear"
        _assert_same(proj.linear_1.state_dict(), m.projector.linear.state_dict())
        assert torch.equal(proj.linear_2.weight, torch.eye(m.config.hidden)) and (proj.linear_2.bias == 0).all()
    else:
        _assert_same(proj.state_dict(), m.projector.state_dict())
    # and back: transformers' own save (its current key names) loads into ours exactly
    ref.save_pretrained(str(tmp_path / "theirs"))
    m2 = LLaVA.from_pretrained(str(tmp_path / "theirs"))
    assert m2.config.projector == projector
    _assert_same(m2.state_dict(), m.state_dict())


def test_llama_table_roundtrip(tmp_path):
    from transformers import LlamaForCausalLM
    hf_cfg = hf_llama_config()
    torch.manual_seed(0)
    m = LLaVA(ModelConfig(**weights.llama_fields(hf_cfg.to_dict()), text_only=True))
    _randomize(m)
    hf_cfg.save_pretrained(str(tmp_path / "ours"))
    weights.save_safetensors(weights.to_layout(m.state_dict(), weights.table("llama")), str(tmp_path / "ours"), 2**30)
    ref, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    _clean(info)
    _assert_same(ref.model.state_dict(), m.llm.state_dict())
    assert torch.equal(ref.lm_head.weight, m.lm_head.weight)
    ref.save_pretrained(str(tmp_path / "theirs"))
    _assert_same(LLaVA.from_pretrained(str(tmp_path / "theirs")).state_dict(), m.state_dict())


def _vision_only(hf_clip) -> LLaVA:
    cfg = ModelConfig(**weights.clip_fields(hf_clip.to_dict()), hidden=16, layers=1, heads=2, kv_heads=2,
                      intermediate=16, vocab_size=10)
    with torch.device("meta"):
        return LLaVA(cfg)


def test_clip_table_roundtrip(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel
    hf_cfg = hf_clip_config()
    torch.manual_seed(0)
    m = LLaVA(_vision_only(hf_cfg).config)
    _randomize(m)
    hf_cfg.save_pretrained(str(tmp_path / "ours"))
    weights.save_safetensors(weights.to_layout(m.state_dict(), weights.table("clip")), str(tmp_path / "ours"), 2**30)
    ref, info = CLIPVisionModel.from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    _clean(info)
    _assert_same(_tower(ref).state_dict(), m.vision.state_dict())
    ref.save_pretrained(str(tmp_path / "theirs"))
    m2 = _vision_only(hf_cfg)
    weights.load_folder_into(m2, str(tmp_path / "theirs"), "clip", None, "cpu")
    _assert_same(m2.vision.state_dict(), m.vision.state_dict())
    # a whole CLIPModel folder: the vision half loads, the text half and projections are skipped
    full = CLIPModel(CLIPConfig(vision_config=hf_cfg.to_dict(), text_config=dict(hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2, vocab_size=50), projection_dim=8))
    _randomize(full)
    full.save_pretrained(str(tmp_path / "full"))
    m3 = _vision_only(hf_cfg)
    weights.load_folder_into(m3, str(tmp_path / "full"), "clip", None, "cpu")
    _assert_same(m3.vision.state_dict(), full.vision_model.state_dict())


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_llava_orig_table_roundtrip(tmp_path, projector):
    """No transformers class reads this layout: the reference is a folder written by hand from
    LlamaForCausalLM's and CLIPVisionModel's own state dicts, with the tower kept as LLaVA-RLHF does."""
    from transformers import CLIPVisionModel, LlamaForCausalLM
    torch.manual_seed(0)
    llama = LlamaForCausalLM(hf_llama_config())
    clip = CLIPVisionModel(hf_clip_config())
    _randomize(llama)
    _randomize(clip)
    clip.save_pretrained(str(tmp_path / "clip"))
    g = torch.Generator().manual_seed(5)
    if projector == "linear":
        proj = {"model.mm_projector.weight": torch.randn(48, 32, generator=g),
                "model.mm_projector.bias": torch.randn(48, generator=g)}
    else:
        proj = {"model.mm_projector.0.weight": torch.randn(48, 32, generator=g),
                "model.mm_projector.0.bias": torch.randn(48, generator=g),
                "model.mm_projector.2.weight": torch.randn(48, 48, generator=g),
                "model.mm_projector.2.bias": torch.randn(48, generator=g)}
    # as LLaVA-RLHF saved it under transformers 4.x: CLIPVisionTower.vision_tower = CLIPVisionModel
    tower = {"model.vision_tower.vision_tower.vision_model." + k: v for k, v in _tower(clip).state_dict().items()}
    want = {**llama.state_dict(), **proj, **tower}
    c = llama.config.to_dict()
    c.update(model_type="llava_llama", mm_vision_tower=str(tmp_path / "clip"), mm_projector_type=projector)
    for name in ("orig", "ours"):
        (tmp_path / name).mkdir()
        json.dump(c, open(tmp_path / name / "config.json", "w"))
    save_file({k: v.contiguous() for k, v in want.items()}, str(tmp_path / "orig" / "model.safetensors"))
    m = LLaVA.from_pretrained(str(tmp_path / "orig"))
    got = weights.to_layout(m.state_dict(), weights.table("llava_orig", projector))
    _assert_same(got, want)
    # and back: what our table writes loads into the same model
    save_file(got, str(tmp_path / "ours" / "model.safetensors"))
    _assert_same(LLaVA.from_pretrained(str(tmp_path / "ours")).state_dict(), m.state_dict())


def test_peft_keys_name_the_llama_modules(tmp_path):
    """peft keys a LoRA weight by the module it wraps in the base model (LlamaForCausalLM): every key
    we write names one of its linears, with A (r, in) and B (out, r), and each targeted linear has one."""
    from transformers import LlamaConfig, LlamaForCausalLM
    m = _random_llava()
    m.add_adapter("a", r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():
        for p in m.adapter_parameters("a"):
            p.normal_(0, 0.1)
    m.save_adapter(str(tmp_path / "ad"), "a")
    c = m.config
    base = LlamaForCausalLM(LlamaConfig(hidden_size=c.hidden, intermediate_size=c.intermediate,
                                        num_hidden_layers=c.layers, num_attention_heads=c.heads,
                                        num_key_value_heads=c.kv_heads, vocab_size=c.vocab_size))
    linears = {k: mod for k, mod in base.named_modules() if isinstance(mod, nn.Linear)}
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    seen = set()
    for k, v in sd.items():
        assert k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")), k
        name, ab = k[len("base_model.model."):].rsplit(".", 2)[:2]
        lin = linears[name]
        assert tuple(v.shape) == ((4, lin.in_features) if ab == "lora_A" else (lin.out_features, 4)), k
        seen.add(name)
    assert seen == {k for k in linears if k.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj")}
    # and back: the same tensors under our names
    m2 = _random_llava()
    m2.load_adapter(str(tmp_path / "ad"), "b")
    _assert_same(m2.adapter_state_dict("b"), m.adapter_state_dict("a"))
    assert m2.adapters["b"] == {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["down_proj", "q_proj", "v_proj"],
                                "rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    # an adapter for 4 layers does not fit 2, nor one for 2 layers fit 4 (test_adapter_of_another_depth)
    with pytest.raises(weights.ModelError, match=r"tensor 'base_model.model.model.layers.2.mlp.down_proj.lora_A."
                                                 r"weight' is for layer 2, but the base model has 2 layers"):
        _random_llava(layers=2).load_adapter(str(tmp_path / "ad"), "c")
    small = _random_llava(layers=2)
    small.add_adapter("s", r=4, alpha=8)
    small.save_adapter(str(tmp_path / "small"), "s")
    with pytest.raises(weights.ModelError, match=r"adapter has no tensors for \['llm.layers.2.self_attn.q_proj'"):
        m2.load_adapter(str(tmp_path / "small"), "d")


def test_peft_table_roundtrip(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM
    hf_cfg = hf_llama_config()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(hf_cfg)
    _randomize(llama)
    m = LLaVA(ModelConfig(**weights.llama_fields(hf_cfg.to_dict()), text_only=True))
    m.add_adapter("x", r=4, alpha=8)
    with torch.no_grad():
        for p in m.adapter_parameters("x"):
            p.normal_(0, 0.1)
    m.save_adapter(str(tmp_path / "ad"), "x")
    pm = peft.PeftModel.from_pretrained(llama, str(tmp_path / "ad"))
    pm.save_pretrained(str(tmp_path / "ad2"))
    _assert_same(load_file(str(tmp_path / "ad2" / "adapter_model.safetensors")),
                 load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))


# --------------------------------------------------------------------------------------------------
# Adapter folders that do not fit the base: one ModelError naming the file and the tensor (#22 item 13)

def _adapter(tmp_path, name: str, layers: int = 4, r: int = 4) -> str:
    """Our adapter format (save_adapter) of a random adapter on a `layers`-layer tiny model."""
    m = _random_llava(layers=layers)
    m.add_adapter("a", r=r, alpha=8)
    with torch.no_grad():
        for p in m.adapter_parameters("a"):
            p.normal_(0, 0.1)
    m.save_adapter(str(tmp_path / name), "a")
    return str(tmp_path / name)


def _peft_layout(src: str, dst) -> str:
    """The same adapter as peft saves one made on transformers' LlavaForConditionalGeneration (5.x module
    names) with the adapter name in each key, and peft's adapter_config.json fields."""
    sd = load_file(f"{src}/adapter_model.safetensors")
    dst.mkdir()
    save_file({k.replace("base_model.model.model.layers.", "base_model.model.model.language_model.layers.")
                .replace(".weight", ".default.weight"): v for k, v in sd.items()}, str(dst / "adapter_model.safetensors"))
    c = json.load(open(f"{src}/adapter_config.json"))
    c.update(base_model_name_or_path="llava-hf/llava-1.5-7b-hf", peft_version="0.13.0", rank_pattern={},
             alpha_pattern={}, use_rslora=False, use_dora=False, modules_to_save=None)
    json.dump(c, open(dst / "adapter_config.json", "w"))
    return str(dst)


def _no_adapter_left(m: LLaVA) -> bool:
    """A refused adapter leaves nothing behind: no entry, no LoRA parameters."""
    return not m.adapters and not any(".lora_" in k for k, _ in m.named_parameters())


@pytest.mark.parametrize("layout", ["ours", "peft"])
def test_adapter_of_another_depth(tmp_path, layout):
    deep, shallow = _adapter(tmp_path, "deep", layers=4), _adapter(tmp_path, "shallow", layers=2)
    if layout == "peft":
        deep, shallow = _peft_layout(deep, tmp_path / "deep_peft"), _peft_layout(shallow, tmp_path / "shallow_peft")
        key = "base_model.model.model.language_model.layers.2.mlp.down_proj.lora_A.default.weight"
    else:
        key = "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"
    base2 = _random_llava(layers=2)
    base2.load_adapter(shallow, "fits")                       # each folder loads onto its own depth
    _random_llava(layers=4).load_adapter(deep, "fits")
    # more layers than the base: the file, the first tensor past the base's last layer, the base's depth
    base2 = _random_llava(layers=2)
    with pytest.raises(weights.ModelError, match=rf"^{re.escape(deep)}/adapter_model.safetensors: tensor '{key}' is for "
                                                 rf"layer 2, but the base model has 2 layers \(0-1\)"):
        base2.load_adapter(deep, "x")
    assert _no_adapter_left(base2)
    # fewer: the first projection without tensors and how deep the adapter goes
    base4 = _random_llava(layers=4)
    with pytest.raises(weights.ModelError, match=rf"^{re.escape(shallow)}: adapter has no tensors for \['llm.layers.2.self_attn."
                                                 r"q_proj'.*the adapter's layers stop at 1, the base model has 4"):
        base4.load_adapter(shallow, "x")
    assert _no_adapter_left(base4)


def test_adapter_of_another_rank_or_width_names_the_tensor(tmp_path):
    ad = _adapter(tmp_path, "ad", layers=2)
    c = json.load(open(f"{ad}/adapter_config.json"))
    json.dump(dict(c, r=8), open(f"{ad}/adapter_config.json", "w"))   # the config says 8, the tensors hold 4
    with pytest.raises(weights.ModelError, match=r"adapter_model.safetensors: tensor 'base_model.model.model.layers.0."
                                                 r"self_attn.q_proj.lora_A.weight': .* has shape \(4, 128\), model "
                                                 r"expects \(8, 128\) \(rank 8\)"):
        _random_llava(layers=2).load_adapter(ad, "x")
    json.dump(c, open(f"{ad}/adapter_config.json", "w"))
    narrow = _random_llava(layers=2, intermediate=100)
    with pytest.raises(weights.ModelError, match=r"tensor 'base_model.model.model.layers.0.mlp.gate_proj.lora_B."
                                                 r"weight': .* has shape \(352, 4\), model expects \(100, 4\)"):
        narrow.load_adapter(ad, "x")
    assert _no_adapter_left(narrow)


def test_bad_adapter_folders(tmp_path):
    m = _random_llava(layers=2)
    with pytest.raises(weights.ModelError, match="adapter folder .*nowhere does not exist"):
        m.load_adapter(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(weights.ModelError, match=r"empty/adapter_config.json not found: not a peft adapter folder"):
        m.load_adapter(str(tmp_path / "empty"))
    ad = _adapter(tmp_path, "ad", layers=2)
    (tmp_path / "ad" / "adapter_config.json").write_text('{"r": 4,')
    with pytest.raises(weights.ModelError, match="adapter_config.json is not valid JSON"):
        m.load_adapter(ad)
    (tmp_path / "ad" / "adapter_config.json").write_text('{"r": "four"}')
    with pytest.raises(weights.ModelError, match="adapter_config.json: r, lora_alpha and lora_dropout must be numbers"):
        m.load_adapter(ad)
    (tmp_path / "ad" / "adapter_config.json").write_text('{"r": 4}')
    raw = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(weights.ModelError, match="adapter_model.safetensors .*truncated or corrupt"):
        m.load_adapter(ad)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 128),
               "base_model.model.model.layers.0.self_attn.gate_proj.lora_A.weight": torch.zeros(4, 128)},
              str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(weights.ModelError, match=r"tensor '.*layers.0.self_attn.gate_proj.lora_A.weight' "
                                                 r"\(llm.layers.0.self_attn.gate_proj\) has no place in the model"):
        m.load_adapter(ad)
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A"
    save_file({f"{q}.weight": torch.zeros(4, 128, dtype=torch.int8)}, str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(weights.ModelError, match=rf"tensor '{q}.weight' has dtype torch.int8; expected a floating"):
        m.load_adapter(ad)
    save_file({f"{q}.default.weight": torch.zeros(4, 128), f"{q}.other.weight": torch.zeros(4, 128)},
              str(tmp_path / "ad" / "adapter_model.safetensors"))   # two adapters' tensors in one file
    with pytest.raises(weights.ModelError, match=rf"tensor '{q}.other.weight' is llm.layers.0.self_attn.q_proj.lora_A, "
                                                 rf"and so is .*tensor '{q}.default.weight'"):
        m.load_adapter(ad)
    assert _no_adapter_left(m)


def test_nan_adapter_names_the_tensor(tmp_path):
    ad = _adapter(tmp_path, "ad", layers=2)
    f = f"{ad}/adapter_model.safetensors"
    sd = load_file(f)
    k = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    sd[k][0, :2] = float("nan")
    sd[k][3, 1] = float("-inf")
    save_file(sd, f)
    m = _random_llava(layers=2)
    with pytest.raises(weights.ModelError, match=rf"^{re.escape(f)}: tensor '{k}' holds 2 NaN / 1 inf values$"):
        m.load_adapter(ad)
    assert _no_adapter_left(m)
