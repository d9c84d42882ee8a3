"""ppo.py: GAE, whitening, clipped losses, reward shaping and symbolic terms against direct computations;
a toy PPO run that learns; exact resume; torchrun equivalence; the Fact-RM path."""
import json
import math
import os

import pytest
import torch

import common
from helpers import torchrun
import ppo


def _ragged(B=5, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [T, 1, 4, 0, 7][:B]
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_direct_recursion(gamma, lam):
    rewards, values, mask = _ragged()
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        # direct definition: A_t = sum_k (gamma lam)^k delta_{t+k}, V after the last real token = 0
        v = values[b, :n].tolist() + [0.0]
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            want = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert abs(adv[b, t].item() - want) < 1e-5
            assert abs(ret[b, t].item() - (want + v[t])) < 1e-5
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, 9.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    real = torch.tensor([1.0, 2.0, 3.0, 5.0])
    want = (real - real.mean()) / torch.sqrt(real.var() + 1e-8)
    w = ppo.whiten(x, mask)
    assert torch.allclose(w[mask.bool()], want, atol=1e-6) and (w[~mask.bool()] == 0).all()
    w2 = ppo.whiten(x, mask, shift_mean=False)
    assert torch.allclose(w2[mask.bool()], want + real.mean(), atol=1e-6)


def test_policy_loss_clipping_both_sides():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0, 5.0]])
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 9.0]])          # > 1+clip, < 1-clip, for A > 0 and A < 0
    old = torch.zeros(1, 5)
    logp = torch.log(ratio)
    loss, st = ppo.policy_loss(logp, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): A=2,r=1.5 -> max(-3,-2.4)=-2.4 (clipped); A=2,r=.5 -> max(-1,-1.6)=-1;
    # A=-1,r=.5 -> max(.5,.8)=.8 (clipped); A=-1,r=1.5 -> max(1.5,1.2)=1.5
    assert abs(loss.item() - (-2.4 - 1.0 + 0.8 + 1.5) / 4) < 1e-6
    assert abs(st["clipfrac"] - 0.5) < 1e-6
    lp = logp.clone().requires_grad_(True)
    ppo.policy_loss(lp, old, adv, mask, clip=0.2)[0].backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 2] == 0 and lp.grad[0, 1] != 0 and lp.grad[0, 4] == 0


def test_value_loss():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0, 0.5, 3.0]])
    old = torch.tensor([[0.5, 0.0, 0.0, 0.0]])
    ret = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss, _ = ppo.value_loss(v, old, ret, mask, clip=0.2)
    # token 0: v-R=1 -> 1; clipped v = .7 -> .49; max 1. token 1: 1 and 1 -> 1. token 2: (.5-1)^2=.25, clipped .2 -> .64
    assert abs(loss.item() - 0.5 * (1.0 + 1.0 + 0.64) / 3) < 1e-6


def test_shaped_rewards_kl_clamp_and_placement():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-1.0, -1.0, -1.0, -1.0], [-3.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0, -9.0], [-2.0, -1.0, -1.0, -1.0], [-1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    score = torch.tensor([2.0, -1.0, 0.5])
    r, st = ppo.shaped_rewards(score, logp, ref, mask, kl_coef=0.1)
    want = torch.tensor([[-0.05, 0.0, -0.05 + 2.0, 0.0], [-0.1, 0.0, 0.0, -1.0], [0.5, 0.0, 0.0, 0.0]])
    assert torch.allclose(r, want, atol=1e-6), r
    assert torch.allclose(st["kl"], torch.tensor([1.0, 1.0, 0.0]))
    r3, _ = ppo.shaped_rewards(score, logp, ref, mask, kl_coef=0.1, estimator="k3")
    d = ref[0, 1] - logp[0, 1]
    assert abs(r3[0, 1].item() + 0.1 * (math.exp(d) - d - 1)) < 1e-6


def test_symbolic_terms():
    recs = [{"answer_type": "multiple_choice", "answer": "B"}, {"answer_type": "multiple_choice", "answer": "B"},
            {"answer_type": "multiple_choice", "answer": "C"}, {"answer_type": "yes_no", "answer": "no"},
            {"answer_type": "yes_no", "answer": "no"}, {"answer_type": "yes_no", "answer": "yes"},
            {"answer_type": "general", "answer": "x", "length_multiplier": 2.0}]
    texts = ["B. The circle is red.", "I think the correct option is B.", "A. No.", "No, there is none.",
             "Yes, there is.", "Yes.", "B. Whatever"]
    st = ppo.symbolic_rewards(texts, [True, True, False, True, True, True, True], [10, 20, 30, 40, 50, 60, 448], recs)
    assert st["correct"].tolist() == [2.0, 2.0, 0.0, 1.0, -1.0, 0.0, 0.0]
    assert st["no_eos"].tolist() == [0.0, 0.0, -8.0, 0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(st["length"], torch.tensor([-10 * n / 896 for n in (10, 20, 30, 40, 50, 60)] + [-10.0]))


def test_response_mask():
    resp = torch.tensor([[5, 6, 2, 0], [5, 5, 5, 5], [2, 0, 0, 0]])
    m, has = ppo.response_mask(resp, 2)
    assert m.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]] and has.tolist() == [True, False, True]


