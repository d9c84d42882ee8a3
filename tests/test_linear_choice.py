"""The CPU linear path chosen per machine by a one-time measurement (kernels.cpu_linear_plan): the
decision from injected timings (no real timing decides anything here), the on-disk cache and its key, the
environment override, and that what a model computes does not depend on the path chosen."""
import json
import math

import pytest
import torch

import kernels
from model import IMAGE_TOKEN_INDEX, LLaVA, ModelConfig
from helpers import _randomize

packed_ok = pytest.mark.skipif(not kernels.packed_cpu_linear_available(), reason="this torch build has no oneDNN")

SHAPES = {(96, 32): 3, (32, 96): 1, (512, 32): 1}     # (out, in) -> layers of that shape


@pytest.fixture
def auto(monkeypatch, tmp_path):
    """Measuring switched on (conftest pins the path for the other tests), the cache in tmp_path, the
    in-process memory of plans empty, every linear back to F.linear afterwards."""
    monkeypatch.setenv("LLAVA_RLHF_CPU_LINEAR", "auto")
    monkeypatch.setattr(kernels, "_PLANS", {})
    path = tmp_path / "cache" / "cpu_linear.json"
    monkeypatch.setenv("LLAVA_RLHF_LINEAR_CACHE", str(path))
    yield path
    kernels.use_packed_cpu_linear(False)
    kernels.drop_packed_weights()


class FakeTimer:
    """timer(path, rows, out, in) -> seconds from a formula, recording each call: packed takes
    `packed_factor[class]` x MKL's time, MKL's time is rows x out x in x 1e-12."""

    def __init__(self, packed_factor):
        self.packed_factor, self.calls = packed_factor, []

    def __call__(self, path, rows, out_f, in_f):
        self.calls.append((path, rows, out_f, in_f))
        t = rows * out_f * in_f * 1e-12
        return t * self.packed_factor[kernels.shape_class(rows)] if path == "packed" else t


def _refuse(*args):
    raise AssertionError("measured again although the choice is cached")


def test_choose_linear_path_weighs_each_shape_by_its_layers():
    counts = {(4, 2): 3, (8, 2): 1}
    # mkl: 3 x 1.0 + 1 x 4.0 = 7.0; packed: 3 x 2.0 + 1 x 0.5 = 6.5 (7% less): packed
    times = {"mkl": {(4, 2): 1.0, (8, 2): 4.0}, "packed": {(4, 2): 2.0, (8, 2): 0.5}}
    assert kernels.choose_linear_path(times, counts) == "packed"
    # the same times without the layer counts (1 each): mkl 5.0 vs packed 2.5
    assert kernels.choose_linear_path(times, {(4, 2): 1, (8, 2): 1}) == "packed"
    # three times as many small layers: mkl 3 x 3 + 4 = 13, packed 3 x 6 + 0.5 = 18.5: mkl
    assert kernels.choose_linear_path(times, {(4, 2): 9, (8, 2): 1}) == "mkl"


def test_packed_must_win_by_the_margin():
    times = lambda f: {"mkl": {(4, 2): 1.0}, "packed": {(4, 2): f}}   # noqa: E731
    assert kernels.choose_linear_path(times(0.94), {(4, 2): 1}, margin=0.05) == "packed"
    assert kernels.choose_linear_path(times(0.96), {(4, 2): 1}, margin=0.05) == "mkl"   # 4% faster: not worth a copy
    assert kernels.choose_linear_path(times(0.96), {(4, 2): 1}, margin=0.0) == "packed"
    assert kernels.choose_linear_path(times(1.0), {(4, 2): 1}, margin=0.0) == "mkl"       # a tie keeps F.linear


@packed_ok
def test_plan_per_shape_class_from_fake_timings(auto):
    timer = FakeTimer({"decode": 0.5, "prefill": 1.3})   # packed wins the few-row GEMMs, loses the big ones
    plan = kernels.cpu_linear_plan(SHAPES, decode_rows=5, timer=timer)
    assert (plan["decode"], plan["prefill"]) == ("packed", "mkl")
    assert plan["source"] == {"decode": "measured", "prefill": "measured"}
    # every shape on both paths, decode at the batch rounded up to a power of two, prefill at PREFILL_ROWS
    want = {(p, r, o, i) for p in ("mkl", "packed") for r in (8, kernels.PREFILL_ROWS) for (o, i) in SHAPES}
    assert set(timer.calls) == want and len(timer.calls) == len(want)
    mkl_ms = 1e3 * sum(n * 8 * o * i * 1e-12 for (o, i), n in SHAPES.items())
    assert math.isclose(plan["ms"]["decode"]["mkl"], mkl_ms) and math.isclose(plan["ms"]["decode"]["packed"], mkl_ms / 2)
    # batches past DECODE_ROWS are timed at DECODE_ROWS; prefill rows stay above it
    timer = FakeTimer({"decode": 2.0, "prefill": 0.5})
    plan = kernels.cpu_linear_plan(SHAPES, decode_rows=1000, prefill_rows=10, timer=timer)
    assert (plan["decode"], plan["prefill"]) == ("mkl", "packed")
    assert {c[1] for c in timer.calls} == {kernels.DECODE_ROWS, kernels.DECODE_ROWS + 1}


