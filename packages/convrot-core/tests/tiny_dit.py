"""A tiny DiT-shaped model (embedding, attention-like and MLP Linear layers, LayerNorms) for the tests."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.ModuleDict({"to_q": nn.Linear(width, width), "to_out": nn.Linear(width, width, bias=False)})
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.norm(x)
        x = x + self.attn["to_out"](self.attn["to_q"](h))
        return x + self.ff(self.norm(x))


class TinyDiT(nn.Module):
    def __init__(self, width=64, depth=2):
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.proj_out = nn.Linear(width, 8)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(x)


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyDiT(**kwargs)
