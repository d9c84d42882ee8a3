"""The fast paths (kernels.py) against the plain ones: the decode step against a full forward and
through torch.compile, the sampler (closed form; eager and compiled draw the same tokens), the fused
lm_head log-probs, the packed CPU linear, SDPA's causal fast path; plus bench.py's GPU check on CPU and
its FLOP count (tests/test_bench.py runs the bench itself). Compiles stay tiny (the CPU compiler is
slow): ~1 min in all."""
import gc
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
import model
from model import IMAGE_TOKEN_INDEX, LLaVA, ModelConfig
from helpers import _randomize

COMPILE_OK, WHY = kernels.compile_available()
needs_compile = pytest.mark.skipif(not COMPILE_OK, reason=f"torch.compile unavailable: {WHY}")


def _tiny(kv_heads=2, layers=2, seed=0, adapter=True):
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", vocab_size=64, image_size=16, patch_size=8, vision_hidden=32, vision_heads=2,
                             vision_intermediate=64, vision_layers=2, hidden=32, heads=4, kv_heads=kv_heads,
                             intermediate=48, layers=layers)
    m = LLaVA(cfg).eval()
    _randomize(m)
    with torch.no_grad():   # bigger weights than _randomize's: peaky logits, so that greedy has no near-ties
        for p in m.llm.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    if adapter:
        m.add_adapter("policy", r=4, alpha=8)
        with torch.no_grad():
            for p in m.adapter_parameters("policy"):
                p.normal_(0, 0.2)
        m.set_adapter("policy")
    return m


def _prompts(m, lengths, seed=0):
    """Left-padded [BOS, image, text] rows. -> ids, images, mask"""
    g = torch.Generator().manual_seed(seed)
    P = m.num_image_tokens
    rows = [[1] + [IMAGE_TOKEN_INDEX] * P + torch.randint(3, 60, (L,), generator=g).tolist() for L in lengths]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, torch.randn(len(rows), 3, 16, 16, generator=g), mask


class Recorder:
    """Wraps a decode_fn and keeps every step's logits."""

    def __init__(self, fn):
        self.fn, self.logits = fn, []

    def __call__(self, *args):
        out = self.fn(*args)
        self.logits.append(out.float().clone())
        return out


# --------------------------------------------------------------------------------------------------
def test_decode_steps_equal_a_full_forward():
    """Each cached decode step (attending over the whole preallocated cache, masked) gives the logits
    of a forward pass over prompt + tokens so far, without a cache."""
    m = _tiny()
    ids, x, mask = _prompts(m, [3, 7, 5])
    rec = Recorder(m.decode_one)
    out = m.generate(ids, x, mask, max_new_tokens=6, eos_token_id=-1, decode_fn=rec)
    full = torch.cat([ids, out], 1)
    fmask = torch.cat([mask, torch.ones_like(out)], 1)
    with torch.no_grad():
        want = m(full, x, fmask).float()[:, ids.shape[1]:-1]              # (B, 5, V): after each new token
    got = torch.stack(rec.logits, 1)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4
    assert torch.equal(out[:, 1:], want.argmax(-1))                     # greedy: each token the argmax


@needs_compile
def test_decode_attends_over_the_filled_cache_in_counted_spans():
    """Steps that cross a DECODE_SPAN boundary (the attention span grows from 64 slots to the whole cache:
    T + n slots eager, 128 in the compiled decoder's bucketed cache) still give the logits of a full forward without a cache, eager and compiled alike; the compiled
    decoder builds one graph per span (2 here), and none again."""
    torch._dynamo.reset()
    m = _tiny()
    ids, x, mask = _prompts(m, [50, 45], seed=3)
    T, n = ids.shape[1], 12
    assert T < model.DECODE_SPAN < T + n
    spans = []
    rec = Recorder(lambda tok, pos, cache, slot, kv: (spans.append(kv.shape[1]), m.decode_one(tok, pos, cache, slot, kv))[1])
    out = m.generate(ids, x, mask, max_new_tokens=n, eos_token_id=-1, decode_fn=rec)
    assert sorted(set(spans)) == [64, T + n]             # the eager cache is T + n slots long: the last span
    full, fmask = torch.cat([ids, out], 1), torch.cat([mask, torch.ones_like(out)], 1)
    with torch.no_grad():
        want = m(full, x, fmask).float()[:, T:-1]
    assert (torch.stack(rec.logits, 1) - want).abs().max() < 1e-4
    dec = kernels.static_decoder(m, compile=True)
    got = Recorder(dec)
    assert torch.equal(m.generate(ids, x, mask, max_new_tokens=n, eos_token_id=-1, compile=True, decode_fn=got), out)
    assert max((u - v).abs().max().item() for u, v in zip(rec.logits, got.logits)) < 1e-4
    assert dec.compiles == 2 and dec.recompiles == 0
    m.generate(ids, x, mask, max_new_tokens=n, eos_token_id=-1, compile=True)
    assert dec.compiles == 2 and dec.recompiles == 0


