"""The fast paths of model.py against the plain ones: the static-cache decode step (eager and through
torch.compile), the compiled sampler, the fused lm_head log-prob / cross-entropy, SDPA's causal fast
path; plus smoke runs of bench.py. Compiles stay tiny (the CPU compiler is slow): ~1 min in all."""
import gc
import math

import pytest
import torch
import torch.nn.functional as F

import model
from model import IMAGE_TOKEN_INDEX, LLaVA, ModelConfig
from helpers import _randomize

COMPILE_OK, WHY = model.compile_available()
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
def test_static_step_eager_equals_decode_one():
    m = _tiny()
    ids, x, mask = _prompts(m, [3, 7, 5])
    ref, dec = Recorder(m.decode_one), model.StaticDecoder(m, compile=False)
    got = Recorder(dec)
    a, lpa = m.generate(ids, x, mask, max_new_tokens=9, eos_token_id=-1, return_logprobs=True, decode_fn=ref)
    b, lpb = m.generate(ids, x, mask, max_new_tokens=9, eos_token_id=-1, return_logprobs=True, decode_fn=got)
    assert torch.equal(a, b)
    assert max((u - v).abs().max().item() for u, v in zip(ref.logits, got.logits)) < 1e-5
    assert (lpa - lpb).abs().max() < 1e-5


def test_causal_fast_path_equals_explicit_mask():
    m = _tiny(adapter=False)
    ids, x, _ = _prompts(m, [6, 6])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        fast = m.hidden_states(ids, x, mask)                          # no padding: SDPA is_causal
        emb = m.embed(ids, x)
        slow = m.decode(emb, model.positions_from_mask(mask), model.attention_mask_4d(mask.bool(), ids.shape[1], 0))
    assert model.causal_or_padded_mask(mask.bool()) is None
    assert (fast - slow).abs().max() < 1e-5


@needs_compile
def test_compiled_decode_equals_eager_and_never_recompiles():
    torch._dynamo.reset()
    m = _tiny()
    dec = m.static_decoder(compile=True)
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


packed_ok = pytest.mark.skipif(not model.packed_cpu_linear_available(), reason="this torch build has no oneDNN")


@packed_ok
@pytest.mark.parametrize("bias", [True, False])
def test_packed_cpu_linear_equals_f_linear_and_follows_the_weight(bias):
    torch.manual_seed(0)
    lin = model.Linear(24, 40, bias=bias)
    x = torch.randn(5, 40, 24).transpose(0, 1)                   # (40, 5, 24), not contiguous
    ref = lambda: F.linear(x, lin.weight, lin.bias)
    assert not model._PACKED_CPU["on"]
    with torch.no_grad(), model.packed_cpu_linear():
        assert (lin(x) - ref()).abs().max() < 1e-5
        assert lin.weight in model._PACKED                       # the packed path ran
        lin.weight.mul_(-2.0)                                    # in place (an optimizer step): repacked
        assert (lin(x) - ref()).abs().max() < 1e-5
        lin.weight.data = torch.randn(40, 24)                    # new storage: repacked
        assert (lin(x) - ref()).abs().max() < 1e-5
        lin.weight.data.mul_(3.0)        # invisible to the version counter: drop_packed_weights() says so
        model.drop_packed_weights()
        assert (lin(x) - ref()).abs().max() < 1e-5
        with torch.inference_mode():                             # no version counter: plain F.linear
            inf = model.Linear(24, 40, bias=bias)
        assert torch.equal(inf(x), F.linear(x, inf.weight, inf.bias))
    assert not model._PACKED_CPU["on"]                           # the block restored the setting
    # with autograd the plain path runs, gradients included
    with model.packed_cpu_linear():
        xg = x.detach().requires_grad_(True)
        lin(xg).square().sum().backward()
    xr = x.detach().requires_grad_(True)
    F.linear(xr, lin.weight, lin.bias).square().sum().backward()
    assert torch.equal(xg.grad, xr.grad)
    n = len(model._PACKED)
    lin = None
    gc.collect()
    assert len(model._PACKED) == n - 1                           # the packed copy goes with its weight


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
    m.lm_loss(ids, x, mask, ids.masked_fill(ids < 0, -100)).backward()
    opt.step()
    m.eval()
    b = m.generate(ids, x, mask, max_new_tokens=6, eos_token_id=-1, compile=True)
    assert not torch.equal(a, b), "the step should change the greedy tokens"
    assert torch.equal(b, m.generate(ids, x, mask, max_new_tokens=6, eos_token_id=-1))