# --------------------------------------------------------------------------------------------------
def _args(w, sft_dir, out, **kw):
    a = {"prompts_path": w["data"] / "ppo_prompts.json", "image_folder": w["data"] / "images",
         "captions": w["data"] / "captions.json", "model_path": sft_dir, "out_dir": out, "rollout_batch": 16,
         "step_batch": 8, "micro_batch": 8, "max_new_tokens": 12, "length_budget": 12, "lr": 1e-2, "kl_coef": 0.0,
         "reward_scale": 1.0, "max_steps": 4, "lora_r": 8, "lora_alpha": 16, "progress": "false",
         "length_penalty": 0.0, "no_eos_penalty": 0.0, "warmup_steps": 0, "toy_reward": "contains:red",
         "save_every": 1000}
    a.update(kw)
    return sum(([f"--{k}", str(v)] for k, v in a.items()), [])


def test_toy_ppo_raises_reward(tiny_world, tiny_sft, tmp_path):
    r = ppo.main(_args(tiny_world, tiny_sft, tmp_path / "toy", max_steps=30))
    rewards = [h["reward"] for h in r["history"]]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, rewards
    lines = [json.loads(l) for l in open(tmp_path / "toy" / "metrics.jsonl")]
    for key in ("rm_score", "kl", "entropy", "clipfrac", "approx_kl", "value_explained_var", "response_length",
                "t_generate", "t_score", "t_train", "sym_no_eos", "sym_length", "sym_correct"):
        assert key in lines[-1]
    assert os.path.exists(tmp_path / "toy" / "samples.jsonl")
    # the merged policy loads as a plain model, and the adapter in the peft layout
    import model
    model.LLaVA.from_pretrained(str(tmp_path / "toy" / "final"))
    assert os.path.exists(tmp_path / "toy" / "policy_adapter" / "adapter_config.json")


def test_exact_resume(tiny_world, tiny_sft, tmp_path):
    ppo.main(_args(tiny_world, tiny_sft, tmp_path / "full"))
    r = ppo.main(_args(tiny_world, tiny_sft, tmp_path / "part", stop_at_step=2))
    assert r["stopped"]
    ppo.main(_args(tiny_world, tiny_sft, tmp_path / "part", resume="true"))
    a = common.load_checkpoint(common.latest_checkpoint(str(tmp_path / "full")))
    b = common.load_checkpoint(common.latest_checkpoint(str(tmp_path / "part")))
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra = [json.loads(l)["reward"] for l in open(tmp_path / "full" / "metrics.jsonl")]
    rb = [json.loads(l)["reward"] for l in open(tmp_path / "part" / "metrics.jsonl")]
    assert ra == rb


