"""Chapter 4: Direct Preference Optimization, as Tulu 2 DPO and Tulu 2.5 were aligned.

What this file teaches: how a language model learns from pairs "this answer is better than that
one" with neither a reward model nor RL (DPO, Rafailov et al. 2023, arXiv 2305.18290): an answer's
log-probability sums its tokens', β·log(policy / reference) is an implicit reward, and a logistic
loss lifts the chosen answer's reward above the rejected one's. Variants: conservative DPO, IPO
(2310.12036), and Tulu 3's length-normalized DPO (2411.15124). tulu.py supplies the reference
log-probs (LoRA adapters switched off, or cached before the first update).

Shapes: B pairs, T tokens, V vocabulary; a concatenated batch has 2B rows, B chosen first. Read top to bottom.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llama import pad_batch  # rows padded into a batch: the model's inputs (chapter 1)

# -----------------------------------------------------------------------------
# Preference data: one conversation, two candidate last answers


def check_pair(chosen, rejected) -> str | None:
    """None if the message lists `chosen` and `rejected` form a preference pair, else what is
    wrong (the caller adds file and line). Both must end with an assistant turn and share every
    turn before it (stripped, as the chat format strips them): else they answer different prompts."""
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(msgs, list) or not msgs:
            return f"'{name}' is missing or is not a non-empty list of messages"
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
            return f"'{name}' has a message that is not {{\"role\": ..., \"content\": \"...\"}}"
        if msgs[-1].get("role") != "assistant":
            return f"'{name}' must end with an assistant turn, not {msgs[-1].get('role')!r}"
    rule = "they must share every turn but the last assistant one"
    if len(chosen) != len(rejected):
        return f"'chosen' has {len(chosen)} turns and 'rejected' {len(rejected)}: {rule}"
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])):
        if (a.get("role"), a["content"].strip()) != (b.get("role"), b["content"].strip()):
            return f"'chosen' and 'rejected' differ at turn {i + 1} ({a.get('role')}): {rule}"
    return None


# -----------------------------------------------------------------------------
# Batches: chosen and rejected answers scored in one forward pass


def collate_pairs(pairs, pad_id) -> dict:
    """pairs: B tuples (chosen_ids, chosen_labels, rejected_ids, rejected_labels, ...) -> a
    pad_batch of 2B rows: rows :B chosen, rows B: rejected, padded to the longest of all 2B. One
    forward pass over both halves is faster than two (open-instruct's concatenated_forward)."""
    return pad_batch([(p[0], p[1]) for p in pairs] + [(p[2], p[3]) for p in pairs], pad_id)


# -----------------------------------------------------------------------------
# The log-probability of an answer


def answer_logps(token_logps, keep, average=False):
    """token_logps (N, T-1), the log-probability of each token given those before it, and keep
    (N, T-1), which tokens are the answer's (labels[:, 1:] != -100) -> (N,): the sum over the
    answer, log π(y|x); average=True divides by its length (0 tokens give 0, not open-instruct's
    NaN). Sums by default: π(y|x) in DPO Eq. 7 is the whole answer's probability; averages with
    DPO's β shrink every margin by the answer's length and collapse training (TRL issue #789);
    losses made for averages (larger β) say so in uses_average."""
    total = (token_logps * keep).sum(-1)  # (N,)
    return total / keep.sum(-1).clamp(min=1) if average else total


def sequence_logps(logits, labels, average=False):
    """logits (B, T, V), labels (B, T) -> (B,) float32:
        log π(y|x) = Σ_t log softmax(logits[t-1])[labels[t]]  over t with labels[t] != -100
    (position t-1 predicts token t), as open-instruct's _get_batch_logps; average=True
    divides by the labelled count (answer_logps). Upcast first: in bf16 a sum between
    -512 and -1024 moves in steps of 4, swamping DPO's margins."""
    # exercise: sequence_logps
    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # (B, T-1, V), (B, T-1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return answer_logps(logp, labels != -100, average)
    # end exercise


def concatenated_logps(model, batch, average=False):
    """One forward pass over a collate_pairs batch -> (chosen (B,), rejected (B,)): sequence_logps
    of each answer, without the (2B, T, V) logits: the model gives each learned token's log-prob."""
    logp = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return answer_logps(logp, batch["labels"][:, 1:] != -100, average).chunk(2)  # rows :B, rows B:


# -----------------------------------------------------------------------------
# Losses: how far the policy's margin moved from the reference's

LOSS_TYPES = {"sigmoid": False, "dpo_norm": True, "ipo": True}  # name -> averages log-probs?


def uses_average(loss_type) -> bool:
    """Whether `loss_type` wants sequence_logps(..., average=True), for policy and reference
    (open-instruct's is_average_loss; TRL's IPO); ValueError for an unknown loss_type."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r} (choose from {', '.join(LOSS_TYPES)})")
    return LOSS_TYPES[loss_type]


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0):
    """Four (B,) log-probs -> (losses, chosen_rewards, rejected_rewards), each (B,). With
        h = (πc − rc) − (πr − rr)     the policy's log-ratio margin over the reference's
    sigmoid:  loss = −(1−ε)·logσ(β·h) − ε·logσ(−β·h)        DPO Eq. 7; ε = label_smoothing
              > 0 is conservative DPO (Mitchell 2023), the labels trusted with prob. 1−ε
    dpo_norm: the same on average log-probs (open-instruct's name; Tulu 3 uses β = 5)
    ipo:      loss = (h − 1/(2β))²  on average log-probs, as TRL    IPO Eq. 17, β is its τ;
              a squared loss pulls h to a target instead of pushing it to ∞; ε unused
    rewards = β·(π − r), DPO's implicit reward, detached: they are only logged."""
    uses_average(loss_type)  # fails early on an unknown loss_type
    # exercise: dpo_loss
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)  # (B,)
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = (beta * (pi_chosen - ref_chosen)).detach()
    rejected_rewards = (beta * (pi_rejected - ref_rejected)).detach()
    return losses, chosen_rewards, rejected_rewards
    # end exercise


# -----------------------------------------------------------------------------
# What the training loop logs


def dpo_metrics(losses, chosen_rewards, rejected_rewards, pi_chosen, pi_rejected, reduction="mean") -> dict:
    """(B,) tensors -> floats under open-instruct's names; accuracy is strict (0 at step 0, where all
    rewards are 0). reduction="sum": for a loop that adds micro-batches, then divides by the step's pairs."""
    per_pair = {"loss": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),
                "rewards/margin": chosen_rewards - rejected_rewards,
                "logps/chosen": pi_chosen, "logps/rejected": pi_rejected}
    reduce = {"mean": torch.mean, "sum": torch.sum}[reduction]
    return {k: float(reduce(v.detach().float())) for k, v in per_pair.items()}
