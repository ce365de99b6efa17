"""The fast paths: code that computes what a plain version in a chapter computes, in less
time, and that a test holds to that plain version; tulu.py swaps it in where it runs for real.

LoRA's dropout. LoRA drops out the input of every adapted layer; in a QLoRA step on a CPU,
nn.Dropout's bernoulli_ (one draw from the generator per element, then a float conversion)
took 13% of the time. keep_mask takes 16 random bits per element from 64-bit draws, four
elements a draw: a quarter of the draws and one comparison. use_fast_dropout puts Dropout
(nn.Dropout drawing its mask so) in place of each nn.Dropout of a model (lora.LoRALinear's).

--compile (compile_layers): torch.compile each decoder layer, for CUDA, where kernel
launches and elementwise work weigh; the test holds its steps to the plain layers'.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """A bool mask of `shape`, each element True with probability 1 - p (to within
    2**-17), independently: uniform 16-bit integers compared with a threshold.
    random_(-2**63, None) fills all 64 bits of an int64 word; viewed as int16,
    each word is four integers uniform on [-2**15, 2**15), and one is at least
    t - 2**15 with probability 1 - t / 2**16, t = round(p * 2**16)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes >= round(p * 2**16) - 2**15


class Dropout(nn.Dropout):
    """nn.Dropout(p) drawing its mask with keep_mask: in training x * mask / (1 - p),
    in eval x itself. Backward multiplies by the same mask (autograd keeps it, one
    byte an element)."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return x * 0
        return (x * keep_mask(x.shape, self.p, x.device)).mul_(1 / (1 - self.p))


def use_fast_dropout(model: nn.Module) -> nn.Module:
    """Replace each nn.Dropout inside `model` by a Dropout with the same p and mode, in
    place: the same transformation, drawn faster. Draws nothing, so the random stream of
    what follows is unchanged. Returns the model."""
    for parent in list(model.modules()):
        for name, m in parent.named_children():
            if type(m) is nn.Dropout:  # not our Dropout (a subclass) again, nor other kinds
                setattr(parent, name, Dropout(m.p).train(m.training))
    return model


def compile_layers(model):
    """--compile: torch.compile each decoder layer in place (state_dict keys unchanged). The
    layers are alike, so they share the compiled code: inductor fuses the elementwise work
    around the matrix products (norms, rotary, SiLU, LoRA's casts and adds, NF4's
    dequantization) into generated kernels. The first step pays for the compilation (tens of
    seconds); another sequence length compiles again, up to torch._dynamo's recompile limit,
    then runs the plain layer."""
    for layer in model.model.layers:
        layer.compile()