def test_sample_from_noise_draws_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    noise = torch.empty(4000, 4).exponential_(generator=g)
    tok, lp = model.sample_from_noise(logits, noise, 1.0, 1.0)
    freq = torch.bincount(tok, minlength=4).float() / 4000
    assert (freq - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.03
    assert torch.allclose(lp, torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[tok], atol=1e-6)
    tok, _ = model.sample_from_noise(logits, noise, 1.0, 0.7)
    assert set(tok.tolist()) == {0, 1}


@needs_compile
def test_compiled_sampling_matches_eager_and_is_seeded():
    logits = torch.randn(3, 50)
    noise = torch.empty(3, 50).exponential_(generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model.sample_from_noise, fullgraph=True, dynamic=False)
    for t, p in ((1.0, 1.0), (0.7, 0.9)):
        a, b = model.sample_from_noise(logits, noise, t, p), compiled(logits, noise, t, p)
        assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() < 1e-5
    m = _tiny(layers=1)
    ids, x, mask = _prompts(m, [3, 5])
    run = lambda: m.generate(ids, x, mask, max_new_tokens=6, temperature=1.0, top_p=0.9, compile=True,
                             generator=torch.Generator().manual_seed(3), return_logprobs=True)
    (t1, l1), (t2, l2) = run(), run()
    assert torch.equal(t1, t2) and torch.equal(l1, l2)
    assert (l1 <= 0).all()


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_logprobs_equal_token_logprobs(temperature):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 0.3).requires_grad_()
    tgt = torch.randint(0, 50, (3, 7))
    a = model.token_logprobs(h, w, tgt, chunk=5, temperature=temperature, with_entropy=True)
    b = model.fused_token_logprobs(h, w, tgt, chunk=5, temperature=temperature, with_entropy=True)
    assert (a[0] - b[0]).abs().max() < 1e-5 and (a[1] - b[1]).abs().max() < 1e-5
    c1, c2 = torch.randn(3, 7), torch.randn(3, 7)
    ga = torch.autograd.grad((a[0] * c1).sum() + (a[1] * c2).sum(), (h, w))
    gb = torch.autograd.grad((b[0] * c1).sum() + (b[1] * c2).sum(), (h, w))
    for u, v in zip(ga, gb):
        assert (u - v).abs().max() < 1e-5
    lp = model.fused_token_logprobs(h, w, tgt, chunk=4)               # log-probs only
    assert torch.allclose(lp, model.token_logprobs(h, w, tgt, chunk=4), atol=1e-6)


def test_linear_cross_entropy_equals_cross_entropy():
    torch.manual_seed(0)
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = (torch.randn(40, 16) * 0.3).requires_grad_()
    tgt = torch.randint(0, 40, (2, 9))
    tgt[0, :4] = -100
    want = F.cross_entropy((h @ w.T).reshape(-1, 40), tgt.reshape(-1), ignore_index=-100)
    got = model.linear_cross_entropy(h, w, tgt, chunk=5)
    assert abs(want.item() - got.item()) < 1e-6
    g1 = torch.autograd.grad(3.0 * want, (h, w))
    g2 = torch.autograd.grad(3.0 * got, (h, w))
    for u, v in zip(g1, g2):
        assert (u - v).abs().max() < 1e-6
    every = model.linear_cross_entropy(h, w, tgt, chunk=4, select_rows=False)    # all rows, ignored ones weigh 0
    assert abs(every.item() - want.item()) < 1e-6
    for u, v in zip(g1, torch.autograd.grad(3.0 * every, (h, w))):
        assert (u - v).abs().max() < 1e-6
    with torch.no_grad():
        assert abs(model.linear_cross_entropy(h, w, tgt).item() - want.item()) < 1e-6
    empty = model.linear_cross_entropy(h, w, torch.full_like(tgt, -100))
    assert empty.item() == 0.0 and empty.requires_grad


def test_lm_loss_equals_logits_cross_entropy():
    m = _tiny(adapter=False).train()
    ids, x, mask = _prompts(m, [4, 9])
    labels = ids.masked_fill((ids == IMAGE_TOKEN_INDEX) | (mask == 0), -100)
    loss = m.lm_loss(ids, x, mask, labels)
    logits = m(ids, x, mask)[:, :-1]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(loss.item() - want.item()) < 1e-5
    params = [p for p in m.llm.parameters()] + [m.lm_head.weight]
    g1 = torch.autograd.grad(loss, params)
    g2 = torch.autograd.grad(want, params)
    assert max((u - v).abs().max().item() for u, v in zip(g1, g2)) < 1e-5


# --------------------------------------------------------------------------------------------------
def _with_threads(fn):
    n = torch.get_num_threads()
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


def test_bench_quick_runs_and_prints_the_table():
    pytest.importorskip("transformers")
    import bench
    out = _with_threads(lambda: bench.main(["--quick", "--no-compile", "--threads", "1", "--iters", "1"]))
    for row in ("generate B=2", "decode steps only", "tokens identical to transformers: yes",
                "train step fwd+bwd", "PPO step: generation", "PPO step: scoring", "PPO step: update", "ceiling",
                "hardware ceiling (100% of peak)"):
        assert row in out, row
    assert "ours eager" in out and "transformers" in out


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
