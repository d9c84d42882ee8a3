#!/usr/bin/env bash
# The GPU check of the paper-scale path, sized for < 8 minutes on one H100/H200:
#   1. every stage (pretrain, SFT with FSDP, RL-init LoRA, reward model, PPO) for 2 steps on a random
#      ~1B-shaped model (CLIP ViT-L/14 224 px, 256 image tokens + a 2048 x 16 LLaMA), each under
#      `torchrun --nproc_per_node=1`, which starts the process group (NCCL for CUDA tensors, gloo for CPU);
#   2. bench.py --gpu-check (the 7B-shaped speed check);
#   3. the rehearsal's peak estimate (fake tensors) against torch.cuda.max_memory_allocated of the same
#      step on real tensors, for the RM and PPO steps of the ~1B model.
#     bash gpu_check.sh                          # one CUDA GPU
#     DEVICE=cpu SIZE=tiny bash gpu_check.sh     # the same steps on the CPU with a tiny model (a dry run)
# Everything it makes goes to $OUT (default /tmp/gpu_check); the summary is the last lines it prints.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-1b}
PY=${PYTHON:-python}
rm -rf "$OUT" && mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

stamp "data and a random $SIZE model"
$PY tinyworld.py make --out "$OUT/data" --n_sft_images 64 --n_sft 256 --n_ppo_images 32 --n_ppo 64 \
    --n_pref_images 32 --n_pref 64 --n_read 32 --n_heldout 8 > /dev/null
SIZE=$SIZE OUT=$OUT $PY - <<'EOF'
import json, os, random, shutil
import torch
import data, model as M
out, size = os.environ["OUT"], os.environ["SIZE"]
tok = data.Tokenizer(f"{out}/data/tokenizer.model")
if size == "1b":   # ~1.2B: CLIP ViT-L/14 at 224 px and a 2048-wide, 16-layer LLaMA
    cfg = M.ModelConfig.preset("llava-rlhf-7b", hidden=2048, layers=16, heads=16, kv_heads=16, intermediate=5504,
                               vocab_size=tok.vocab_size)
else:
    cfg = M.ModelConfig.preset("tiny", image_size=224, patch_size=14, vision_hidden=64, vision_layers=2,
                               vision_heads=2, vision_intermediate=128, hidden=128, layers=2, heads=2, kv_heads=2,
                               intermediate=256, vocab_size=tok.vocab_size, max_seq_len=4096)
torch.manual_seed(0)
m = M.LLaVA(cfg)
m.save_pretrained(f"{out}/base")
shutil.copy(tok.path, f"{out}/base/tokenizer.model")
print(f"model {M.count_params(m) / 1e9:.2f}B parameters, {m.num_image_tokens} image tokens")
# preference pairs: the preferred answer is the true one
rng, recs = random.Random(0), []
for i, p in enumerate(json.load(open(f"{out}/data/preference_prompts.json"))[:64]):
    good, bad = p["gt_answer"], "There is no shape. " + p["gt_answer"].replace("red", "green")
    pref = rng.choice([1, 2])
    o1, o2 = (good, bad) if pref == 1 else (bad, good)
    recs.append({"id": f"p{i}", "image": p["image"], "conversations": p["conversations"],
                 "output_1": {"value": o1}, "output_2": {"value": o2}, "preference": pref})
json.dump(recs, open(f"{out}/prefs.json", "w"))
EOF

TR="$PY -m torch.distributed.run --nproc_per_node=1 --master_port 29517"
D="$OUT/data"
RUN="--device $DEVICE --progress false --max_steps 2 --save_every 1 --log_every 1"
stamp "pretrain (projector)"
$TR sft.py --preset llava-rlhf-7b-pretrain --model_path "$OUT/base" --data_path "$D/sft.json" \
    --image_folder "$D/images" --out_dir "$OUT/pretrain" --global_batch 8 --micro_batch 4 --eval_size 8 $RUN
stamp "SFT, FSDP over the one-rank group"
$TR sft.py --preset llava-rlhf-7b --model_path "$OUT/base" --data_path "$D/sft.json" --image_folder "$D/images" \
    --out_dir "$OUT/sft" --global_batch 8 --micro_batch 4 --eval_size 8 $RUN
stamp "RL-init LoRA"
$TR sft.py --preset llava-rlhf-7b-rlinit --model_path "$OUT/sft/final" --data_path "$D/sft.json" \
    --image_folder "$D/images" --out_dir "$OUT/rlinit" --global_batch 8 --micro_batch 4 --eval_size 8 $RUN
stamp "reward model"
$TR reward_model.py --preset llava-rlhf-7b --model_path "$OUT/sft/final" --data_path "$OUT/prefs.json" \
    --image_folder "$D/images" --captions "$D/captions.json" --out_dir "$OUT/rm" --global_batch 4 --micro_batch 2 \
    --eval_size 8 --eval_every 1 $RUN
stamp "PPO"
$TR ppo.py --preset llava-rlhf-7b --model_path "$OUT/sft/final" --policy_adapter "$OUT/rlinit/final_adapter" \
    --rm_dir "$OUT/rm/best" --prompts_path "$D/ppo_prompts.json" --image_folder "$D/images" \
    --captions "$D/captions.json" --out_dir "$OUT/ppo" --rollout_batch 8 --step_batch 8 --micro_batch 4 \
    --max_new_tokens 64 --device "$DEVICE" --progress false --max_steps 2 --save_every 1

stamp "bench.py --gpu-check"
if [ "$DEVICE" = cuda ]; then $PY bench.py --gpu-check; else $PY bench.py --gpu-check --cpu-dry-run; fi

stamp "rehearsal estimate vs measured peak"
SIZE=$SIZE OUT=$OUT DEVICE=$DEVICE $PY - <<'EOF'
import os
import torch
import common, model as M, ppo, rehearse, reward_model as RM
dev = os.environ["DEVICE"]
cfg = M.config_from_folder(f"{os.environ['OUT']}/base")[0]
rm = common.parse_config(RM.Config, ["--preset", "llava-rlhf-7b", "--micro_batch", "2", "--max_len", "1024"], RM.PRESETS)
pp = common.parse_config(ppo.Config, ["--preset", "llava-rlhf-7b", "--micro_batch", "4", "--step_batch", "32",
                                       "--max_new_tokens", "256"], ppo.PRESETS)
steps = [("rm", lambda fake: rehearse.rehearse_rm(rm, cfg, 8, fake=fake, device=dev)),
         ("ppo", lambda fake: rehearse.rehearse_ppo(pp, cfg, 8, rm_max_len=1024, fake=fake, decode_steps=16, device=dev))]
for name, run in steps:
    est = run(True)["peak"]
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(False)
        real = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    else:
        real = run(False)["peak"]   # the CPU dry run: the counter on real tensors
    print(f"rehearsal {name}: estimate {est:.2f} GiB, measured {real:.2f} GiB, ratio {est / real:.3f}")
EOF
stamp "done"
