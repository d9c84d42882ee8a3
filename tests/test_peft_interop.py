"""Adapters between ours and peft, both directions, on both bases a user loads them onto:
transformers' LlavaForConditionalGeneration and the original LLaVA's LlamaForCausalLM. The reference is
peft itself on the transformers model (logits equal within 1e-5); the settings we cannot compute are
refused by name, tested on folders written by hand (no peft needed)."""
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
import weights
from model import LLaVA, ModelConfig
from helpers import hf_clip_config, hf_llama_config, hf_llava, save, to_hf_ids, _randomize

TOL = 1e-5
TARGETS = ("q_proj", "v_proj", "down_proj")
# the same settings in our add_adapter's form and in peft's LoraConfig's form
OURS = {"plain": {}, "rslora": {"rslora": True},
        "patterns": {"rank_pattern": {"llm.layers.1.mlp.down_proj": 2}, "alpha_pattern": {"llm.layers.0.self_attn.q_proj": 3.0}}}
PEFT = {"plain": {}, "rslora": {"use_rslora": True},
        "patterns": {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {r"layers\.0\.self_attn\.q_proj": 3}}}


def _ids(n_img: int, vocab: int = 100, seed: int = 0):
    """Two left-padded rows [BOS, image tokens, text]. -> ids, mask"""
    g = torch.Generator().manual_seed(seed)
    rows = [[1] + [model.IMAGE_TOKEN_INDEX] * n_img + torch.randint(3, vocab - 1, (L,), generator=g).tolist()
            for L in (5, 9)]
    T = max(map(len, rows))
    ids, mask = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return ids, mask


def _llama():
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(hf_llama_config()).eval()
    _randomize(m)
    return m


def _llama_of(llava):
    """A LlamaForCausalLM holding a transformers Llava's language model."""
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM(llava.config.text_config).eval()
    m.model.load_state_dict(llava.model.language_model.state_dict())
    m.lm_head.load_state_dict(llava.lm_head.state_dict())
    return m


def _llava_of(llama):
    """A transformers Llava whose language model is `llama`'s."""
    m = hf_llava()
    m.model.language_model.load_state_dict(llama.model.state_dict())
    m.lm_head.load_state_dict(llama.lm_head.state_dict())
    return m


class Base:
    """One base in its transformers form (fresh() builds it anew: peft wraps a model in place), ours
    loaded from its folder, and the inputs and forward of each."""

    def __init__(self, kind: str, tmp_path):
        self.kind = kind
        if kind == "llava":
            self.dir = save(hf_llava(), str(tmp_path / "llava"))
            self.ours = lambda: LLaVA.from_pretrained(self.dir).eval()
            self.fresh = hf_llava
        else:   # the original LLaVA's LLM: a LlamaForCausalLM folder and a CLIP tower
            from transformers import CLIPVisionModel
            self.dir = save(_llama(), str(tmp_path / "llama"))
            clip = save(CLIPVisionModel(hf_clip_config()), str(tmp_path / "clip"))
            self.ours = lambda: LLaVA.from_pretrained(self.dir, vision_tower=clip).eval()
            self.fresh = _llama

    def logits(self, m, hf) -> tuple[torch.Tensor, torch.Tensor]:
        """(ours, transformers') logits at the real tokens, with an image on the Llava base."""
        n = m.num_image_tokens if self.kind == "llava" else 0
        ids, mask = _ids(n)
        x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1)) if n else None
        kw = {"pixel_values": x} if n else {}
        with torch.no_grad():
            got = m(ids, x, mask)
            want = hf(input_ids=to_hf_ids(ids, 99), attention_mask=mask, position_ids=model.positions_from_mask(mask),
                      **kw).logits
        return got[mask.bool()], want[mask.bool()]


def _random_adapter(m: LLaVA, name: str, **kw) -> None:
    m.add_adapter(name, r=4, alpha=8, targets=TARGETS, **kw)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _lora_modules(pm) -> list[str]:
    return [n for n, mod in pm.named_modules() if hasattr(mod, "lora_A") and len(mod.lora_A)]


def _no_adapter_left(m: LLaVA) -> bool:
    return not m.adapters and not any(".lora_" in k for k, _ in m.named_parameters())


# --------------------------------------------------------------------------------------------------
# ours -> peft

