"""A character-level GPT (nanoGPT-style) on the source code of Python's standard library, which every machine
has: next-token cross-entropy with AdamW, bf16 autocast and torch.compile switchable from the config.

    torchrun --standalone --nproc_per_node=2 examples/char_gpt.py            # char_gpt.yaml next to this file
    python examples/char_gpt.py amp.enabled=true compile.enabled=true train.epochs=4
"""

import inspect
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ddp_kit
from ddp_kit.objectives import LanguageModel

MODULES = ("argparse", "collections", "dataclasses", "functools", "inspect", "json", "pathlib", "textwrap", "typing")
VOCAB = 128  # ASCII; the few other characters of these sources become '?'


def write_text_tokens(path: Path) -> None:
    text = "".join(inspect.getsource(__import__(name)) for name in MODULES)
    tokens = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).astype(np.int64)
    split = len(tokens) * 9 // 10
    ddp_kit.data.write_tokens(path, tokens[:split], group="train")
    ddp_kit.data.write_tokens(path, tokens[split:], group="val", append_group=True)


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, c // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(n, t, c))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, context: int, width: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.token, self.position = nn.Embedding(VOCAB, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, VOCAB)

    def forward(self, tokens):
        x = self.token(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(self.norm(self.blocks(x)))  # N x L x VOCAB logits of the next token


if __name__ == "__main__":
    cfg = ddp_kit.load_config(Path(__file__).with_suffix(".yaml"), sys.argv[1:])
    ddp_kit.data.create_once(cfg.data.path, write_text_tokens)
    result = ddp_kit.train(cfg, model=lambda: GPT(cfg.data.context_length), objective=LanguageModel())
    if os.environ.get("RANK", "0") == "0":  # every process returns the same figures
        print(f"validation loss {result['val_loss']:.3f} nats per character")
