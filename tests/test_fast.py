"""machinery/fast.py: each fast path against the plain version it stands in for
(LoRA's dropout against nn.Dropout's definition), and tulu's training model using it."""
import math
import os

import pytest
import torch
import torch.nn as nn

import lora
import tulu
from machinery import fast

HF_TINY = os.path.join(os.path.dirname(__file__), "fixtures", "cli", "hf_tiny")


# -----------------------------------------------------------------------------
# Dropout from keep_mask against nn.Dropout's definition


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_mask_keeps_each_element_with_probability_one_minus_p(p):
    """Over 2M elements the kept fraction is 1 - p within 5 standard deviations, for
    each of the four 16-bit lanes of the 64-bit words alike (a lane short of random
    bits, as the top one of random_()'s 63-bit words, keeps 0% or 100%), and
    neighbours (within a word and across words) are independent."""
    torch.manual_seed(0)
    n = 2_000_000
    m = fast.keep_mask((n,), p)
    sd = math.sqrt(p * (1 - p) / (n / 4))
    for lane in range(4):
        assert abs(m[lane::4].float().mean().item() - (1 - p)) < 5 * sd
    q = 1 - p  # overlapping pairs: each pair's variance plus twice its neighbour's covariance
    both_sd = math.sqrt((q**2 - q**4 + 2 * (q**3 - q**4)) / (n - 1))
    assert abs((m[:-1] & m[1:]).float().mean().item() - q**2) < 5 * both_sd


def test_keep_mask_is_the_seeds_and_new_each_call():
    torch.manual_seed(3)
    a, b = fast.keep_mask((4, 33), 0.3), fast.keep_mask((4, 33), 0.3)
    torch.manual_seed(3)
    assert torch.equal(fast.keep_mask((4, 33), 0.3), a) and not torch.equal(a, b)
    assert a.shape == (4, 33) and a.dtype == torch.bool


def test_dropout_is_nn_dropouts_transformation():
    """Kept elements scaled by 1/(1-p), the rest 0, the gradient the same mask and scale;
    eval mode and p=0 are the identity, p=1 drops everything."""
    torch.manual_seed(0)
    x = torch.randn(8, 300, requires_grad=True)
    drop = fast.Dropout(0.25)
    y = drop(x)
    kept = y != 0
    assert 0.6 < kept.float().mean() < 0.9
    torch.testing.assert_close(y[kept], x[kept] / 0.75, rtol=1e-6, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75, rtol=1e-6, atol=0)
    assert drop.eval()(x) is x and fast.Dropout(0.0)(x) is x
    assert not fast.Dropout(1.0)(x).any()
    assert isinstance(drop, nn.Dropout)


def test_use_fast_dropout_swaps_each_nn_dropout_and_draws_nothing():
    """Each LoRALinear's nn.Dropout becomes a fast Dropout with the same p and mode; an
    nn.Identity (p = 0) stays; the generator is where it was; a second call changes nothing."""
    model = nn.Sequential(lora.LoRALinear(nn.Linear(4, 4), 2, 4, dropout=0.1),
                          lora.LoRALinear(nn.Linear(4, 4), 2, 4, dropout=0.0)).eval()
    state = torch.get_rng_state()
    assert fast.use_fast_dropout(model) is model
    assert torch.equal(torch.get_rng_state(), state)
    drop = model[0].dropout
    assert type(drop) is fast.Dropout and drop.p == 0.1 and not drop.training
    assert isinstance(model[1].dropout, nn.Identity)
    fast.use_fast_dropout(model)
    assert model[0].dropout is drop


def test_tulu_trains_lora_with_the_fast_dropout():
    args = tulu.TrainConfig(model=HF_TINY, method="lora", dtype="fp32").resolve(demo=False)
    model = tulu.build_policy(args, HF_TINY)
    drops = {type(m.dropout) for m in lora.lora_layers(model).values()}
    assert drops == {fast.Dropout} and args.lora_dropout == 0.1
