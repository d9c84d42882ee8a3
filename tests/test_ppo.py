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
    assert ppo.symbolic_rewards(texts, [True] * 7, [1] * 7, recs, yesno_reward=1.0)["correct"].tolist()[3:5] == [2.0, -2.0]
    assert st["no_eos"].tolist() == [0.0, 0.0, -8.0, 0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(st["length"], torch.tensor([-10 * n / 896 for n in (10, 20, 30, 40, 50, 60)] + [-10.0]))


def _official_bonus(response: str, caption_type: int) -> float:
    """ppo_trainer.py's correct_bonus for one response, from its AnswerType (1 general, 2-5 A-D, 6 no, 7 yes)."""
    if caption_type in (2, 3, 4, 5):
        start = "ABCD"[caption_type - 2] + "."
        return 1.0 if response.strip().startswith(start) or ("correct option is " + start) in response else 0.0
    if caption_type == 6:
        return 0.5 if response.strip().startswith("No") else (-0.5 if response.strip().startswith("Yes") else 0.0)
    return 0.0


@pytest.mark.parametrize("response", ["B. A red circle.", "  B. spaced", "(B) red", "B) red", "b. red",
                                      "I think the correct option is B.", "the Correct option is B.",
                                      "correct option is b.", "Beyond doubt", "A. no", "No, none.", "no, none.",
                                      " No.", "Nothing here", "Yes, one.", "yes", "Maybe.", ""])
def test_correctness_bonus_is_the_official_rule(response):
    for ct, (kind, ans) in {1: ("general", None), 3: ("multiple_choice", "B"), 6: ("yes_no", "no"),
                            7: ("yes_no", "yes")}.items():
        assert ppo.correct_bonus(response, kind, ans or "") == _official_bonus(response, ct), (response, ct)
    lenient = ppo.correct_bonus(response, "multiple_choice", "B", "lenient")
    assert lenient >= _official_bonus(response, 3)          # lenient only adds matches
    if response in ("(B) red", "B) red", "b. red", "correct option is b."):
        assert lenient == 1.0 and _official_bonus(response, 3) == 0.0


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
    import kernels
    import reward_model as RM
    _train_rm(tiny_world, tiny_sft, tmp_path / "rm")
    rm_dir = tmp_path / "rm" / "best"
    r = ppo.main(_args(tiny_world, tiny_sft, tmp_path / "ppo", toy_reward="", rm_dir=rm_dir, max_steps=2,
                       no_eos_penalty=-8.0, length_penalty=-10.0, samples_to_log=6,
                       compile=str(kernels.compile_available()[0]).lower()))
    h = r["history"][-1]
    assert all(math.isfinite(h[k]) for k in ("reward", "rm_score", "kl", "value_explained_var"))
    assert h["rm_score"] != 0.0
    assert abs(h["reward"] - (h["rm_score"] + h["sym_no_eos"] + h["sym_length"] + h["sym_correct"])) < 1e-4
    caps = json.load(open(tiny_world["data"] / "captions.json"))
    samples = [json.loads(l) for l in open(tmp_path / "ppo" / "samples.jsonl")]
    items = [{"id": s["id"], "image": str(tiny_world["data"] / "images" / s["image"]), "response": s["response"],
              "conversations": [{"from": "human", "value": "<image>\n" + s["question"]}], "facts": caps[s["image"]]}
             for s in samples]
    # the facts' order the RM saw is the rollout's step's (logged as the step it led to)
    scorer = RM.RewardScorer.load(str(rm_dir), seed=0)
    want = [scorer.score([it], use=s["step"] - 1)[0] for it, s in zip(items, samples)]
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


QS = [("What color is the circle?", True), ("Describe the image in detail please, every shape.", True), ("Say hi.", False)]


def test_collate_pads_expands_and_keeps_each_rows_positions(tiny_world):
    """Rows of different prompt and response lengths (one text-only) -> prompts left-padded to the longest,
    responses right-padded, each image a run of the base's num_image_tokens, its image at the base's size;
    the hidden states of every row equal those of the row alone (the prompt tokenized directly at the
    base's image tokens + its response, no padding: a single-row forward)."""
    import data
    import model
    torch.manual_seed(0)
    m = model.LLaVA.from_pretrained(str(tiny_world["model"])).eval()
    n_img, S = m.num_image_tokens, m.config.image_size
    tok, tpl = data.Tokenizer(str(tiny_world["tokenizer"])), data.Template()
    g = torch.Generator().manual_seed(0)
    images = [{S: torch.randn(3, S, S, generator=g)} for _ in QS]
    rows = [ppo.Row({"id": str(i)}, data.tokenize_prompt(q, tok, tpl, 1, has_image=im), images[i] if im else {})
            for i, (q, im) in enumerate(QS)]                                      # the image as one id
    for r, resp in zip(rows, ([5, 6, 2], [7, 8, 9, 10, 11], [12])):
        r.response = torch.tensor(resp)
    b = ppo.collate(rows, m)
    direct = [data.tokenize_prompt(q, tok, tpl, n_img, has_image=im) for q, im in QS]
    P, R = b["P"], 5
    assert P == max(len(d) for d in direct) and b["ids"].shape == (3, P + R)
    assert torch.equal(b["images"], torch.stack([images[0][S], images[1][S]]))    # rows with an image, in order
    with torch.no_grad():
        h = m.hidden_states(b["ids"], b["images"], b["mask"])                     # (B, P+R, D)
        for i, (d, r) in enumerate(zip(direct, rows)):
            n = len(r.response)
            assert b["mask"][i].tolist() == [0] * (P - len(d)) + [1] * (len(d) + n) + [0] * (R - n)
            assert b["ids"][i, P - len(d):P].tolist() == d                       # left-padded prompt
            assert b["ids"][i, P:P + n].tolist() == r.response.tolist()          # right-padded response
            assert b["rmask"][i].tolist() == [1.0] * n + [0.0] * (R - n)
            assert int((b["ids"][i] == model.IMAGE_TOKEN_INDEX).sum()) == (n_img if QS[i][1] else 0)
            alone = torch.tensor([d + r.response.tolist()])
            want = m.hidden_states(alone, images[i][S][None] if QS[i][1] else None)[0]   # (len, D)
            got = h[i, P - len(d):P + n]
            assert torch.allclose(got, want, atol=1e-5), (i, (got - want).abs().max())
    # and forward_response reads the states that predict each response token
    hr = ppo.forward_response(m, None, b)
    assert torch.equal(hr, h[:, P - 1:-1])


def test_rows_for_a_second_base_are_what_its_reward_model_sees(tiny_world, tmp_path):
    """A second base with another image size (48 px, 9 image tokens, beside the policy's 32 px, 4 tokens):
    rows made from the policy's prompts (prompt_row reads the image at 48 px once) and collated for it
    hold the RM's own prompt ids and image: the RM scores them (the row's preprocessed image) as it
    scores the raw record (the image file), and the base's hidden states over the prompt are those of
    the RM's input, read from the file at 48 px."""
    import data
    import model
    import reward_model as RM
    torch.manual_seed(1)
    cfg = model.ModelConfig.preset("tiny", image_size=48, patch_size=16, vision_hidden=32, vision_layers=1,
                                   vision_heads=2, vision_intermediate=64, hidden=48, layers=2, heads=2,
                                   kv_heads=2, intermediate=96, vocab_size=tiny_world["vocab"], max_seq_len=512)
    big = model.LLaVA(cfg).eval()
    big.add_adapter("reward", r=4, alpha=8.0)
    with torch.no_grad():
        for p in big.adapter_parameters("reward"):
            p.normal_(0, 0.05)
    assert big.num_image_tokens == 9
    tok = data.Tokenizer(str(tiny_world["tokenizer"]))
    scorer = RM.RewardScorer(big, "reward", model.ScalarHead(cfg.hidden), tok, max_len=1024)
    folder = str(tiny_world["data"] / "images")
    records = data.read_ppo_prompts(str(tiny_world["data"] / "ppo_prompts.json"),
                                    captions=str(tiny_world["data"] / "captions.json"))[:5]
    prompts = data.PromptDataset(records, tok, data.Template(), folder, 32, 1)     # the policy's size
    rows = [ppo.prompt_row(prompts[i], records[prompts[i]["index"]], {32, 48}, folder) for i in range(len(prompts))]
    for i, r in enumerate(rows):
        assert set(r.images) == {32, 48}
        r.text = ["a red circle", "two blue squares on grass", "no", "a green triangle", "yes"][i]
        r.response = torch.tensor(tok.encode(r.text) + [tok.eos_id])
    b = ppo.collate(rows, big)
    raw = [{"id": str(rec["id"]), "image": os.path.join(folder, rec["image"]), "response": r.text,
            "facts": rec["facts"], "conversations": [{"from": "human", "value": "<image>\n" + rec["question"]}]}
           for r, rec in zip(rows, records)]
    from_rows = [dict(it, image=b["images"][i]) for i, it in enumerate(raw)]
    want = scorer.score(raw)
    assert scorer.score(from_rows) == want and len({round(x, 5) for x in want}) > 1
    seqs = [scorer.encode(it) for it in raw]
    rm_ids, rm_mask = data.left_pad(seqs, tok.pad_id)
    files = torch.stack([data.preprocess_image(data.load_image(it["image"]), 48) for it in raw])
    with torch.no_grad():
        big.set_adapter("reward")
        h = big.hidden_states(b["ids"], b["images"], b["mask"])
        h_rm = big.hidden_states(rm_ids, files, rm_mask)
    for i, (r, s) in enumerate(zip(rows, seqs)):
        n = len(expand := ppo.expand_images(r.prompt, 9))
        assert b["ids"][i, b["P"] - n:b["P"]].tolist() == expand == s[:n]          # the RM's prompt ids
        L = rm_ids.shape[1] - len(s)                                                # the RM row's left padding
        assert torch.allclose(h[i, b["P"] - n:b["P"]], h_rm[i, L:L + n], atol=1e-5)


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
    scorer = RM.RewardScorer.load(str(rm_dir), seed=0)
    samples = [json.loads(l) for l in open(tmp_path / "ppo" / "samples.jsonl")]
    assert len(samples) == 12 and all(s["image"] for s in samples)
    items = [{"id": s["id"], "image": str(tiny_world["data"] / "images" / s["image"]), "response": s["response"],
              "conversations": [{"from": "human", "value": "<image>\n" + s["question"]}], "facts": caps[s["image"]]}
             for s in samples]
    want = [scorer.score([it], use=s["step"] - 1)[0] for it, s in zip(items, samples)]   # the rollout step's facts order
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


# --------------------------------------------------------------------------------------------------
# The official schedule, tempered log-probs, gradient checkpointing (SPEC §9)

@pytest.mark.parametrize("total,warmup", [(10, 5), (30, 2), (4, 0), (6, 6), (3, 5)])
def test_ppo_lr_matches_transformers_cosine_with_warmup(total, warmup):
    """ppo_lr(step) equals transformers' get_cosine_schedule_with_warmup (the official scheduler) stepped
    once per PPO step: factor 0 at the first step, step / warmup during warm-up, then cosine to 0; with
    min_ratio, get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=min_ratio)."""
    import transformers
    base = 3e-5
    for min_ratio in (0.0, 0.1):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=base)
        if min_ratio:
            sched = transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_ratio)
        else:
            sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
        for step in range(total):
            want = sched.get_last_lr()[0]
            assert abs(ppo.ppo_lr(step, total, warmup, base, min_ratio) - want) < 1e-15, (step, want)
            opt.step()
            sched.step()
    # the paper's 5 warm-up steps: 0, 1/5, ... 4/5, then 1 at the first cosine step
    assert [ppo.ppo_lr(s, 100, 5, 1.0) for s in range(6)] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_ppo_main_lr_per_ppo_step_and_no_update_at_first_step(tiny_world, tiny_sft, tmp_path):
    """ppo.main logs one lr per PPO step, the same for every optimizer step within it: ppo_lr(step). With
    warm-up the first PPO step has lr 0, so its checkpoint equals the initial trainable state."""
    args = _args(tiny_world, tiny_sft, tmp_path / "lr", warmup_steps=2, max_steps=4, save_every=1, keep_last=10)
    seen = []
    orig_step = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return orig_step(self, *a, **kw)
    torch.optim.AdamW.step = spy
    try:
        ppo.main(args)
    finally:
        torch.optim.AdamW.step = orig_step
    want = [ppo.ppo_lr(s, 4, 2, 1e-2) for s in range(4)]
    assert want == [0.0, 5e-3, 1e-2, 5e-3]
    lines = [json.loads(l) for l in open(tmp_path / "lr" / "metrics.jsonl")]
    assert [l["lr"] for l in lines] == want
    per_step = 2 * (16 // 8)                                   # ppo_epochs x (rollout_batch / step_batch)
    assert seen == [w for w in want for _ in range(per_step)]
    cfg = common.parse_config(ppo.Config, args)
    models, _ = ppo.build_models(cfg, torch.device("cpu"))
    init = common.trainable_state_dict(ppo._Trainable(models))
    ck1 = common.load_checkpoint(str(tmp_path / "lr" / "ckpt_0000001.pt"))["model"]
    ck2 = common.load_checkpoint(str(tmp_path / "lr" / "ckpt_0000002.pt"))["model"]
    assert set(ck1) == set(init) and all(torch.equal(ck1[k], init[k]) for k in init)
    assert any(not torch.equal(ck2[k], init[k]) for k in init)


def _rollout_setup(w, sft_dir, temperature):
    import data
    cfg = ppo.Config(model_path=str(sft_dir), prompts_path=str(w["data"] / "ppo_prompts.json"),
                     image_folder=str(w["data"] / "images"), temperature=temperature, max_new_tokens=12,
                     lora_r=8, lora_alpha=16.0, length_penalty=0.0, no_eos_penalty=0.0)
    models, tok = ppo.build_models(cfg, torch.device("cpu"))
    pb = models.policy_base
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():                                      # a policy that differs from the reference
        for p in pb.adapter_parameters("policy"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    records = data.read_ppo_prompts(cfg.prompts_path)
    prompts = data.PromptDataset(records, tok, data.Template(system=cfg.system), cfg.image_folder,
                                 pb.config.image_size, 1, cfg.max_prompt_len)
    for mod in (pb, models.value_base):
        mod.eval()
    rows, _ = ppo.rollout(models, tok, [prompts[j] for j in range(6)], records, cfg, torch.Generator().manual_seed(0),
                          lambda recs, texts, resp, mask: torch.zeros(len(texts)))
    return cfg, models, rows


def _full_logits(pb, adapter, b):
    pb.set_adapter(adapter)
    with torch.no_grad():
        return pb(b["ids"], b["images"], b["mask"]).float()[:, b["P"] - 1:-1]   # (B, R, V)


def test_rollout_logprobs_use_the_sampling_temperature(tiny_world, paper_model):
    """At temperature 0.7 the rollout's logp and ref_logp are log_softmax(logits / 0.7) at the sampled
    tokens, from the model's full logits (policy adapter and the bare base as the reference)."""
    cfg, models, rows = _rollout_setup(tiny_world, paper_model, 0.7)   # 256 image tokens
    pb = models.policy_base
    b = ppo.collate(rows, pb)
    m = b["rmask"].bool()
    assert models.ref_adapter is None
    got = {}
    for key, adapter in (("logp", "policy"), ("ref_logp", None)):
        z = _full_logits(pb, adapter, b)
        want = torch.log_softmax(z / 0.7, -1).gather(-1, b["resp"][..., None]).squeeze(-1)
        untempered = torch.log_softmax(z, -1).gather(-1, b["resp"][..., None]).squeeze(-1)
        assert torch.allclose(b[key][m], want[m], atol=1e-5), (key, (b[key][m] - want[m]).abs().max())
        assert (untempered[m] - want[m]).abs().max() > 1e-2            # the temperature matters here
        got[key] = b[key][m]
    assert (got["logp"] - got["ref_logp"]).abs().max() > 1e-3       # policy and reference differ


def test_first_micro_update_ratio_is_one_at_temperature(tiny_world, paper_model):
    """The update's log-probs use the rollout's temperature: at the first micro update (weights unchanged)
    the ratio is exactly 1 (approx_kl ~ 0, no clipping), and the logged entropy is the entropy of
    softmax(logits / 0.7)."""
    cfg, models, rows = _rollout_setup(tiny_world, paper_model, 0.7)   # 256 image tokens
    pb = models.policy_base
    b = ppo.collate(rows, pb)
    mask = b["rmask"]
    z = _full_logits(pb, "policy", b) / 0.7
    logp_all = torch.log_softmax(z, -1)
    ent_want = float((-(logp_all.exp() * logp_all).sum(-1) * mask).sum() / mask.sum())
    for mod in (pb, models.value_base):
        mod.train()
    adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask
    for r, a in zip(rows, adv):
        r.adv, r.ret = a[:len(r.response)], torch.zeros(len(r.response))
    st, ok = ppo._micro_update(models, rows, cfg, float(mask.sum()))
    st = {k: float(v) for k, v in st.items()}
    assert ok and st["approx_kl"] < 1e-10 and st["clipfrac"] == 0.0, st
    assert abs(st["entropy_sum"] / st["tokens"] - ent_want) < 1e-4, (st["entropy_sum"] / st["tokens"], ent_want)


def test_grad_ckpt_at_paper_geometry_saves_memory_same_grads():
    """224 px / patch 14 (256 image tokens) with a 300-token response, tiny widths: one policy + value micro
    update with the 7b preset's grad_ckpt holds several times (> 4x) fewer bytes for backward (autograd's saved
    tensors plus the layer inputs checkpoint keeps) than without, and gives the same gradients."""
    import torch.utils.checkpoint as tuc
    import model as M
    ck_cfg = common.parse_config(ppo.Config, ["--preset", "llava-rlhf-7b"], ppo.PRESETS)
    assert ck_cfg.grad_ckpt is True and ppo.Config().grad_ckpt is False
    V = 256
    torch.manual_seed(0)
    mc = M.ModelConfig.preset("tiny", image_size=224, patch_size=14, vision_hidden=32, vision_layers=1,
                              vision_heads=2, vision_intermediate=64, hidden=64, layers=4, heads=2, kv_heads=2,
                              intermediate=128, vocab_size=V, max_seq_len=1024)
    m = M.LLaVA(mc)
    assert m.num_image_tokens == 256
    m.requires_grad_(False)
    m.add_adapter("policy", r=8, alpha=16.0)
    m.add_adapter("value", r=8, alpha=16.0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in ("policy", "value"):
            for p in m.adapter_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
                p.requires_grad_(True)
    head = M.ScalarHead(mc.hidden)
    models = ppo.Models(m, None, m, head, None)
    R = 300
    prompt = [1, 5, 6, M.IMAGE_TOKEN_INDEX, 7, 8, 9]                     # the image as one id: 256 tokens
    rows = []
    for n in (R, 250):
        rows.append(ppo.Row({}, prompt, {224: torch.randn(3, 224, 224, generator=g)},
                            response=torch.randint(3, V, (n,), generator=g), logp=torch.full((n,), -math.log(V)),
                            values=torch.zeros(n), adv=torch.randn(n, generator=g), ret=torch.randn(n, generator=g)))
    n_tok = float(R + 250)
    params = models.trainable()
    frozen = {p.untyped_storage().data_ptr() for p in m.parameters() if not p.requires_grad}

    def run(cfg):
        m.gradient_checkpointing = cfg.grad_ckpt
        m.train()
        held = {}

        def count(t):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in frozen:
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        def pack(t):
            count(t)
            return t
        orig = tuc.checkpoint

        def ckpt(fn, *args, **kw):     # the layer inputs non-reentrant checkpoint keeps for its recompute
            for a in args:
                count(a)
            return orig(fn, *args, **kw)
        tuc.checkpoint = ckpt
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                st, ok = ppo._micro_update(models, rows, cfg, n_tok)
                st = {k: float(v) for k, v in st.items()}
        finally:
            tuc.checkpoint = orig
        assert ok
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return sum(held.values()), grads, st

    plain_bytes, plain_grads, plain_st = run(ppo.Config())
    ck_bytes, ck_grads, ck_st = run(ck_cfg)
    assert ck_bytes * 4 < plain_bytes, (ck_bytes, plain_bytes)
    assert plain_st["pg_loss"] == pytest.approx(ck_st["pg_loss"], rel=1e-5)
    assert all(g.abs().sum() > 0 for g in plain_grads)
    for a, b in zip(plain_grads, ck_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), (a - b).abs().max()


def test_ppo_main_applies_grad_ckpt_to_policy_and_value(tiny_world, tiny_sft, tmp_path, monkeypatch):
    """--grad_ckpt true reaches both bases: every micro update runs in training mode with grad enabled and
    gradient_checkpointing on for the policy and the value base (what makes decode() checkpoint layers);
    the 7b/13b presets of ppo.py and reward_model.py turn it on."""
    import reward_model as RM
    for name in ("llava-rlhf-7b", "llava-rlhf-13b"):
        assert common.parse_config(ppo.Config, ["--preset", name], ppo.PRESETS).grad_ckpt is True
        assert common.parse_config(RM.Config, ["--preset", name], RM.PRESETS).grad_ckpt is True
    seen = []
    orig = ppo._micro_update

    def spy(models, *a, **kw):
        pb, vb = models.policy_base, models.value_base
        seen.append((pb.gradient_checkpointing, vb.gradient_checkpointing, pb.training, vb.training,
                     torch.is_grad_enabled()))
        return orig(models, *a, **kw)
    monkeypatch.setattr(ppo, "_micro_update", spy)
    ppo.main(_args(tiny_world, tiny_sft, tmp_path / "ck", max_steps=1, grad_ckpt="true"))
    assert seen and all(all(s) for s in seen), seen
    seen.clear()
    ppo.main(_args(tiny_world, tiny_sft, tmp_path / "nock", max_steps=1))
    assert seen and not any(s[0] or s[1] for s in seen)


def test_paper_preset_keeps_image_prompts_at_256_image_tokens(tiny_world, tmp_path, capfd):
    """--preset llava-rlhf-7b (max_prompt_len 128, the image counted as one id, SPEC §9) on a tiny-width model
    with the 7B's vision geometry (224 px / patch 14: 256 image tokens): every image prompt is kept."""
    import shutil
    import model
    torch.manual_seed(0)
    cfg = model.ModelConfig.preset("tiny", image_size=224, patch_size=14, vision_hidden=32, vision_layers=1,
                                   vision_heads=2, vision_intermediate=64, hidden=32, layers=2, heads=2, kv_heads=2,
                                   intermediate=64, vocab_size=tiny_world["vocab"])
    m = model.LLaVA(cfg)
    assert m.num_image_tokens == 256
    mdir = tmp_path / "m224"
    m.save_pretrained(str(mdir))
    shutil.copy(tiny_world["tokenizer"], mdir / "tokenizer.model")
    prompts = json.load(open(tiny_world["data"] / "ppo_prompts.json"))
    assert prompts and all(p.get("image") for p in prompts)
    assert ppo.PRESETS["llava-rlhf-7b"].get("max_prompt_len", ppo.Config.max_prompt_len) == 128
    capfd.readouterr()
    r = ppo.main(["--preset", "llava-rlhf-7b", "--model_path", str(mdir), "--prompts_path",
                  str(tiny_world["data"] / "ppo_prompts.json"), "--image_folder", str(tiny_world["data"] / "images"),
                  "--out_dir", str(tmp_path / "ppo"), "--rollout_batch", "4", "--step_batch", "4", "--micro_batch", "4",
                  "--max_new_tokens", "4", "--max_steps", "1", "--toy_reward", "contains:red", "--progress", "false"])
    assert r["step"] == 1 and not r["stopped"]
    assert "PromptDataset: dropped" not in capfd.readouterr().err


def test_rm_budget_refused_before_models_load(tiny_world, tmp_path):
    """A run whose RM inputs (prompt + facts + rating request + max_new_tokens) can exceed the RM's max_len is
    refused before any model loads (the RM never cuts a response); the bound is exact."""
    import data
    import reward_model as RM
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    meta = {"model_path": str(tmp_path / "nowhere"), "vision_tower": "", "tokenizer": str(tiny_world["tokenizer"]),
            "system": data.VICUNA_V1_SYSTEM, "rm_request": RM.RatingRequest.read().text,
            "facts_intro": RM.DEFAULT_FACTS_INTRO, "max_len": 2048, "facts": "captions", "facts_order": "none"}

    def run(max_len, facts="captions"):
        json.dump(dict(meta, max_len=max_len, facts=facts), open(rm_dir / "rm_config.json", "w"))
        cfg = common.parse_config(ppo.Config, _args(tiny_world, tiny_world["model"], tmp_path / "x", toy_reward="",
                                                    rm_dir=rm_dir))
        return ppo.check_rm_budget(cfg, data.read_ppo_prompts(cfg.prompts_path, captions=cfg.captions or None))

    worst = run(2048)
    assert run(worst + 12) == worst                     # max_new_tokens 12 in _args: an exact fit passes
    with pytest.raises(common.ConfigError, match=f"max_len {worst + 11} .* is {worst} ids, \\+ --max_new_tokens 12"):
        run(worst + 11)
    assert run(2048, facts="none") < worst              # an RM without facts needs less
    # through main, before any model loads (rm_dir holds no adapter: loading it would fail otherwise)
    json.dump(dict(meta, max_len=worst), open(rm_dir / "rm_config.json", "w"))
    with pytest.raises(common.ConfigError, match="never cuts a response"):
        ppo.main(_args(tiny_world, tiny_world["model"], tmp_path / "y", toy_reward="", rm_dir=rm_dir))


def _vision_once_models(w, second_base: bool):
    """A policy base (policy adapter perturbed, the bare base as reference) and, with second_base, a 48 px
    base for the reward and value adapters (else the same base), a RewardScorer on it."""
    import data
    import model
    import reward_model as RM
    pb = model.LLaVA.from_pretrained(str(w["model"]))
    vb = pb
    if second_base:
        torch.manual_seed(1)
        vb = model.LLaVA(model.ModelConfig.preset(
            "tiny", image_size=48, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
            vision_intermediate=64, hidden=48, layers=2, heads=2, kv_heads=2, intermediate=96,
            vocab_size=w["vocab"], max_seq_len=512))
    for m in dict.fromkeys((pb, vb)):
        m.requires_grad_(False)
    pb.add_adapter("policy", r=4, alpha=8.0)
    vb.add_adapter("value", r=4, alpha=8.0)
    vb.add_adapter("reward", r=4, alpha=8.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pb.adapter_parameters("policy") + vb.adapter_parameters("value") + vb.adapter_parameters("reward"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    for p in pb.adapter_parameters("policy") + vb.adapter_parameters("value"):
        p.requires_grad_(True)
    tok = data.Tokenizer(str(w["tokenizer"]))
    head = model.ScalarHead(vb.config.hidden)
    torch.nn.init.normal_(head.proj.weight, 0, 0.5)
    scorer = RM.RewardScorer(vb, "reward", head, tok, max_len=1024)
    return ppo.Models(pb, None, vb, model.ScalarHead(vb.config.hidden), scorer), tok


@pytest.mark.parametrize("second_base", [False, True])
def test_vision_once_equals_recomputing_it(tiny_world, second_base):
    """ppo.rollout encodes each base's images once (image_features); sampling, the policy / reference /
    value passes, the reward model and both epochs' updates then read those features. Against the same
    step with the pixels in every row (each forward runs the vision tower and projector again, as before):
    the same responses, the same log-probs, values and RM scores, and the same trained weights, bit for
    bit; and the vision tower runs once per base per rollout micro-batch instead of at every forward."""
    import copy
    import data
    w = tiny_world
    models, tok = _vision_once_models(w, second_base)
    records = data.read_ppo_prompts(str(w["data"] / "ppo_prompts.json"), captions=str(w["data"] / "captions.json"))
    prompts = data.PromptDataset(records, tok, data.Template(), str(w["data"] / "images"),
                                 models.policy_base.config.image_size, 1, 128)
    items = [prompts[j] for j in range(6)]
    assert all(it["image"] is not None for it in items)
    cfg = ppo.Config(rollout_batch=6, step_batch=6, micro_batch=3, ppo_epochs=2, max_new_tokens=8, temperature=1.0,
                     image_folder=str(w["data"] / "images"), lr=1e-2)

    def step(ms: ppo.Models, once: bool):
        calls = {}
        bases = list(dict.fromkeys((ms.policy_base, ms.value_base)))
        hooks = [b.vision.register_forward_hook(lambda mod, i, o, k=k: calls.__setitem__(k, calls.get(k, 0) + 1))
                 for k, b in enumerate(bases)]
        gen = torch.Generator().manual_seed(0)
        for b in bases:
            b.eval()
        if once:
            rows, _ = ppo.rollout(ms, tok, items, records, cfg, gen, step=1)
        else:   # rollout's loop without image_features: every forward reads the pixels
            sizes, rows = {b.config.image_size for b in bases}, []
            for i in range(0, len(items), cfg.micro_batch):
                part = [ppo.prompt_row(it, records[it["index"]], sizes, cfg.image_folder)
                        for it in items[i:i + cfg.micro_batch]]
                ppo.sample(ms.policy_base, tok, part, cfg, gen)
                ppo.score_passes(ms, part, cfg)
                ppo.rewards(ms, part, cfg, None, 1)
                rows += part
        assert all(bool(r.features) == once for r in rows)
        after_rollout = dict(calls)
        ppo.advantages(rows, cfg, cfg.kl_coef)
        for b in bases:
            b.train()
        opt = torch.optim.AdamW(ms.trainable(), lr=cfg.lr)
        ppo.update(ms, rows, opt, cfg, torch.Generator().manual_seed(7))
        for h in hooks:
            h.remove()
        return rows, [p.detach().clone() for p in ms.trainable()], after_rollout, calls

    rows_a, params_a, roll_a, calls_a = step(copy.deepcopy(models), once=True)
    rows_b, params_b, roll_b, calls_b = step(copy.deepcopy(models), once=False)
    n_parts = 2
    assert calls_a == roll_a == {k: n_parts for k in range(1 + second_base)}    # nothing after the rollout
    # recomputing: sample + 2 scoring passes + (the value pass) + the RM per part; 2 epochs x 2 micro-batches x 2
    assert sum(calls_b.values()) > sum(calls_a.values()) and sum(calls_b.values()) - sum(roll_b.values()) == 8
    for a, b in zip(rows_a, rows_b):
        assert torch.equal(a.response, b.response) and a.text == b.text
        for k in ("logp", "ref_logp", "values", "adv", "ret"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
        assert a.rm_score == b.rm_score
    assert len({round(r.rm_score, 4) for r in rows_a}) > 1        # the RM read the images and texts
    for pa, pb_ in zip(params_a, params_b):
        assert torch.equal(pa, pb_)
    assert any(not torch.equal(pa, p0) for pa, p0 in zip(params_a, models.trainable()))   # the update did train


def test_vision_once_refuses_a_trainable_vision_tower(tiny_world):
    """image_features reuses features across updates only when nothing trains them."""
    models, tok = _vision_once_models(tiny_world, False)
    models.policy_base.projector.requires_grad_(True)
    row = ppo.Row({"id": "0"}, [1, -200, 5], {32: torch.zeros(3, 32, 32)})
    with pytest.raises(RuntimeError, match="frozen vision tower"):
        ppo.image_features([row], [models.policy_base])