def test_torchrun_matches_single_process(tiny_world, tiny_sft, tmp_path):
    kw = dict(temperature=0.0, step_batch=16, max_steps=2)
    ppo.main(_args(tiny_world, tiny_sft, tmp_path / "one", **kw))
    r = torchrun("ppo.py", _args(tiny_world, tiny_sft, tmp_path / "two", **kw))
    assert r.returncode == 0, r.stderr[-3000:]
    a = common.load_checkpoint(common.latest_checkpoint(str(tmp_path / "one")))["model"]
    b = common.load_checkpoint(common.latest_checkpoint(str(tmp_path / "two")))["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-3), (k, (a[k] - b[k]).abs().max())


def _train_rm(w, base, out, n: int = 40, **kw) -> None:
    """A few reward-model steps on preferences where the ground-truth answer beats "There is no shape."."""
    import reward_model as RM
    prompts = json.load(open(w["data"] / "preference_prompts.json"))
    prefs = [{"id": f"p{i}", "image": p["image"], "conversations": p["conversations"],
              "output_1": {"value": p["gt_answer"]}, "output_2": {"value": "There is no shape."},
              "preference": 1} for i, p in enumerate(prompts[:n])]
    json.dump(prefs, open(out.parent / f"{out.name}_prefs.json", "w"))
    a = {"data_path": out.parent / f"{out.name}_prefs.json", "image_folder": w["data"] / "images",
         "captions": w["data"] / "captions.json", "model_path": base, "out_dir": out, "lora_r": 4, "lora_alpha": 8,
         "global_batch": 8, "micro_batch": 8, "max_steps": 2, "eval_size": 8, "max_len": 512, "progress": "false"}
    a.update(kw)
    RM.main(sum(([f"--{k}", str(v)] for k, v in a.items()), []))


def test_with_fact_rm(tiny_world, tiny_sft, tmp_path):
    """The real path: RM adapter + head score with facts; the critic starts from the RM adapter. With
    --compile true (when the compiler is here) rollouts take the fast path (compiled decode, and on CPU
    oneDNN prepacked linears for generation and scoring): the scores it logs equal the RM's plain path."""
    import model
    import reward_model as RM
    _train_rm(tiny_world, tiny_sft, tmp_path / "rm")
    rm_dir = tmp_path / "rm" / "best"
    r = ppo.main(_args(tiny_world, tiny_sft, tmp_path / "ppo", toy_reward="", rm_dir=rm_dir, max_steps=2,
                       no_eos_penalty=-8.0, length_penalty=-10.0, samples_to_log=6,
                       compile=str(model.compile_available()[0]).lower()))
    h = r["history"][-1]
    assert all(math.isfinite(h[k]) for k in ("reward", "rm_score", "kl", "value_explained_var"))
    assert h["rm_score"] != 0.0
    assert abs(h["reward"] - (h["rm_score"] + h["sym_no_eos"] + h["sym_length"] + h["sym_correct"])) < 1e-4
    caps = json.load(open(tiny_world["data"] / "captions.json"))
    samples = [json.loads(l) for l in open(tmp_path / "ppo" / "samples.jsonl")]
    items = [{"id": s["id"], "image": str(tiny_world["data"] / "images" / s["image"]), "response": s["response"],
              "conversations": [{"from": "human", "value": "<image>\n" + s["question"]}], "facts": caps[s["image"]]}
             for s in samples]
    want = RM.RewardScorer.load(str(rm_dir)).score(items)
    assert len(samples) == 12 and len({round(x, 4) for x in want}) > 1
    assert max(abs(s["rm_score"] - w) for s, w in zip(samples, want)) < 1e-4


def test_config_checks(tiny_world, tiny_sft, tmp_path):
    with pytest.raises(common.ConfigError, match="rollout_batch 10 must be a multiple"):
        ppo.main(_args(tiny_world, tiny_sft, tmp_path / "x", rollout_batch=10))
    with pytest.raises(common.ConfigError, match="give --rm_dir"):
        ppo.main(_args(tiny_world, tiny_sft, tmp_path / "x", toy_reward=""))


def test_non_finite_reward_skips_then_stops(tiny_world, tiny_sft, tmp_path):
    calls = {"n": 0}

    def sometimes_nan(recs, texts, resp, mask):
        calls["n"] += 1
        bad = calls["n"] in (3, 4)  # the two micro-batches of the second PPO step
        return torch.full((len(texts),), float("nan") if bad else 1.0)

    r = ppo.main(_args(tiny_world, tiny_sft, tmp_path / "nan", toy_reward=""), reward_fn=sometimes_nan)
    assert [h["skipped"] for h in r["history"]] == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(FloatingPointError, match="3 PPO steps in a row"):
        ppo.main(_args(tiny_world, tiny_sft, tmp_path / "nan2", toy_reward=""),
                 reward_fn=lambda recs, texts, resp, mask: torch.full((len(texts),), float("nan")))


def test_value_inputs_match_tokenizing_at_the_other_image_size(tiny_world):
    """Policy ids (4 image tokens) -> a second base's ids (9 image tokens) equal tokenizing the same prompts
    at 9 tokens directly; a text-only row is only re-padded; the responses are untouched."""
    import data
    import model
    tok = data.Tokenizer(str(tiny_world["tokenizer"]))
    tpl = data.Template()
    qs = [("What color is the circle?", True), ("Describe the image in detail please.", True), ("Say hi.", False)]
    resp = torch.tensor([[5, 6, 2], [7, 2, 0], [8, 9, 10]])
    rmask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])

    def batch(n_img):
        ids, mask = data.left_pad([data.tokenize_prompt(q, tok, tpl, n_img, has_image=im) for q, im in qs], tok.pad_id)
        return torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1), ids.shape[1]

    full, fmask, P = batch(4)
    want_ids, want_mask, want_P = batch(9)
    ids, mask, P2 = ppo.value_inputs(full, fmask, P, 4, 9)
    assert P2 == want_P and torch.equal(mask, want_mask)
    assert torch.equal(ids * mask, want_ids * want_mask)          # pad ids may differ; masked out either way
    assert (ids == model.IMAGE_TOKEN_INDEX).sum(-1).tolist() == [9, 9, 0]
    assert ppo.value_inputs(full, fmask, P, 4, 4) == (full, fmask, P)
    back, back_mask, P3 = ppo.value_inputs(ids, mask, P2, 9, 4)   # and back down
    assert P3 == P and torch.equal(back * back_mask, full * fmask) and torch.equal(back_mask, fmask)
    with pytest.raises(ValueError, match="not 5 long"):
        ppo.value_inputs(full, fmask, P, 5, 9)


