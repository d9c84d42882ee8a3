"""PPO's held-out evaluation (--eval_every): the proxy reward and the gold judge's scores of the policy's
greedy answers, checked against answers made and scored by other code paths (tinyworld.sample_responses,
reward_model.RewardScorer)."""
import json

import pytest

import ppo
import reward_model as RM
import tinyworld
from test_ppo import _args, _train_rm


def _items(w, records, texts):
    return [{"id": str(r["id"]), "image": str(w["data"] / "images" / r["image"]), "response": t,
             "conversations": [{"from": "human", "value": "<image>\n" + r["question"]}], "facts": r["facts"]}
            for r, t in zip(records, texts)]


def test_heldout_eval_proxy_and_gold_match_independent_scoring(tiny_world, tiny_sft, tmp_path):
    w = tiny_world
    _train_rm(w, tiny_sft, tmp_path / "rm")
    rm_dir = tmp_path / "rm" / "best"
    held = w["data"] / "heldout_prompts.json"
    seen = []

    def gold(records, texts):          # any per-answer score; here the number of words
        seen.extend(texts)
        return {"words": [float(len(t.split())) for t in texts]}

    r = ppo.main(_args(w, tiny_sft, tmp_path / "ppo", toy_reward="", rm_dir=rm_dir, max_steps=3, eval_every=2,
                       eval_prompts=held, eval_size=6, micro_batch=4), gold_fn=gold)
    assert [e["step"] for e in r["evals"]] == [0, 2, 3]
    records = RM.data.read_ppo_prompts(str(held), captions=str(w["data"] / "captions.json"))[:6]
    scorer = RM.RewardScorer.load(str(rm_dir), seed=0)
    # step 0: the fresh policy adapter is a no-op, so the policy answers as the SFT model does
    for model_dir, ev in ((tiny_sft, r["evals"][0]), (tmp_path / "ppo" / "final", r["evals"][-1])):
        texts = [a[0] for a in tinyworld.sample_responses(str(model_dir), records, str(w["data"] / "images"), n=1,
                                                          temperature=0.0, max_new_tokens=12)]
        proxy = scorer.score(_items(w, records, texts), use="eval")
        assert ev["eval_proxy_rm"] == pytest.approx(sum(proxy) / 6, abs=1e-4)
        assert ev["eval_gold_words"] == pytest.approx(sum(len(t.split()) for t in texts) / 6)
    assert len(seen) == 18
    lines = [json.loads(l) for l in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert [l["step"] for l in lines if "eval_proxy_rm" in l] == [0, 2, 3]


def test_eval_every_needs_prompts(tiny_world, tiny_sft, tmp_path):
    with pytest.raises(ppo.common.ConfigError, match="--eval_prompts"):
        ppo.main(_args(tiny_world, tiny_sft, tmp_path / "p", eval_every=2))


def test_fewer_heldout_prompts_than_ranks_is_refused(tiny_world, tiny_sft, tmp_path):
    from helpers import torchrun
    r = torchrun("ppo.py", _args(tiny_world, tiny_sft, tmp_path / "p", eval_every=1, max_steps=1, eval_size=1, micro_batch=4,
                                 eval_prompts=tiny_world["data"] / "heldout_prompts.json"))
    assert r.returncode != 0 and "1 usable held-out prompts is fewer than one per rank (2)" in r.stderr, r.stderr[-2000:]
