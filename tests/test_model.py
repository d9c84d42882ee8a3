"""model.py against transformers (the reference) on tiny random configs, plus LoRA, log-probs and I/O."""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import common
import model
import weights
from model import IMAGE_TOKEN_INDEX, LLaVA, ModelConfig
from helpers import ROOT, hf_clip_config, hf_llama_config, hf_llava, save, to_hf_ids, _randomize

TOL = 1e-4


def _images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ids_with_images(n_img_tokens, lengths, vocab, seed=0, image=True, right=False):
    """Rows of [BOS, image tokens, text...] of the given text lengths, left padded (right: right padded).
    -> ids, mask"""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for L in lengths:
        text = torch.randint(3, vocab - 1, (L,), generator=g).tolist()
        rows.append([1] + ([IMAGE_TOKEN_INDEX] * n_img_tokens if image else []) + text)
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if right else slice(T - len(r), T)
        ids[i, cols] = torch.tensor(r)
        mask[i, cols] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,patch,layer,keep_cls", [(30, 6, -2, False), (30, 6, -1, True),
                                                       (33, 8, -2, True), (36, 6, 1, False)])
def test_vision_matches_clip(tmp_path, size, patch, layer, keep_cls):
    from transformers import CLIPVisionModel
    torch.manual_seed(0)
    ref = CLIPVisionModel(hf_clip_config(size, patch)).eval()
    _randomize(ref)
    save(ref, tmp_path / "clip")
    cfg = ModelConfig(**weights.clip_fields(ref.config.to_dict()), vision_feature_layer=layer,
                      vision_keep_cls=keep_cls, hidden=16, layers=1, heads=2, kv_heads=2, intermediate=16, vocab_size=10)
    with torch.device("meta"):
        m = LLaVA(cfg)
    weights.load_folder_into(m, str(tmp_path / "clip"), "clip", None, "cpu")
    x = _images(2, size)
    with torch.no_grad():
        hs = ref(pixel_values=x, output_hidden_states=True).hidden_states[layer]
        want = hs if keep_cls else hs[:, 1:]
        got = m.vision(x)
    assert got.shape == want.shape == (2, cfg.num_image_tokens, 32)
    assert (got - want).abs().max() < TOL


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llm_matches_llama_and_builds_from_parts(tmp_path, kv_heads):
    from transformers import LlamaForCausalLM, CLIPVisionModel
    torch.manual_seed(0)
    llama = LlamaForCausalLM(hf_llama_config(kv_heads=kv_heads)).eval()
    _randomize(llama)
    clip = CLIPVisionModel(hf_clip_config()).eval()
    save(llama, tmp_path / "llama")
    save(clip, tmp_path / "clip")
    m = LLaVA.from_pretrained(str(tmp_path / "llama"), vision_tower=str(tmp_path / "clip")).eval()
    assert m.config.kv_heads == kv_heads and m.config.projector == "linear"
    ids, mask = _ids_with_images(0, [7, 12, 3], 100, image=False)
    pos = model.positions_from_mask(mask)
    with torch.no_grad():
        want = llama(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = m(ids, None, mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < TOL
    # right padding gives the same logits at real tokens as left padding
    rows = [ids[i][mask[i].bool()] for i in range(3)]
    ids_r = torch.zeros_like(ids)
    mask_r = torch.zeros_like(mask)
    for i, r in enumerate(rows):
        ids_r[i, :len(r)] = r
        mask_r[i, :len(r)] = 1
    with torch.no_grad():
        got_r = m(ids_r, None, mask_r)
    assert (got_r[mask_r.bool()] - got[real]).abs().max() < TOL


def test_text_only_llama(tmp_path):
    """A LLaMA folder without a vision tower loads as a text-only model (e.g. a local judge)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    llama = LlamaForCausalLM(hf_llama_config()).eval()
    _randomize(llama)
    save(llama, tmp_path / "llama")
    m = LLaVA.from_pretrained(str(tmp_path / "llama")).eval()
    assert m.config.text_only and m.num_image_tokens == 0 and m.vision is None
    ids, mask = _ids_with_images(0, [6, 2], 100, image=False)
    with torch.no_grad():
        want = llama(input_ids=ids, attention_mask=mask, position_ids=model.positions_from_mask(mask)).logits
        assert (m(ids, None, mask) - want)[mask.bool()].abs().max() < TOL
        g = m.generate(ids, None, mask, max_new_tokens=5)
        assert g.shape == (2, 5)
    with pytest.raises(ValueError, match="text-only"):
        m(torch.tensor([[1, IMAGE_TOKEN_INDEX]]), _images(1, 30))


@pytest.mark.parametrize("size,patch,kv,layer,strategy", [(30, 6, 2, -2, "default"), (33, 8, 4, -2, "full"),
                                                          (36, 6, 2, -1, "default")])
def test_llava_matches_transformers(tmp_path, size, patch, kv, layer, strategy):
    ref = hf_llava(size, patch, kv, layer, strategy)
    save(ref, tmp_path / "llava")
    m = LLaVA.from_pretrained(str(tmp_path / "llava")).eval()
    assert m.config.projector == "mlp2x_gelu" and m.num_image_tokens == ref.config.image_seq_length
    ids, mask = _ids_with_images(m.num_image_tokens, [5, 9], 100)
    x = _images(2, size)
    with torch.no_grad():
        want = ref(input_ids=to_hf_ids(ids, 99), pixel_values=x, attention_mask=mask,
                   position_ids=model.positions_from_mask(mask)).logits
        got = m(ids, x, mask)
        feats = m(ids, m.encode_images(x), mask)   # the features computed once, passed in place of pixels
    assert (got[mask.bool()] - want[mask.bool()]).abs().max() < TOL
    assert torch.equal(feats, got)


def test_right_padded_batch_runs_unmasked_and_matches_transformers(tmp_path):
    """Right padding takes SDPA's is_causal path (no mask): the logits at real tokens are transformers'
    (which masks the pads), and the gradients of a loss on real tokens are those of the masked path."""
    ref = hf_llava(30, 6, 2, -2, "default")
    save(ref, tmp_path / "llava")
    m = LLaVA.from_pretrained(str(tmp_path / "llava")).eval()
    ids, mask = _ids_with_images(m.num_image_tokens, [5, 12, 1], 100, right=True)
    x = _images(3, 30)
    assert model.causal_or_padded_mask(mask.bool()) is None
    left_ids, left_mask = _ids_with_images(m.num_image_tokens, [5, 12, 1], 100)
    assert model.causal_or_padded_mask(left_mask.bool()) is not None   # left padding still needs the mask
    with torch.no_grad():
        want = ref(input_ids=to_hf_ids(ids, 99), pixel_values=x, attention_mask=mask,
                   position_ids=model.positions_from_mask(mask)).logits
        got = m(ids, x, mask)
    assert (got[mask.bool()] - want[mask.bool()]).abs().max() < TOL

    def grads(unmasked: bool) -> list[torch.Tensor]:
        m.zero_grad()
        emb = m.embed(ids, x)
        amask = None if unmasked else model.attention_mask_4d(mask.bool())
        h = m.decode(emb, model.positions_from_mask(mask), amask)
        (h[mask.bool()] ** 2).mean().backward()       # real tokens only, as every loss here
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]
    fast, slow = grads(True), grads(False)
    assert len(fast) == len(slow) > 0
    assert max((a - b).abs().max().item() for a, b in zip(fast, slow)) < 1e-5


def test_generate_refuses_right_padded_prompts():
    m = LLaVA(ModelConfig.preset("tiny", vocab_size=50)).eval()
    ids, mask = _ids_with_images(m.num_image_tokens, [4, 9], 50, right=True)
    with pytest.raises(ValueError, match="left-padded"):
        m.generate(ids, _images(2, 64), mask, max_new_tokens=2)


def test_image_features_of_another_shape_raise():
    m = LLaVA(ModelConfig.preset("tiny", vocab_size=50))
    ids, _ = _ids_with_images(m.num_image_tokens, [4], 50)
    with pytest.raises(ValueError, match=r"image features of shape \(1, 64, 96\); this model's are \(N, 64, 128\)"):
        m(ids, torch.zeros(1, 64, 96))


def test_image_count_mismatch_raises():
    m = LLaVA(ModelConfig.preset("tiny", vocab_size=50))
    ids, _ = _ids_with_images(m.num_image_tokens, [4, 4], 50)
    with pytest.raises(ValueError, match=r"128 image positions .* 1 images give 64"):
        m(ids, _images(1, 64))


def _orig_llava_folder(tmp_path, projector):
    """Write an original-LLaVA-layout checkpoint (llava_llama + model.mm_projector.*) from HF parts."""
    from transformers import LlamaForCausalLM, CLIPVisionModel
    from safetensors.torch import save_file
    torch.manual_seed(0)
    llama = LlamaForCausalLM(hf_llama_config()).eval()
    _randomize(llama)
    clip = CLIPVisionModel(hf_clip_config()).eval()
    _randomize(clip)
    save(clip, tmp_path / "clip")
    d = tmp_path / "orig"
    d.mkdir()
    sd = {k: v.contiguous() for k, v in llama.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    if projector == "linear":
        proj = {"model.mm_projector.weight": torch.randn(48, 32, generator=g) * 0.1,
                "model.mm_projector.bias": torch.randn(48, generator=g) * 0.1}
    else:
        proj = {"model.mm_projector.0.weight": torch.randn(48, 32, generator=g) * 0.1,
                "model.mm_projector.0.bias": torch.randn(48, generator=g) * 0.1,
                "model.mm_projector.2.weight": torch.randn(48, 48, generator=g) * 0.1,
                "model.mm_projector.2.bias": torch.randn(48, generator=g) * 0.1}
    sd.update(proj)
    # two shards with an index, as real 7B/13B releases have
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(d / "model-00002-of-00002.safetensors"))
    json.dump({"weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}},
              open(d / "model.safetensors.index.json", "w"))
    c = llama.config.to_dict()
    c.update(model_type="llava_llama", mm_vision_tower="openai/clip-vit-large-patch14", mm_projector_type=projector,
             mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_hidden_size=32)
    json.dump(c, open(d / "config.json", "w"))
    return d, llama, clip, proj


def _reference_logits(llama, clip, proj, projector, ids, mask, x):
    """Direct composition of the HF parts: CLIP layer -2 patches -> projector -> spliced into LLaMA."""
    with torch.no_grad():
        f = clip(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        if projector == "linear":
            f = F.linear(f, proj["model.mm_projector.weight"], proj["model.mm_projector.bias"])
        else:
            f = F.linear(F.gelu(F.linear(f, proj["model.mm_projector.0.weight"], proj["model.mm_projector.0.bias"])),
                         proj["model.mm_projector.2.weight"], proj["model.mm_projector.2.bias"])
        is_img = ids == IMAGE_TOKEN_INDEX
        emb = llama.model.embed_tokens(ids.masked_fill(is_img, 0))
        emb[is_img] = f.reshape(-1, f.shape[-1])
        return llama(inputs_embeds=emb, attention_mask=mask, position_ids=model.positions_from_mask(mask)).logits


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_original_llava_layout_and_save_roundtrip(tmp_path, projector):
    from transformers import LlavaForConditionalGeneration
    d, llama, clip, proj = _orig_llava_folder(tmp_path, projector)
    with pytest.raises(weights.ModelError, match="not a local folder"):
        LLaVA.from_pretrained(str(d))   # the config names a hub id: we never download
    m = LLaVA.from_pretrained(str(d), vision_tower=str(tmp_path / "clip")).eval()
    assert m.config.projector == projector
    ids, mask = _ids_with_images(m.num_image_tokens, [6, 11], 100)
    x = _images(2, 30)
    want = _reference_logits(llama, clip, proj, projector, ids, mask, x)
    with torch.no_grad():
        got = m(ids, x, mask)
    assert (got - want)[mask.bool()].abs().max() < TOL
    # save in transformers' Llava layout: transformers loads it and gives the same logits
    m.save_pretrained(str(tmp_path / "saved"))
    ref = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "saved")).eval()
    img_id = ref.config.image_token_index
    with torch.no_grad():
        hf = ref(input_ids=to_hf_ids(ids, img_id), pixel_values=x, attention_mask=mask,
                 position_ids=model.positions_from_mask(mask)).logits[..., :100]
    assert (hf - want)[mask.bool()].abs().max() < TOL
    # and we load our own output back exactly
    m2 = LLaVA.from_pretrained(str(tmp_path / "saved")).eval()
    assert replace(m2.config, image_token_index=None) == m.config and m2.config.image_token_index == 100
    m2.save_pretrained(str(tmp_path / 'again'))   # a second save reuses the same image id
    assert json.load(open(tmp_path / 'again' / 'config.json'))['text_config']['vocab_size'] == 101
    with torch.no_grad():
        assert torch.equal(m2(ids, x, mask), got)


def test_sharded_save(tmp_path):
    m = LLaVA(ModelConfig.preset("tiny", vocab_size=64, image_token_index=63)).eval()
    m.save_pretrained(str(tmp_path / "s"), max_shard_bytes=500_000)
    files = os.listdir(tmp_path / "s")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    m2 = LLaVA.from_pretrained(str(tmp_path / "s"))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_greedy_generate_matches_transformers(tmp_path):
    ref = hf_llava(30, 6, 2)
    save(ref, tmp_path / "llava")
    m = LLaVA.from_pretrained(str(tmp_path / "llava")).eval()
    ids, mask = _ids_with_images(m.num_image_tokens, [3, 10, 6], 100, seed=3)
    x = _images(3, 30, seed=3)
    out = m.generate(ids, x, mask, max_new_tokens=12, temperature=0.0, eos_token_id=2)
    with torch.no_grad():
        hf = ref.generate(input_ids=to_hf_ids(ids, 99), pixel_values=x, attention_mask=mask, max_new_tokens=12,
                          do_sample=False, eos_token_id=-1, pad_token_id=0)[:, ids.shape[1]:]
    # transformers with no EOS runs all 12 steps; ours stops each row at EOS (2): compare up to it
    assert out.shape[1] <= 12
    for i in range(3):
        o = out[i].tolist()
        n = o.index(2) + 1 if 2 in o else len(o)
        assert o[:n] == hf[i, :n].tolist()
        assert all(t == 0 for t in o[n:])


def test_generate_stops_at_eos_and_pads():
    torch.manual_seed(0)
    m = LLaVA(ModelConfig.preset("tiny", vocab_size=20, image_size=16, patch_size=8)).eval()
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.weight[2] = 0.0
    ids, mask = _ids_with_images(m.num_image_tokens, [2, 5], 20)
    x = _images(2, 16)
    g = torch.Generator().manual_seed(0)
    out, lp = m.generate(ids, x, mask, max_new_tokens=30, temperature=1.0, generator=g, return_logprobs=True)
    # uniform logits: every log-prob is -log(V); rows that hit EOS are padded with 0 afterwards
    real = torch.ones_like(out, dtype=torch.bool)
    for i in range(2):
        o = out[i].tolist()
        if 2 in o:
            k = o.index(2)
            assert all(t == 0 for t in o[k + 1:])
            real[i, k + 1:] = False
    assert torch.allclose(lp[real], torch.full_like(lp[real], -torch.log(torch.tensor(20.0)).item()), atol=1e-5)
    assert (lp[~real] == 0).all()
    # the same generator seed gives the same samples
    out2 = m.generate(ids, x, mask, max_new_tokens=30, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, out2)


def test_top_p_keeps_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {model.sample_next(logits, 1.0, 0.7, g)[0].item() for _ in range(300)}
    assert draws == {0, 1}   # 0.5 < 0.7 needs the second token; the third is never needed


# --------------------------------------------------------------------------------------------------
def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = LLaVA(ModelConfig.preset("tiny", vocab_size=64, image_size=16, patch_size=8, **kw)).eval()
    _randomize(m)
    return m


def test_lora_fresh_noop_merge_switch():
    m = _tiny()
    ids, mask = _ids_with_images(m.num_image_tokens, [4, 7], 64)
    x = _images(2, 16)
    with torch.no_grad():
        base = m(ids, x, mask)
        m.add_adapter("policy", r=4, alpha=8)
        m.add_adapter("value", r=2, alpha=2, targets=("q_proj", "v_proj"))
        m.set_adapter("policy")
        assert torch.allclose(m(ids, x, mask), base, atol=0)   # B = 0: a fresh adapter changes nothing
        for p in m.adapter_parameters("policy") + m.adapter_parameters("value"):
            p.normal_(0, 0.1)
        pol = m(ids, x, mask)
        m.set_adapter("value")
        val = m(ids, x, mask)
        m.set_adapter(None)
        none = m(ids, x, mask)
    assert (pol - base).abs().max() > 1e-3 and (val - base).abs().max() > 1e-3 and (pol - val).abs().max() > 1e-3
    assert torch.equal(none, base)
    m.merge_adapter("policy")
    assert "policy" not in m.adapters
    m.set_adapter(None)
    with torch.no_grad():
        merged = m(ids, x, mask)
    assert (merged - pol).abs().max() < 1e-4


def test_lora_save_load_and_errors(tmp_path):
    m = _tiny()
    m.add_adapter("a", r=4, alpha=16)
    with torch.no_grad():
        for p in m.adapter_parameters("a"):
            p.normal_(0, 0.1)
    m.save_adapter(str(tmp_path / "ad"), "a")
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    from safetensors import safe_open
    keys = list(safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt").keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    m2 = _tiny()
    m2.load_adapter(str(tmp_path / "ad"), "b")
    m.set_adapter("a")
    m2.set_adapter("b")
    ids, mask = _ids_with_images(m.num_image_tokens, [4, 7], 64)
    x = _images(2, 16)
    with torch.no_grad():
        assert torch.equal(m(ids, x, mask), m2(ids, x, mask))
    m3 = _tiny(intermediate=100)
    with pytest.raises(ValueError, match=r"adapter tensor llm.layers.0.mlp.\w+_proj.lora_[AB] has shape \(\d+, \d+\), model expects"):
        m3.load_adapter(str(tmp_path / "ad"), "b")


def test_peft_roundtrip(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM, CLIPVisionModel
    torch.manual_seed(0)
    llama = LlamaForCausalLM(hf_llama_config()).eval()
    _randomize(llama)
    save(llama, tmp_path / "llama")
    save(CLIPVisionModel(hf_clip_config()), tmp_path / "clip")
    m = LLaVA.from_pretrained(str(tmp_path / "llama"), vision_tower=str(tmp_path / "clip")).eval()
    m.add_adapter("x", r=4, alpha=8)
    with torch.no_grad():
        for p in m.adapter_parameters("x"):
            p.normal_(0, 0.1)
    m.save_adapter(str(tmp_path / "ad"), "x")
    pm = peft.PeftModel.from_pretrained(llama, str(tmp_path / "ad")).eval()
    ids, mask = _ids_with_images(0, [9, 4], 100, image=False)
    m.set_adapter("x")
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask, position_ids=model.positions_from_mask(mask)).logits
        got = m(ids, None, mask)
    assert (got - want)[mask.bool()].abs().max() < TOL
    # and peft's own save loads into ours
    pm.save_pretrained(str(tmp_path / "ad2"))
    m2 = LLaVA.from_pretrained(str(tmp_path / "llama"), vision_tower=str(tmp_path / "clip")).eval()
    m2.load_adapter(str(tmp_path / "ad2"), "y")
    m2.set_adapter("y")
    with torch.no_grad():
        assert (m2(ids, None, mask) - got).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_chunked_logprobs_match_naive_with_grads(fused):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    tgt = torch.randint(0, 50, (3, 7))
    lp, ent = model.token_logprobs(h, w, tgt, chunk=5, with_entropy=True, fused=fused)
    logits = h @ w.T
    ref = torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).squeeze(-1)
    ref_ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    assert (lp - ref).abs().max() < 1e-5 and (ent - ref_ent).abs().max() < 1e-5
    coef = torch.randn(3, 7)
    g1 = torch.autograd.grad((lp * coef).sum() + ent.sum(), (h, w))
    g2 = torch.autograd.grad((ref * coef).sum() + ref_ent.sum(), (h, w))
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() < 1e-4


def _next_token_logprobs(m, ids, x, mask):
    """log p(ids[:, t+1] | ..t) for t < T-1 -> (B, T-1) fp32."""
    return model.token_logprobs(m.hidden_states(ids, x, mask)[:, :-1], m.lm_head.weight, ids[:, 1:], chunk=7)


def test_model_logprobs_and_gradient_checkpointing():
    m = _tiny()
    ids, mask = _ids_with_images(m.num_image_tokens, [4, 7], 64)
    x = _images(2, 16)
    m.train()
    lp = _next_token_logprobs(m, ids, x, mask)
    ref = torch.log_softmax(m(ids, x, mask)[:, :-1].float(), -1).gather(-1, ids[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    assert (lp - ref).abs().max() < 1e-5
    g1 = torch.autograd.grad(lp[mask[:, 1:].bool()].sum(), list(m.llm.parameters()))
    m.gradient_checkpointing = True
    lp2 = _next_token_logprobs(m, ids, x, mask)
    g2 = torch.autograd.grad(lp2[mask[:, 1:].bool()].sum(), list(m.llm.parameters()))
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) < 1e-5


def test_scalar_head_reads_last_real_token():
    torch.manual_seed(0)
    head = model.ScalarHead(8)
    mask_l = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask_r = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert model.last_token_index(mask_l).tolist() == [3, 3]
    assert model.last_token_index(mask_r).tolist() == [1, 3]
    h = torch.randn(2, 4, 8)
    assert torch.equal(model.gather_last(head(h), mask_r), head(h)[[0, 1], [1, 3]])
    assert torch.equal(model.ScalarHead(8, zero_init=True)(h), torch.zeros(2, 4))


# --------------------------------------------------------------------------------------------------
def test_bad_checkpoints(tmp_path):
    """Every way a model folder can be wrong is one ModelError (a common.UserError: one line, exit 2)
    naming the folder or file, and the tensor."""
    from safetensors.torch import save_file, load_file
    m = _tiny()
    good = tmp_path / "good"
    m.save_pretrained(str(good))
    sd = load_file(str(good / "model.safetensors"))
    cfg = open(good / "config.json").read()

    def variant(name, tensors=None, raw=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg)
        if raw is not None:
            (d / "model.safetensors").write_bytes(raw)
        else:
            save_file(tensors, str(d / "model.safetensors"))
        return str(d)

    k = "language_model.model.layers.1.mlp.up_proj.weight"
    missing = {a: b for a, b in sd.items() if a != k}
    with pytest.raises(weights.ModelError, match="lacks 1 tensors.*llm.layers.1.mlp.up_proj.weight"):
        LLaVA.from_pretrained(variant("missing", missing))
    shaped = dict(sd, **{k: torch.zeros(5, 5)})
    with pytest.raises(weights.ModelError, match=r"up_proj.weight' has shape \(5, 5\), the model expects \(352, 128\)"):
        LLaVA.from_pretrained(variant("shape", shaped))
    extra = dict(sd, **{"language_model.model.layers.9.mlp.up_proj.weight": torch.zeros(2)})
    with pytest.raises(weights.ModelError, match="unexpected tensor 'language_model.model.layers.9"):
        LLaVA.from_pretrained(variant("extra", extra))
    wrong_dtype = dict(sd, **{k: torch.zeros(352, 128, dtype=torch.int32)})
    with pytest.raises(weights.ModelError, match="dtype torch.int32"):
        LLaVA.from_pretrained(variant("dtype", wrong_dtype))
    raw = (good / "model.safetensors").read_bytes()
    with pytest.raises(weights.ModelError, match="truncated or corrupt"):
        LLaVA.from_pretrained(variant("trunc", raw=raw[: len(raw) // 2]))
    with pytest.raises(weights.ModelError, match="does not exist"):
        LLaVA.from_pretrained(str(tmp_path / "nowhere"))
    # the folder's config.json
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(weights.ModelError, match=r"noconfig/config.json not found"):
        LLaVA.from_pretrained(str(tmp_path / "noconfig"))
    bad = variant("badjson", sd)
    open(os.path.join(bad, "config.json"), "w").write(cfg[:40])
    with pytest.raises(weights.ModelError, match=r"badjson/config.json is not valid JSON"):
        LLaVA.from_pretrained(bad)
    c = json.loads(cfg)
    for name, conf, msg in (("gpt2", {"model_type": "gpt2"}, "gpt2: unsupported model_type 'gpt2'"),
                            ("heads", dict(c, llava_rlhf_config=dict(c["llava_rlhf_config"], heads=5)),
                             r"heads/config.json: ValueError: hidden 128, heads 5, kv_heads 4 do not divide"),
                            ("types", dict(c, llava_rlhf_config=dict(c["llava_rlhf_config"], hidden="128")),
                             r"types/config.json: TypeError")):
        d = variant(name, sd)
        json.dump(conf, open(os.path.join(d, "config.json"), "w"))
        with pytest.raises(weights.ModelError, match=msg):
            LLaVA.from_pretrained(d)
    # weight files: none, an index naming a shard that is not there, a .bin that holds no tensors
    d = variant("noweights", sd)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(weights.ModelError, match=r"noweights: no weights found"):
        LLaVA.from_pretrained(d)
    json.dump({"weight_map": {k: "model-00001-of-00002.safetensors"}}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    with pytest.raises(weights.ModelError, match=r"noweights/model-00001-of-00002.safetensors not found \(a shard named in"):
        LLaVA.from_pretrained(d)
    os.remove(os.path.join(d, "model.safetensors.index.json"))
    torch.save([1, 2], os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(weights.ModelError, match=r"pytorch_model.bin: expected a dict of tensors, got list"):
        LLaVA.from_pretrained(d)
    # a vision tower folder that is not there
    with pytest.raises(weights.ModelError, match=r"nowhere_clip"):
        LLaVA.from_pretrained(str(good), vision_tower=str(tmp_path / "nowhere_clip"))


def test_nonfinite_weights_name_the_file_and_tensor(tmp_path):
    """NaN or inf in a checkpoint would only show, much later, as NaN losses: loading refuses it, naming
    the file and the first bad tensor; a value a narrower dtype cannot hold counts too."""
    from safetensors.torch import save_file, load_file
    d = save(hf_llava(), str(tmp_path / "hf"))
    f = os.path.join(d, "model.safetensors")
    sd = load_file(f)
    k = next(k for k in sorted(sd) if k.endswith("layers.0.self_attn.q_proj.weight") and "vision" not in k)
    clean = sd[k].clone()
    sd[k][1, :3] = float("nan")
    save_file(sd, f)
    with pytest.raises(weights.ModelError, match=rf"^{re.escape(f)}: tensor '{k}' holds 3 NaN / 0 inf values$"):
        LLaVA.from_pretrained(d)
    sd[k] = clean.clone()
    sd[k][0, 0], sd[k][2, 5] = float("inf"), float("-inf")
    save_file(sd, f)
    with pytest.raises(weights.ModelError, match=rf"tensor '{k}' holds 0 NaN / 2 inf values"):
        LLaVA.from_pretrained(d)
    sd[k] = clean.clone()
    sd[k][0, 0] = 1e6                           # finite in fp32, past fp16's largest (65504)
    save_file(sd, f)
    assert LLaVA.from_pretrained(d).llm.layers[0].self_attn.q_proj.weight[0, 0] == 1e6
    with pytest.raises(weights.ModelError, match=rf"tensor '{k}' \(as torch.float16, stored as torch.float32\) "
                                                 r"holds 0 NaN / 1 inf values"):
        LLaVA.from_pretrained(d, dtype=torch.float16)


def test_finite_check_skips_tensors_without_values():
    """The rehearsal's fake tensors and meta tensors hold no values: the check passes them unread."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    weights.check_finite(torch.empty(4, 4, device="meta"), "meta")
    with FakeTensorMode():
        fake = torch.full((4, 4), float("nan"))
        weights.check_finite(fake, "fake")
    assert not model.has_values(fake)
    weights.check_finite(torch.arange(4), "integers")   # not floating point: nothing to check
    with pytest.raises(weights.ModelError, match="^real holds 1 NaN / 0 inf values$"):
        weights.check_finite(torch.tensor([0.0, float("nan")]), "real")


def test_stage_flags_for_the_model_are_config_errors():
    with pytest.raises(common.ConfigError, match=r"--dtype must be auto, fp32, bf16 or fp16, got 'fp8'"):
        model.torch_dtype("fp8", "cpu")
    with pytest.raises(common.ConfigError, match="--model_path .* or --model_preset"):
        model.load_model()
    with pytest.raises(common.ConfigError, match=r"--model_preset: unknown model preset 'huge'"):
        model.load_model(preset="huge")


@pytest.mark.parametrize("case", ["missing", "bad_json", "nan"])
def test_stage_with_a_bad_model_folder_exits_2(tiny_world, tmp_path, case):
    """sft.py on a model folder that cannot be used: exit 2 and one line naming the folder or file; no
    traceback. (A NaN checkpoint would train, or an unreadable config.json end in a traceback, before.)"""
    import shutil
    from safetensors.torch import save_file, load_file
    d = tmp_path / "model"
    if case != "missing":
        shutil.copytree(tiny_world["model"], d)
    if case == "bad_json":
        (d / "config.json").write_text("{")
    if case == "nan":
        sd = load_file(str(d / "model.safetensors"))
        sd["language_model.model.norm.weight"][0] = float("nan")
        save_file(sd, str(d / "model.safetensors"))
    w = tiny_world
    args = {"model_path": d, "tokenizer": w["tokenizer"], "data_path": w["data"] / "sft.json",
            "image_folder": w["data"] / "images", "out_dir": tmp_path / "run", "max_steps": 1, "progress": "false"}
    r = subprocess.run([sys.executable, "sft.py"] + sum(([f"--{k}", str(v)] for k, v in args.items()), []),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    want = {"missing": f"--model_path {d}: no such folder", "bad_json": f"{d}/config.json is not valid JSON",
            "nan": f"{d}/model.safetensors: tensor 'language_model.model.norm.weight' holds 1 NaN / 0 inf values"}
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith(f"error: {want[case]}"), r.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1



def test_bf16_load(tmp_path):
    m = _tiny()
    m.save_pretrained(str(tmp_path / "m"))
    m2 = LLaVA.from_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m2.parameters())
    ids, mask = _ids_with_images(m.num_image_tokens, [4], 64)
    with torch.no_grad():
        a, b = m(ids, _images(1, 16), mask), m2(ids, _images(1, 16), mask).float()
    assert (a - b).abs().max() < 0.1