@packed_ok
def test_plan_cache_round_trip_and_key(auto, monkeypatch):
    plan = kernels.cpu_linear_plan(SHAPES, decode_rows=8, timer=FakeTimer({"decode": 0.5, "prefill": 0.5}))
    assert (plan["decode"], plan["prefill"]) == ("packed", "packed")
    doc = json.loads(auto.read_text())
    assert len(doc) == 2                                           # one entry per shape class
    for key, entry in doc.items():
        assert kernels.cpu_model() in key and f"torch {torch.__version__}" in key
        assert f"threads {torch.get_num_threads()}" in key and "96x32*3" in key
        assert entry["path"] == "packed"
    # the same process: from memory; a new process (memory empty): from the file, no timing
    again = kernels.cpu_linear_plan(SHAPES, decode_rows=8, timer=_refuse)
    monkeypatch.setattr(kernels, "_PLANS", {})
    from_file = kernels.cpu_linear_plan(SHAPES, decode_rows=7, timer=_refuse)   # 7 rounds up to 8: same key
    for p in (again, from_file):
        assert (p["decode"], p["prefill"]) == ("packed", "packed")
        assert p["source"] == {"decode": "cache", "prefill": "cache"} and p["ms"] == plan["ms"]
    # another CPU (or torch, threads, shapes) is another key: measured again, both kept in the file
    monkeypatch.setattr(kernels, "_PLANS", {})
    monkeypatch.setattr(kernels, "cpu_model", lambda: "Another CPU 9000")
    other = kernels.cpu_linear_plan(SHAPES, decode_rows=8, timer=FakeTimer({"decode": 3.0, "prefill": 3.0}))
    assert (other["decode"], other["prefill"]) == ("mkl", "mkl") and other["source"]["decode"] == "measured"
    assert len(json.loads(auto.read_text())) == 4
    monkeypatch.setattr(kernels, "_PLANS", {})
    changed = {**SHAPES, (7, 7): 1}
    timer = FakeTimer({"decode": 0.5, "prefill": 0.5})
    kernels.cpu_linear_plan(changed, decode_rows=8, timer=timer)
    assert timer.calls                                               # new shapes: measured


@packed_ok
def test_unreadable_cache_is_measured_again_and_rewritten(auto):
    auto.parent.mkdir(parents=True)
    auto.write_text("{not json")
    plan = kernels.cpu_linear_plan(SHAPES, timer=FakeTimer({"decode": 0.5, "prefill": 2.0}))
    assert plan["source"] == {"decode": "measured", "prefill": "measured"}
    assert sorted(e["path"] for e in json.loads(auto.read_text()).values()) == ["mkl", "packed"]


