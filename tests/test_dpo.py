"""dpo.py against the formulas it cites (DPO Eq. 7, conservative DPO, IPO), their
gradients worked out by hand, a naive loop for log-probabilities, and the
invariants of the chapter (loss = ln 2 when the policy is the reference)."""
import math

import pytest
import torch

import dpo
from dpo import (check_pair, collate_pairs, concatenated_logps, dpo_loss, dpo_metrics, pad_batch,
                 sequence_logps, uses_average)
from llama import Llama, LlamaConfig


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def tensors(*values, grad=False):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=grad) for v in values]


def random_logps(B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(4)]


# -----------------------------------------------------------------------------
# dpo_loss: each loss type equals its formula


def test_dpo_loss_sigmoid_worked_example():
    """πc = -10, πr = -12 under the policy; rc = rr = -11 under the reference; β = 0.1.
    h = (πc - rc) - (πr - rr) = (-10 + 11) - (-12 + 11) = 1 - (-1) = 2, so β·h = 0.2 and
        loss = -log σ(0.2) = log(1 + e^-0.2) ≈ 0.5981
    rewards: β·(πc - rc) = 0.1·1 = 0.1 and β·(πr - rr) = 0.1·(-1) = -0.1.
    With label smoothing ε, loss = -(1-ε)·log σ(0.2) - ε·log σ(-0.2), and since
    -log σ(-z) = -log σ(z) + z, that is the ε = 0 loss plus ε·0.2."""
    pc, pr, rc, rr = tensors([-10.0], [-12.0], [-11.0], [-11.0])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([math.log(1 + math.exp(-0.2))], dtype=torch.float64))
    torch.testing.assert_close(chosen, torch.tensor([0.1], dtype=torch.float64))
    torch.testing.assert_close(rejected, torch.tensor([-0.1], dtype=torch.float64))
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, losses + 0.1 * 0.2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "dpo_norm"])
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_dpo_loss_sigmoid_matches_formula(loss_type, eps):
    """loss = -(1-ε)·log σ(β·h) - ε·log σ(-β·h), h = (πc - rc) - (πr - rr), pair by pair.
    dpo_norm is the same formula: it differs only in being fed average log-probs."""
    pc, pr, rc, rr = random_logps()
    beta = 0.3
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        expected = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
        assert chosen[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-12)
        assert rejected[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), rel=1e-12)


def test_dpo_loss_ipo_matches_formula():
    """IPO: loss = (h - 1/(2β))². The worked example above (h = 2) with β = 0.1:
    1/(2β) = 5, so loss = (2 - 5)² = 9; label smoothing plays no part."""
    pc, pr, rc, rr = tensors([-10.0], [-12.0], [-11.0], [-11.0])
    for eps in (0.0, 0.3):
        losses, chosen, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", label_smoothing=eps)
        torch.testing.assert_close(losses, torch.tensor([9.0], dtype=torch.float64))
        torch.testing.assert_close(chosen, torch.tensor([0.1], dtype=torch.float64))
    pc, pr, rc, rr = random_logps()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(losses, ((pc - rc) - (pr - rr) - 1 / (2 * 0.5)) ** 2)


@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
def test_dpo_loss_gradient_matches_analytic(loss_type):
    """With z = β·h, the logistic losses have dL/dh = -β·((1-ε)·σ(-z) - ε·σ(z)) (from
    d/dz log σ(z) = σ(-z)), IPO has dL/dh = 2·(h - 1/(2β)); and since h = πc - rc - πr + rr,
    dL/dπc = dL/dh, dL/dπr = -dL/dh, dL/drc = -dL/dh, dL/drr = dL/dh."""
    beta, eps = 0.4, 0.1
    pc, pr, rc, rr = [t.requires_grad_() for t in random_logps(seed=1)]
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    losses.sum().backward()
    with torch.no_grad():
        h = (pc - rc) - (pr - rr)
        if loss_type == "ipo":
            dh = 2 * (h - 1 / (2 * beta))
        else:
            dh = -beta * ((1 - eps) * torch.sigmoid(-beta * h) - eps * torch.sigmoid(beta * h))
    torch.testing.assert_close(pc.grad, dh)
    torch.testing.assert_close(pr.grad, -dh)
    torch.testing.assert_close(rc.grad, -dh)
    torch.testing.assert_close(rr.grad, dh)