@pytest.mark.parametrize("setting", sorted(OURS))
@pytest.mark.parametrize("kind", ["llava", "llama"])
def test_ours_to_peft(tmp_path, kind, setting):
    """save_adapter keys the adapter for the base it was loaded from: peft finds every tensor, wraps the
    language model's projections only, and gives our logits."""
    peft = pytest.importorskip("peft")
    base = Base(kind, tmp_path)
    m = base.ours()
    _random_adapter(m, "x", **OURS[setting])
    m.save_adapter(str(tmp_path / "ad"), "x")
    pm = peft.PeftModel.from_pretrained(base.fresh(), str(tmp_path / "ad")).eval()
    wrapped = _lora_modules(pm)
    assert len(wrapped) == 2 * 3 and not any("vision" in n for n in wrapped), wrapped
    bare, _ = base.logits(m, base.fresh())
    m.set_adapter("x")
    got, want = base.logits(m, pm)
    assert (got - bare).abs().max() > 1e-3          # the adapter does something ...
    assert (got - want).abs().max() < TOL           # ... and the same thing under peft


@pytest.mark.parametrize("kind", ["llava", "llama"])
def test_ours_to_peft_on_the_other_layout(tmp_path, kind):
    """layout= keys the adapter for the other base: loaded from a Llava folder, saved for LlamaForCausalLM
    (the original LLaVA's names), and the other way round; compared on text."""
    peft = pytest.importorskip("peft")
    base = Base(kind, tmp_path)
    m = base.ours()
    _random_adapter(m, "x", **OURS["patterns"])
    other = "llava_orig" if kind == "llava" else "llava"
    m.save_adapter(str(tmp_path / "ad"), "x", layout=other)
    hf = _llama_of(hf_llava()) if kind == "llava" else _llava_of(_llama())
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    assert len(_lora_modules(pm)) == 6
    ids, mask = _ids(0)
    m.set_adapter("x")
    with torch.no_grad():
        got = m(ids, None, mask)[mask.bool()]
        want = pm(input_ids=ids, attention_mask=mask, position_ids=model.positions_from_mask(mask)).logits[mask.bool()]
    assert (got - want).abs().max() < TOL


# --------------------------------------------------------------------------------------------------
# peft -> ours

