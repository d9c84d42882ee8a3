"""Builders of tiny random transformers models saved to local folders (nothing is downloaded)."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_clip_config(image_size: int = 30, patch_size: int = 6, hidden: int = 32, layers: int = 3):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                            projection_dim=hidden)


def hf_llama_config(hidden: int = 48, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 100):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=False)


def hf_llava(image_size=30, patch_size=6, kv_heads=2, feature_layer=-2, strategy="default", vocab=100,
             seed=0):
    """A random transformers LlavaForConditionalGeneration; the last vocab id is the image token."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=hf_clip_config(image_size, patch_size),
                      text_config=hf_llama_config(kv_heads=kv_heads, vocab=vocab),
                      image_token_index=vocab - 1, vision_feature_layer=feature_layer,
                      vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                      image_seq_length=(image_size // patch_size) ** 2 + (strategy == "full"))
    m = LlavaForConditionalGeneration(cfg).eval()
    _randomize(m)
    return m


def _randomize(m: torch.nn.Module) -> None:
    """Random init leaves norms at 1 and biases at 0; perturb everything so tests see every weight."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def save(m, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    m.save_pretrained(path)
    return path


def to_hf_ids(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    from model import IMAGE_TOKEN_INDEX
    return ids.masked_fill(ids == IMAGE_TOKEN_INDEX, image_token_id)


def torchrun(script: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc script args` from the repository root, one thread per rank, on a
    free port. -> the finished process (stdout, stderr captured)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
           str(free_port()), script] + args
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def free_port() -> int:
    """A TCP port nobody listens on now, for torchrun's rendezvous in the tests."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