@pytest.mark.parametrize("loss_type", ["sigmoid", "dpo_norm"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_is_ln2_when_policy_is_reference(loss_type, eps):
    """At step 0 the policy is the reference: h = 0, σ(0) = 1/2, so every pair's loss is
    -(1-ε)·log ½ - ε·log ½ = ln 2 whatever ε, every reward is 0 and no pair is 'accurate'."""
    pc, pr, _, _ = random_logps()
    losses, chosen, rejected = dpo_loss(pc, pr, pc.clone(), pr.clone(), loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))
    assert (chosen == 0).all() and (rejected == 0).all()
    m = dpo_metrics(losses, chosen, rejected, pc, pr)
    assert m["loss"] == pytest.approx(math.log(2)) and m["rewards/accuracy"] == 0 and m["rewards/margin"] == 0


def test_dpo_loss_rewards_are_detached_and_bad_type_fails():
    pc, pr, rc, rr = [t.requires_grad_() for t in random_logps()]
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad
    with pytest.raises(ValueError, match="'hinge' .*sigmoid, dpo_norm, ipo"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge")


def test_uses_average_per_loss_type():
    """open-instruct averages log-probs for dpo_norm (DPOLossType.is_average_loss), TRL for
    ipo; plain DPO sums them (see sequence_logps). An unknown name names the valid ones."""
    assert not uses_average("sigmoid")
    assert uses_average("dpo_norm") and uses_average("ipo")
    with pytest.raises(ValueError, match="sigmoid, dpo_norm, ipo"):
        uses_average("dpo")


# -----------------------------------------------------------------------------
# sequence_logps: a direct computation, one position at a time


def naive_logps(logits, labels):
    """For every t >= 1 whose label is not -100: log softmax(logits[b, t-1])[labels[b, t]]."""
    sums, counts = [], []
    for b in range(logits.shape[0]):
        s, n = 0.0, 0
        for t in range(1, logits.shape[1]):
            y = labels[b, t].item()
            if y != -100:
                row = logits[b, t - 1].double().tolist()
                s += row[y] - math.log(sum(math.exp(v) for v in row))
                n += 1
        sums.append(s)
        counts.append(n)
    return torch.tensor(sums), torch.tensor(counts)


def random_batch(B=4, T=9, V=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[1, 4:] = -100  # a shorter answer
    labels[2, 1:] = -100  # nothing to score: only labels[2, 0], which no position predicts
    labels[2, 0] = 5
    return logits, labels


def test_sequence_logps_matches_loop():
    logits, labels = random_batch()
    sums, counts = naive_logps(logits, labels)
    out = sequence_logps(logits, labels)
    assert out.shape == (4,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), sums.double(), atol=1e-5, rtol=1e-6)
    assert out[2] == 0  # labels[:, 0] is never predicted


def test_sequence_logps_average_is_sum_over_count():
    """average=True = sum / number of labelled tokens; a row with none gives 0, not NaN."""
    logits, labels = random_batch(seed=1)
    sums, counts = naive_logps(logits, labels)
    expected = sums / counts.clamp(min=1)
    torch.testing.assert_close(sequence_logps(logits, labels, average=True).double(), expected.double(),
                               atol=1e-5, rtol=1e-6)
    assert counts[2] == 0 and sequence_logps(logits, labels, average=True)[2] == 0


def test_sequence_logps_upcasts_bf16_before_log_softmax():
    logits, labels = random_batch(V=50, seed=2)
    low = logits.bfloat16()
    out = sequence_logps(low, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sequence_logps(low.float(), labels), atol=0, rtol=0)


# -----------------------------------------------------------------------------
# Batches: padding, concatenation and the way back

PAIRS = [  # (chosen_ids, chosen_labels, rejected_ids, rejected_labels): prompt, then answer
    ([1, 7, 8, 9, 3], [-100, -100, -100, 9, 3], [1, 7, 8, 4, 5, 6, 3], [-100, -100, -100, 4, 5, 6, 3]),
    ([1, 10, 11, 12, 13, 3], [-100, -100, 11, 12, 13, 3], [1, 10, 14, 3], [-100, -100, 14, 3]),
    ([1, 2, 6, 3], [-100, -100, 6, 3], [1, 2, 15, 15, 3], [-100, -100, 15, 15, 3]),
]


def test_pad_batch_right_pads():
    """Two SFT rows, pad id 7: ids padded with 7, labels with -100, mask 1 on real tokens."""
    batch = pad_batch([([1, 2, 3], [-100, 2, 3]), ([4], [-100])], pad_id=7)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_batch_collate_pairs_puts_chosen_rows_first():
    batch = collate_pairs(PAIRS, pad_id=0)
    B, T = len(PAIRS), max(len(p[k]) for p in PAIRS for k in (0, 2))
    for k in ("input_ids", "labels", "attention_mask"):
        assert batch[k].shape == (2 * B, T) and batch[k].dtype == torch.long
    rows = [(p[0], p[1]) for p in PAIRS] + [(p[2], p[3]) for p in PAIRS]  # chosen first
    for i, (ids, labels) in enumerate(rows):
        n = int(batch["attention_mask"][i].sum())
        assert n == len(ids) and batch["attention_mask"][i, :n].all()  # right padding
        assert batch["input_ids"][i, :n].tolist() == ids and batch["labels"][i, :n].tolist() == labels
        assert (batch["input_ids"][i, n:] == 0).all() and (batch["labels"][i, n:] == -100).all()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return Llama(cfg).double()


@pytest.mark.parametrize("average", [False, True])
def test_concatenated_logps_equals_one_answer_at_a_time(average):
    """Padding and concatenation change nothing: each answer scored alone, unpadded."""
    model = tiny_llama()
    with torch.no_grad():
        chosen, rejected = concatenated_logps(model, collate_pairs(PAIRS, pad_id=0), average=average)
        for k, got in ((0, chosen), (2, rejected)):
            for i, p in enumerate(PAIRS):
                ids, labels = torch.tensor([p[k]]), torch.tensor([p[k + 1]])
                alone = sequence_logps(model(ids), labels, average=average)
                torch.testing.assert_close(got[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_dpo_loss_descent_step_prefers_chosen():
    """From policy = reference (loss ln 2), one gradient step on the DPO loss moves the
    policy's margin h above 0: the chosen answers gain probability relative to the rejected."""
    model = tiny_llama(seed=1)
    batch = collate_pairs(PAIRS, pad_id=0)
    with torch.no_grad():
        ref_c, ref_r = concatenated_logps(model, batch)
    losses, _, _ = dpo_loss(*concatenated_logps(model, batch), ref_c, ref_r, beta=0.1)
    torch.testing.assert_close(losses.mean().item(), math.log(2))
    losses.mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
        losses, chosen, rejected = dpo_loss(*concatenated_logps(model, batch), ref_c, ref_r, beta=0.1)
    assert losses.mean() < math.log(2) and (chosen - rejected).mean() > 0


# -----------------------------------------------------------------------------
# Metrics and data checks


def test_dpo_metrics_by_hand():
    """Three pairs: rewards (0.2 vs 0.1), (-0.1 vs 0.3), (0 vs 0). Accuracy is strict:
    only the first pair counts, 1/3. Margins 0.1, -0.4, 0, mean -0.1."""
    chosen, rejected = torch.tensor([0.2, -0.1, 0.0]), torch.tensor([0.1, 0.3, 0.0])
    losses = torch.tensor([0.5, 0.9, 0.7])
    pc, pr = torch.tensor([-3.0, -4.0, -5.0]), torch.tensor([-6.0, -2.0, -5.0])
    m = dpo_metrics(losses, chosen, rejected, pc, pr)
    assert set(m) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                      "logps/chosen", "logps/rejected"}
    assert m["rewards/accuracy"] == pytest.approx(1 / 3) and m["rewards/margin"] == pytest.approx(-0.1)
    assert m["loss"] == pytest.approx(0.7) and m["logps/chosen"] == -4.0
    assert m["logps/rejected"] == pytest.approx(-13 / 3) and m["rewards/chosen"] == pytest.approx(0.1 / 3)
    s = dpo_metrics(losses, chosen, rejected, pc, pr, reduction="sum")
    assert all(s[k] == pytest.approx(3 * m[k]) for k in m)


def msgs(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": r, "content": c} for r, c in zip(roles, turns)]


def test_check_pair_messages():
    good = check_pair(msgs("Hi", "Hello!", "2+2?", "4"), msgs("Hi", "Hello! ", "2+2?", "5"))
    assert good is None
    assert "'rejected' is missing" in check_pair(msgs("Hi", "Hello"), None)
    assert "'chosen' is missing" in check_pair([], msgs("Hi", "Hello"))
    assert "differ at turn 1 (user)" in check_pair(msgs("Hi", "a"), msgs("Hey", "b"))
    assert "differ at turn 2 (assistant)" in check_pair(msgs("Hi", "a", "x", "b"), msgs("Hi", "c", "x", "d"))
    assert "end with an assistant turn" in check_pair(msgs("Hi", "a", "more?"), msgs("Hi", "b", "more?"))
    assert "4 turns" in check_pair(msgs("Hi", "a", "x", "b"), msgs("Hi", "b"))
    assert "not {" in check_pair([{"role": "user"}, {"role": "assistant", "content": "a"}], msgs("Hi", "b"))