def test_environment_sets_the_path_without_measuring(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAVA_RLHF_LINEAR_CACHE", str(tmp_path / "c.json"))
    for force in ("mkl", "packed", " MKL "):
        monkeypatch.setenv("LLAVA_RLHF_CPU_LINEAR", force)
        plan = kernels.cpu_linear_plan(SHAPES, timer=_refuse)
        want = force.strip().lower() if kernels.packed_cpu_linear_available() else "mkl"
        assert (plan["decode"], plan["prefill"]) == (want, want) and plan["source"]["decode"] == "env"
    assert not (tmp_path / "c.json").exists()
    monkeypatch.setenv("LLAVA_RLHF_CPU_LINEAR", "fastest")
    with pytest.raises(ValueError, match="auto, mkl or packed"):
        kernels.cpu_linear_plan(SHAPES, timer=_refuse)


def test_linear_shapes_counts_the_models_linears():
    cfg = ModelConfig.preset("tiny", vocab_size=64, image_size=16, patch_size=8, vision_hidden=32, vision_heads=2,
                             vision_intermediate=48, vision_layers=1, hidden=24, heads=4, kv_heads=2,
                             intermediate=40, layers=2, projector="mlp2x_gelu")
    shapes = kernels.linear_shapes(LLaVA(cfg))
    kv = 2 * 24 // 4
    want = {(24, 24): 2 * 2,                      # q_proj, o_proj per LLM layer
            (kv, 24): 2 * 2,                      # k_proj, v_proj (grouped)
            (40, 24): 2 * 2, (24, 40): 2,         # gate, up; down
            (64, 24): 1,                          # lm_head
            (32, 32): 4 * 1,                      # vision q, k, v, out
            (48, 32): 1, (32, 48): 1,             # vision MLP
            (24, 32): 1}                          # projector, first linear
    want[(24, 24)] += 1                           # projector, second linear (mlp2x_gelu)
    assert shapes == want


@packed_ok
def test_time_linear_runs_both_paths():
    for path in ("mkl", "packed"):
        t = kernels.time_linear(path, 4, 16, 8, min_seconds=1e-4)
        assert math.isfinite(t) and t > 0
    with pytest.raises(ValueError, match="unknown linear path"):
        kernels.time_linear("cublas", 4, 16, 8)


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=64, image_size=16, patch_size=8, vision_hidden=32, vision_heads=2,
                             vision_intermediate=64, vision_layers=2, hidden=32, heads=4, kv_heads=2,
                             intermediate=48, layers=2)
    m = LLaVA(cfg).eval()
    _randomize(m)
    with torch.no_grad():   # peaky logits: greedy has no near-ties
        for p in m.llm.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.full((3, m.num_image_tokens), IMAGE_TOKEN_INDEX),
                     torch.randint(3, 60, (3, 30), generator=g)], 1)              # (3, 35): 105 prefill rows
    return m, ids, torch.randn(3, 3, 16, 16, generator=g)


@packed_ok
@pytest.mark.parametrize("decode,prefill", [(False, False), (True, False), (False, True), (True, True)])
def test_outputs_do_not_depend_on_the_path_chosen(decode, prefill):
    """Whatever a plan picks per class, greedy tokens equal the plain path's and the log-probs and the
    forward's logits agree to fp32 rounding; and each class runs the path its plan says."""
    m, ids, x = _model()
    kernels.drop_packed_weights()
    with torch.no_grad():
        want_logits = m(ids, x)
        want_toks, want_lp = m.generate(ids, x, max_new_tokens=6, eos_token_id=-1, return_logprobs=True)
        plan = {"decode": decode, "prefill": prefill}
        with kernels.packed_cpu_linear(plan):
            assert kernels._PACKED_CPU == plan
            down = m.llm.layers[0].mlp.down_proj
            logits = m(ids, x)                                   # 105 rows per LLM linear: the prefill class
            assert (down.weight in kernels._PACKED) == prefill
            kernels.drop_packed_weights()
            down(torch.randn(3, 1, 48))                          # 3 rows: the decode class
            assert (down.weight in kernels._PACKED) == decode
            toks, lp = m.generate(ids, x, max_new_tokens=6, eos_token_id=-1, return_logprobs=True)
    assert not any(kernels._PACKED_CPU.values())
    kernels.drop_packed_weights()
    assert torch.equal(toks, want_toks)
    assert torch.allclose(lp, want_lp, atol=1e-4)
    assert torch.allclose(logits, want_logits, atol=1e-4, rtol=1e-4)


@packed_ok
def test_cpu_linear_applies_the_measured_plan(auto, monkeypatch):
    """kernels.cpu_linear (what generate(compile=True) and ppo.py use) measures the model's own linear
    shapes at its batch and switches each class as measured; outputs equal the plain path's."""
    m, ids, x = _model()
    timer = FakeTimer({"decode": 0.5, "prefill": 2.0})
    monkeypatch.setattr(kernels, "time_linear", timer)
    with torch.no_grad():
        want = m.generate(ids, x, max_new_tokens=5, eos_token_id=-1)
        with kernels.cpu_linear(m, 3):
            assert kernels._PACKED_CPU == {"decode": True, "prefill": False}
            got = m.generate(ids, x, max_new_tokens=5, eos_token_id=-1)
        assert not any(kernels._PACKED_CPU.values())
        assert {(o, i) for _, _, o, i in timer.calls} == set(kernels.linear_shapes(m))
        assert {c[1] for c in timer.calls} == {4, kernels.PREFILL_ROWS}
        n = len(timer.calls)
        with kernels.cpu_linear(m, 3, enable=False):
            assert not any(kernels._PACKED_CPU.values())
        with kernels.cpu_linear(m, 4):
            pass
        assert len(timer.calls) == n                              # batch 3 and 4 share the decode rows: cached
    assert torch.equal(got, want)