def test_compiled_decoder_may_hold_more_graphs_than_dynamos_default():
    """A long generation is one graph per span (896 new tokens: 15), more than dynamo's default limit of 8
    graphs per function, past which it would run the step eagerly: a compiled decoder raises the limit."""
    old = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 8
        kernels.StaticDecoder(_tiny(), compile=False)
        assert torch._dynamo.config.recompile_limit == 8         # eager: left alone
        kernels.StaticDecoder(_tiny(), compile=True)               # compiles nothing until called
        assert torch._dynamo.config.recompile_limit >= -(-(128 + 896) // model.DECODE_SPAN)
    finally:
        torch._dynamo.config.recompile_limit = old


def test_causal_fast_path_equals_explicit_mask():
    m = _tiny(adapter=False)
    ids, x, _ = _prompts(m, [6, 6])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        fast = m.hidden_states(ids, x, mask)                          # no padding: SDPA is_causal
        emb = m.embed(ids, x)
        slow = m.decode(emb, model.positions_from_mask(mask), model.attention_mask_4d(mask.bool()))
    assert model.causal_or_padded_mask(mask.bool()) is None
    assert (fast - slow).abs().max() < 1e-5


@needs_compile
def test_compiled_decode_equals_eager_and_never_recompiles():
    torch._dynamo.reset()
    m = _tiny()
    dec = kernels.static_decoder(m, compile=True)
    ids, x, mask = _prompts(m, [3, 8, 5])
    ref, got = Recorder(m.decode_one), Recorder(dec)
    a = m.generate(ids, x, mask, max_new_tokens=10, eos_token_id=-1, decode_fn=ref)
    b = m.generate(ids, x, mask, max_new_tokens=10, eos_token_id=-1, compile=True, decode_fn=got)
    assert torch.equal(a, b), "compiled greedy tokens differ from eager"
    assert len(got.logits) == 9
    assert max((u - v).abs().max().item() for u, v in zip(ref.logits, got.logits)) < 1e-4
    assert dec.compiles == 1 and dec.recompiles == 0     # one graph for all 9 steps
    # a second generation of another prompt length in the same cache bucket reuses the graph
    ids2, x2, mask2 = _prompts(m, [4, 6, 2], seed=1)
    c = m.generate(ids2, x2, mask2, max_new_tokens=10, eos_token_id=-1, compile=True)
    assert torch.equal(c, m.generate(ids2, x2, mask2, max_new_tokens=10, eos_token_id=-1))
    assert dec.compiles == 1 and dec.recompiles == 0
    # another adapter is another graph, compiled once, not a recompile
    m.set_adapter(None)
    d = m.generate(ids, x, mask, max_new_tokens=6, eos_token_id=-1, compile=True)
    assert torch.equal(d, m.generate(ids, x, mask, max_new_tokens=6, eos_token_id=-1))
    assert dec.compiles == 2 and dec.recompiles == 0


packed_ok = pytest.mark.skipif(not kernels.packed_cpu_linear_available(), reason="this torch build has no oneDNN")


@packed_ok
@pytest.mark.parametrize("bias", [True, False])
def test_packed_cpu_linear_equals_f_linear_and_follows_the_weight(bias):
    torch.manual_seed(0)
    lin = model.Linear(24, 40, bias=bias)
    x = torch.randn(5, 40, 24).transpose(0, 1)                   # (40, 5, 24), not contiguous
    ref = lambda: F.linear(x, lin.weight, lin.bias)
    assert not any(kernels._PACKED_CPU.values())
    with torch.no_grad(), kernels.packed_cpu_linear():
        assert (lin(x) - ref()).abs().max() < 1e-5
        assert lin.weight in kernels._PACKED                       # the packed path ran
        lin.weight.mul_(-2.0)                                    # in place (an optimizer step): repacked
        assert (lin(x) - ref()).abs().max() < 1e-5
        lin.weight.data = torch.randn(40, 24)                    # new storage: repacked
        assert (lin(x) - ref()).abs().max() < 1e-5
        lin.weight.data.mul_(3.0)        # invisible to the version counter: drop_packed_weights() says so
        kernels.drop_packed_weights()
        assert (lin(x) - ref()).abs().max() < 1e-5
        with torch.inference_mode():                             # no version counter: plain F.linear
            inf = model.Linear(24, 40, bias=bias)
        assert torch.equal(inf(x), F.linear(x, inf.weight, inf.bias))
    assert not any(kernels._PACKED_CPU.values())                   # the block restored the setting
    # with autograd the plain path runs, gradients included
    with kernels.packed_cpu_linear():
        xg = x.detach().requires_grad_(True)
        lin(xg).square().sum().backward()
    xr = x.detach().requires_grad_(True)
    F.linear(xr, lin.weight, lin.bias).square().sum().backward()
    assert torch.equal(xg.grad, xr.grad)
    n = len(kernels._PACKED)
    lin = None
    gc.collect()
    assert len(kernels._PACKED) == n - 1                           # the packed copy goes with its weight


@needs_compile
@packed_ok
def test_compiled_generation_follows_full_weight_updates():
    """Rollouts after an optimizer step on the base weights (full fine-tuning) use the new weights: the
    compiled graph takes them as inputs and their packed copies are made again."""
    torch._dynamo.reset()
    m = _tiny(adapter=False)
    ids, x, mask = _prompts(m, [3, 6])
    a = m.generate(ids, x, mask, max_new_tokens=6, eos_token_id=-1, compile=True)
    assert torch.equal(a, m.generate(ids, x, mask, max_new_tokens=6, eos_token_id=-1))
    opt = torch.optim.SGD(m.parameters(), lr=50.0)
    m.train()
    lp = model.token_logprobs(m.hidden_states(ids, x, mask)[:, :-1], m.lm_head.weight, ids[:, 1:])
    (-lp[(ids[:, 1:] >= 0) & mask[:, 1:].bool()].sum()).backward()
    opt.step()
    m.eval()
    b = m.generate(ids, x, mask, max_new_tokens=6, eos_token_id=-1, compile=True)
    assert not torch.equal(a, b), "the step should change the greedy tokens"
    assert torch.equal(b, m.generate(ids, x, mask, max_new_tokens=6, eos_token_id=-1))


def test_sampler_draws_from_the_nucleus():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(p).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    tok, lp = model.sample_next(logits, 1.0, 1.0, g)
    assert (torch.bincount(tok, minlength=4).float() / 4000 - p).abs().max() < 0.03
    assert torch.allclose(lp, torch.log(p)[tok], atol=1e-6)        # log-probs under the full softmax
    # top_p 0.7: the nucleus is {0, 1} (0.5 < 0.7 <= 0.8), drawn in proportion 0.5 : 0.3
    tok, _ = model.sample_next(logits, 1.0, 0.7, g)
    freq = torch.bincount(tok, minlength=4).float() / 4000
    assert set(tok.tolist()) == {0, 1} and abs(freq[0] - 0.5 / 0.8) < 0.03
    # temperature 2 flattens p to p^(1/2), normalised
    tok, _ = model.sample_next(logits, 2.0, 1.0, g)
    q = p.sqrt() / p.sqrt().sum()
    assert (torch.bincount(tok, minlength=4).float() / 4000 - q).abs().max() < 0.03
    tok, lp = model.sample_next(logits[:3], 0.0, 0.5, g)              # greedy: argmax, raw log-probs
    assert tok.tolist() == [0, 0, 0] and torch.allclose(lp, torch.log(p[0]).expand(3))


@needs_compile
def test_compiled_sampling_draws_what_eager_draws():
    logits = torch.randn(3, 50)
    noise = torch.empty(3, 50).exponential_(generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model.pick_token, fullgraph=True, dynamic=False)
    for t, p in ((1.0, 1.0), (0.7, 0.9)):
        a, b = model.pick_token(logits, noise, t, p), compiled(logits, noise, t, p)
        assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() < 1e-5
    # whole generations: eager and compiled give the same tokens from the same generator seed
    torch._dynamo.reset()
    m = _tiny(layers=1)
    ids, x, mask = _prompts(m, [3, 5])
    run = lambda comp: m.generate(ids, x, mask, max_new_tokens=6, temperature=1.0, top_p=0.9, compile=comp,
                                  generator=torch.Generator().manual_seed(3), return_logprobs=True)
    (t1, l1), (t2, l2), (t3, l3) = run(False), run(True), run(True)
    assert torch.equal(t1, t2) and (l1 - l2).abs().max() < 1e-4
    assert torch.equal(t2, t3) and torch.equal(l2, l3)
    assert (l1 <= 0).all()
    dec = kernels.static_decoder(m)
    assert dec.recompiles == 0


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_logprobs_equal_plain(temperature):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 0.3).requires_grad_()
    tgt = torch.randint(0, 50, (3, 7))
    tgt[0, :2] = -100                                                  # ignored positions: any value, no error
    a = model.token_logprobs(h, w, tgt, chunk=5, temperature=temperature, with_entropy=True)
    b = model.token_logprobs(h, w, tgt, chunk=5, temperature=temperature, with_entropy=True, fused=True)
    z = (h @ w.T) / temperature                                         # the reference: full logits
    ref = torch.log_softmax(z, -1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    ref_ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    for lp, ent in (a, b):
        assert (lp - ref).abs().max() < 1e-5 and (ent - ref_ent).abs().max() < 1e-5
    assert (a[0] - b[0]).abs().max() < 1e-5 and (a[1] - b[1]).abs().max() < 1e-5
    c1, c2 = torch.randn(3, 7), torch.randn(3, 7)
    loss = lambda lp, ent: (lp * c1).sum() + (ent * c2).sum()
    ga, gb, gr = (torch.autograd.grad(loss(*o), (h, w)) for o in (a, b, (ref, ref_ent)))
    for u, v, r in zip(ga, gb, gr):
        assert (u - v).abs().max() < 1e-5 and (u - r).abs().max() < 1e-5 and (v - r).abs().max() < 1e-5
    lp = model.token_logprobs(h, w, tgt, chunk=4, fused=True)          # log-probs only
    assert torch.allclose(lp, model.token_logprobs(h, w, tgt, chunk=4), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(model.token_logprobs(h, w, tgt, temperature=temperature, fused=True), ref, atol=1e-5)


# --------------------------------------------------------------------------------------------------
def _with_threads(fn):
    n = torch.get_num_threads()
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


def test_gpu_check_code_path_on_cpu_and_clear_error_without_cuda(capsys):
    import bench
    _with_threads(lambda: bench.main(["--gpu-check", "--cpu-dry-run", "--no-compile", "--threads", "1"]))
    out = capsys.readouterr().out
    assert "decode B=1" in out and "decode B=4" in out and "train fwd+bwd" in out and "FAILED" not in out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bench.main(["--gpu-check"])


def test_flop_accounting_matches_a_hand_count():
    import bench
    c = bench.CPU_MODEL
    per_layer = 4 * 512 * 512 + 3 * 512 * 1376
    assert bench._llm_layer_params(c) == per_layer
    # forward over 10 tokens, lm_head on 2 rows: 2 FLOPs per multiply-add
    want = 2 * 8 * per_layer * 10 + 2 * 8 * 10 * 10 * 512 + 2 * 32064 * 512 * 2
    assert bench.llm_forward_flops(c, 1, 10, 2) == want
    assert math.isclose(bench.train_flops(c, 1, 10, 2, images=False), 3 * want)


@pytest.mark.parametrize("official", [False, True])
def test_ppo_update_flops_match_torch_flop_counter(official):
    """bench.ppo_update_flops against torch's FlopCounterMode counting one epoch of real passes: ppo.update's
    (the lm_head on the response rows) or the official way's (full logits). CPU SDPA is not counted by the
    counter, nor is there an image here (the vision tower term is the official way's alone): both taken out
    of the formula by hand. The plain token_logprobs recomputes its chunk of logits in backward, a forward
    of the lm_head the formula does not need and the counter sees."""
    import bench
    import ppo
    from torch.utils.flop_counter import FlopCounterMode
    c = ModelConfig(image_size=16, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                    vision_intermediate=64, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96,
                    vocab_size=128, max_seq_len=64)
    torch.manual_seed(0)
    m = LLaVA(c)
    m.requires_grad_(False)
    r = 4
    for name in ("policy", "value"):
        m.add_adapter(name, r=r, alpha=8)
        for p in m.adapter_parameters(name):
            p.requires_grad_(True)
    vh = model.ScalarHead(c.hidden)
    B, P, R = 2, 11, 5
    T = P + R
    ids = torch.randint(3, c.vocab_size, (B, T))
    batch = {"ids": ids, "images": None, "mask": torch.ones(B, T, dtype=torch.long), "P": P, "resp": ids[:, P:]}
    with FlopCounterMode(display=False) as fc:
        if official:
            m.set_adapter("policy")
            logits = m(ids, None, batch["mask"])[:, P - 1:-1]                  # (B, R, V) of all (B, T, V)
            torch.log_softmax(logits.float(), -1).gather(-1, batch["resp"][..., None]).sum().backward()
        else:
            lp = model.token_logprobs(ppo.forward_response(m, "policy", batch), m.lm_head.weight, batch["resp"])
            lp.sum().backward()
        vh(ppo.forward_response(m, "value", batch)).sum().backward()
    attn = 2 * c.layers * B * T * T * c.hidden                                  # causal QK^T and PV, one pass
    want = bench.ppo_update_flops(c, B, T, R, r, epochs=1, official=official) - 2 * 3 * attn
    if official:
        want -= 2 * bench.vision_flops(c, B)
    else:
        want += 2 * c.vocab_size * c.hidden * B * R                              # the checkpointed chunk's recompute
    want += 3 * 2 * c.hidden * B * R                                             # the value head: forward, 2 grads
    assert fc.get_total_flops() == pytest.approx(want, rel=1e-9)