def test_second_base_for_reward_and_value(tiny_world, tiny_sft, tmp_path):
    """--rm_base_path: the RM and the critic on another base with its own image size (48 px, 9 image tokens
    against the policy's 32 px, 4 tokens) and width. The rewards PPO logs equal the RM scored on its own
    (RewardScorer.load on the image files), and the critic trains."""
    import shutil
    import model
    import reward_model as RM
    torch.manual_seed(1)
    cfg = model.ModelConfig.preset("tiny", image_size=48, patch_size=16, vision_hidden=32, vision_layers=1,
                                   vision_heads=2, vision_intermediate=64, hidden=48, layers=2, heads=2,
                                   kv_heads=2, intermediate=96, vocab_size=tiny_world["vocab"], max_seq_len=512)
    big = tmp_path / "big"
    model.LLaVA(cfg).save_pretrained(str(big))
    shutil.copy(tiny_world["tokenizer"], big / "tokenizer.model")
    _train_rm(tiny_world, big, tmp_path / "rm", lr=1e-2)
    rm_dir = tmp_path / "rm" / "best"
    r = ppo.main(_args(tiny_world, tiny_sft, tmp_path / "ppo", toy_reward="", rm_dir=rm_dir, rm_base_path=big,
                       max_steps=2, samples_to_log=6, lr=1e-3))
    h = r["history"][-1]
    assert all(math.isfinite(h[k]) for k in ("reward", "rm_score", "kl", "value_explained_var"))
    ck = common.load_checkpoint(common.latest_checkpoint(str(tmp_path / "ppo")))["model"]
    assert any("value" in k for k in ck)
    caps = json.load(open(tiny_world["data"] / "captions.json"))
    scorer = RM.RewardScorer.load(str(rm_dir))
    samples = [json.loads(l) for l in open(tmp_path / "ppo" / "samples.jsonl")]
    assert len(samples) == 12 and all(s["image"] for s in samples)
    items = [{"id": s["id"], "image": str(tiny_world["data"] / "images" / s["image"]), "response": s["response"],
              "conversations": [{"from": "human", "value": "<image>\n" + s["question"]}], "facts": caps[s["image"]]}
             for s in samples]
    want = scorer.score(items)
    got = [s["rm_score"] for s in samples]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)
    assert len({round(x, 4) for x in want}) > 1


def test_second_base_with_another_tokenizer_is_refused(tiny_world, tiny_sft, tmp_path):
    """The critic reads the policy's token ids: an RM whose tokenizer differs is refused up front."""
    import shutil
    import sentencepiece as spm
    other = tmp_path / "base"
    shutil.copytree(tiny_sft, other)
    _train_rm(tiny_world, other, tmp_path / "rm", n=16, max_steps=1)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a red circle on grass", "two blue squares"] * 50),
                                   model_prefix=str(tmp_path / "sp"), vocab_size=40, model_type="bpe",
                                   minloglevel=2, hard_vocab_limit=False)
    meta_path = tmp_path / "rm" / "best" / "rm_config.json"
    meta = json.load(open(meta_path))
    meta["tokenizer"] = str(tmp_path / "sp.model")
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(common.ConfigError, match="tokenizer .* differs from the policy's"):
        ppo.main(_args(tiny_world, tiny_sft, tmp_path / "ppo", toy_reward="", rm_dir=tmp_path / "rm" / "best",
                       rm_base_path=other, max_steps=1))
