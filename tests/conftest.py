import os
import sys

import torch

# the stage scripts are flat modules at the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# the CPU linear path as before the per-machine measurement (kernels.cpu_linear_plan): prepacked oneDNN
# wherever compiled generation or PPO's scoring asks, so that no test times GEMMs or writes ~/.cache;
# tests/test_linear_choice.py tests the measured choice itself
os.environ.setdefault("LLAVA_RLHF_CPU_LINEAR", "packed")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small tiny-world data set (tinyworld.py make) and a very small random LLaVA saved in our
    checkpoint layout with its tokenizer: what the stage tests train on. Built once per session."""
    import shutil
    import subprocess
    root = tmp_path_factory.mktemp("world")
    out = root / "data"
    subprocess.run([sys.executable, "tinyworld.py", "make", "--out", str(out), "--n_sft_images", "120",
                    "--n_sft", "600", "--n_ppo_images", "60", "--n_ppo", "200", "--n_pref_images", "60",
                    "--n_pref", "200", "--n_read", "120"],
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True,
                   capture_output=True)
    import data
    import model
    tok = data.Tokenizer(str(out / "tokenizer.model"))
    torch.manual_seed(0)
    cfg = model.ModelConfig.preset("tiny", image_size=32, patch_size=16, vision_hidden=32, vision_layers=1,
                                   vision_heads=2, vision_intermediate=64, hidden=32, layers=2, heads=2,
                                   kv_heads=2, intermediate=64, vocab_size=tok.vocab_size, max_seq_len=512)
    m = model.LLaVA(cfg)
    mdir = root / "model"
    m.save_pretrained(str(mdir))
    shutil.copy(out / "tokenizer.model", mdir / "tokenizer.model")
    return {"data": out, "model": mdir, "tokenizer": out / "tokenizer.model", "vocab": tok.vocab_size}


@pytest.fixture(scope="session")
def tiny_sft(tiny_world):
    """tiny_world's model after 60 SFT steps (about 2 s): it answers in the world's words."""
    import sft
    w = tiny_world
    out = w["model"].parent / "sft"
    a = {"data_path": w["data"] / "sft.json", "image_folder": w["data"] / "images", "model_path": w["model"],
         "out_dir": out, "mode": "sft", "train_vision": "true", "lr": 5e-3, "warmup_ratio": 0.0,
         "global_batch": 16, "micro_batch": 16, "max_len": 256, "eval_size": 16, "eval_every": 1000,
         "save_every": 1000, "progress": "false", "max_steps": 60}
    sft.main(sum(([f"--{k}", str(v)] for k, v in a.items()), []))
    return out / "final"


@pytest.fixture(scope="session")
def paper_model(tiny_world, tmp_path_factory):
    """A random model with the 7B's vision geometry, 224 px / patch 14 (256 image tokens, the paper's),
    tiny widths and tiny_world's tokenizer, saved in our layout: the paper-geometry tests train on it."""
    import shutil
    import model
    torch.manual_seed(0)
    cfg = model.ModelConfig.preset("tiny", image_size=224, patch_size=14, vision_hidden=32, vision_layers=1,
                                   vision_heads=2, vision_intermediate=64, hidden=32, layers=2, heads=2, kv_heads=2,
                                   intermediate=64, vocab_size=tiny_world["vocab"], max_seq_len=2048)
    m = model.LLaVA(cfg)
    assert m.num_image_tokens == 256
    mdir = tmp_path_factory.mktemp("paper") / "model"
    m.save_pretrained(str(mdir))
    shutil.copy(tiny_world["tokenizer"], mdir / "tokenizer.model")
    return mdir
