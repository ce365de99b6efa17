"""Fast paths, each held by tests/test_fast.py to the plain version in a chapter that it stands in
for; tulu.py swaps them in. LoRA's dropout: nn.Dropout's bernoulli_ (a draw per element, then a
float conversion) took 13% of a QLoRA step on a CPU; keep_mask draws a quarter as many numbers.
--compile: torch.compile each decoder layer, for CUDA, where kernel launches and elementwise work weigh.
"""
import torch
import torch.nn as nn


def keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """A bool mask of `shape`, each element True with probability 1 - p (to within 2**-17),
    independently. random_(-2**63, None) fills all 64 bits of an int64 word; viewed as int16, each
    word is four integers uniform on [-2**15, 2**15), and one is at least t - 2**15 with
    probability 1 - t / 2**16, t = round(p * 2**16)."""
    n = torch.Size(shape).numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    return words.view(torch.int16)[:n].view(shape) >= round(p * 2**16) - 2**15


class Dropout(nn.Dropout):
    """nn.Dropout(p) drawing its mask with keep_mask: in training x * mask / (1 - p), else x."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return x * 0
        return (x * keep_mask(x.shape, self.p, x.device)).mul_(1 / (1 - self.p))


def use_fast_dropout(model: nn.Module) -> nn.Module:
    """Each nn.Dropout in `model` (lora.LoRALinear's) replaced by a Dropout of the same p and mode.
    Draws nothing: the random stream of what follows is unchanged."""
    for parent in list(model.modules()):
        for name, m in parent.named_children():
            if type(m) is nn.Dropout:
                setattr(parent, name, Dropout(m.p).train(m.training))
    return model


def compile_layers(model):
    """torch.compile each decoder layer in place (state_dict keys unchanged); the layers share the
    compiled code, compiled once for any batch and length (dynamic shapes: SFT's lengths vary from
    batch to batch, and a static first compile would be followed by a dynamic one)."""
    for layer in model.model.layers:
        layer.compile(dynamic=True)