@pytest.mark.parametrize("setting", sorted(PEFT))
@pytest.mark.parametrize("kind", ["llava", "llama"])
def test_peft_to_ours(tmp_path, kind, setting):
    """An adapter peft trained (random weights) and saved on either base loads into ours with its ranks
    and scales (use_rslora, rank_pattern, alpha_pattern) and gives peft's logits; and saving it back
    gives peft the same model again."""
    peft = pytest.importorskip("peft")
    base = Base(kind, tmp_path)
    targets = r".*language_model.*\.(q_proj|v_proj|down_proj)" if kind == "llava" else list(TARGETS)
    pm = peft.get_peft_model(base.fresh(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                           **PEFT[setting]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval().save_pretrained(str(tmp_path / "ad"))
    m = base.ours()
    m.load_adapter(str(tmp_path / "ad"), "y")
    if setting == "patterns":
        assert m.adapters["y"]["rank_pattern"] == {"llm.layers.0.mlp.down_proj": 2, "llm.layers.1.mlp.down_proj": 2}
        assert m.adapters["y"]["alpha_pattern"] == {"llm.layers.0.self_attn.q_proj": 3.0}
    m.set_adapter("y")
    got, want = base.logits(m, pm)
    assert (got - want).abs().max() < TOL
    m.save_adapter(str(tmp_path / "back"), "y")
    pm2 = peft.PeftModel.from_pretrained(base.fresh(), str(tmp_path / "back")).eval()
    got2, want2 = base.logits(m, pm2)
    assert (want2 - want).abs().max() < TOL


def test_peft_adapter_on_the_vision_tower_is_refused(tmp_path):
    """peft with bare names on a Llava base wraps CLIP's q/v_proj too: those tensors are refused, not put
    on the language model's layer of the same number."""
    peft = pytest.importorskip("peft")
    base = Base("llava", tmp_path)
    pm = peft.get_peft_model(base.fresh(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert any("vision" in n for n in _lora_modules(pm))
    pm.save_pretrained(str(tmp_path / "ad"))
    m = base.ours()
    with pytest.raises(weights.ModelError, match=r"adapter_model.safetensors: tensor '[\w.]*vision_tower[\w.]*' adapts "
                                                 r"the vision tower"):
        m.load_adapter(str(tmp_path / "ad"))
    assert _no_adapter_left(m)


# --------------------------------------------------------------------------------------------------
# Without peft: what save_adapter writes, and what load_adapter refuses

def test_save_adapter_names_the_llava_modules(tmp_path):
    """From a Llava folder, every key names a module of transformers' LlavaForConditionalGeneration with
    peft's prefix, and target_modules (peft fullmatches it) picks exactly the targeted LLM projections."""
    base = Base("llava", tmp_path)
    m = base.ours()
    assert m.source_layout == "llava"
    _random_adapter(m, "x")
    m.save_adapter(str(tmp_path / "ad"), "x")
    hf = base.fresh()
    names = [n for n, _ in hf.named_modules()]
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    picked = {n for n in names if re.fullmatch(cfg["target_modules"], n)}
    assert picked == {n for n in names if "language_model" in n and n.rsplit(".", 1)[-1] in TARGETS}
    assert any("vision" in n and n.endswith("q_proj") for n in names)   # the tower has q_proj, not picked
    keys = {k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))}
    assert keys == picked
    # and on request, LlamaForCausalLM's names
    m.save_adapter(str(tmp_path / "orig"), "x", layout="llava_orig")
    keys = set(load_file(str(tmp_path / "orig" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 12
    with pytest.raises(ValueError, match="layout must be one of"):
        m.save_adapter(str(tmp_path / "bad"), "x", layout="clip")


def _tiny() -> LLaVA:
    torch.manual_seed(0)
    return LLaVA(ModelConfig.preset("tiny", vocab_size=64, image_size=16, patch_size=8, layers=2)).eval()


def _folder(tmp_path, **config) -> str:
    """A valid adapter folder of _tiny() (our save_adapter), its adapter_config.json updated."""
    m = _tiny()
    _random_adapter(m, "a")
    d = str(tmp_path / "ad")
    m.save_adapter(d, "a")
    c = json.load(open(f"{d}/adapter_config.json"))
    json.dump({**c, **config}, open(f"{d}/adapter_config.json", "w"))
    return d


@pytest.mark.parametrize("setting,value", [("use_dora", True), ("bias", "all"), ("bias", "lora_only"),
                                           ("modules_to_save", ["lm_head"]), ("fan_in_fan_out", True),
                                           ("lora_bias", True), ("layer_replication", [[0, 2]])])
def test_unsupported_settings_are_refused_by_name(tmp_path, setting, value):
    d = _folder(tmp_path, **{setting: value})
    m = _tiny()
    with pytest.raises(weights.ModelError, match=rf"^{re.escape(d)}/adapter_config.json: {setting} "
                                                 rf"{re.escape(json.dumps(value))} is not supported"):
        m.load_adapter(d)
    assert _no_adapter_left(m)


def test_other_peft_types_are_refused(tmp_path):
    d = _folder(tmp_path, peft_type="IA3")
    with pytest.raises(weights.ModelError, match=r"adapter_config.json: peft_type 'IA3' is not supported"):
        _tiny().load_adapter(d)


@pytest.mark.parametrize("key,message", [
    ("base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
     "adapts the vision tower"),
    ("base_model.model.model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
     "adapts the vision tower"),
    ("base_model.model.other.layers.0.self_attn.q_proj.lora_A.weight", "is not under the language model")])
def test_tensors_outside_the_language_model_are_refused(tmp_path, key, message):
    d = _folder(tmp_path)
    f = f"{d}/adapter_model.safetensors"
    save_file({**load_file(f), key: torch.zeros(4, 128)}, f)
    m = _tiny()
    with pytest.raises(weights.ModelError, match=rf"^{re.escape(f)}: tensor '{re.escape(key)}' {message}"):
        m.load_adapter(d)
    assert _no_adapter_left(m)


def test_rslora_and_patterns_set_each_modules_scale(tmp_path):
    """peft's rules, restated: scale alpha / sqrt(r) under use_rslora, else alpha / r; a pattern key
    matches a module name's end after a '.', as a regex, and sets that module's rank or alpha."""
    m = _tiny()
    _random_adapter(m, "a", rank_pattern={"llm.layers.1.mlp.down_proj": 2})
    m.save_adapter(str(tmp_path / "ad"), "a")
    c = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert c["rank_pattern"] == {"model.layers.1.mlp.down_proj": 2}
    json.dump({**c, "use_rslora": True, "alpha_pattern": {r"self_attn\.v_proj": 5}},
              open(tmp_path / "ad" / "adapter_config.json", "w"))
    m2 = _tiny()
    m2.load_adapter(str(tmp_path / "ad"), "b")
    for p, mod in m2.lora_layers():
        if "b" in mod.lora_A:
            r = 2 if p == "llm.layers.1.mlp.down_proj" else 4
            alpha = 5 if p.endswith("v_proj") else 8
            assert mod.lora_A["b"].shape[0] == r and mod.lora_scale["b"] == pytest.approx(alpha / math.sqrt(r)), p
    # a rank_pattern that does not fit the tensors is a shape error naming the tensor
    json.dump({**c, "rank_pattern": {"down_proj": 3}}, open(tmp_path / "ad" / "adapter_config.json", "w"))
    m3 = _tiny()
    with pytest.raises(weights.ModelError, match=r"tensor 'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight'"
                                                 r".* model expects \(3, 352\) \(rank 3\)"):
        m3.load_adapter(str(tmp_path / "ad"))
    assert _no_adapter_left(m3)
