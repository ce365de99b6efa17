"""`tulu.py eval`: every number against a loop written here, one example at a time
and unpadded, over the logits of the tiny fixture Llama (tests/fixtures/cli/hf_tiny);
the multiple-choice prompt against MMLU's protocol (the issue's text, Hendrycks et
al.'s evaluate.py) character by character; a letter that is two tokens; data kinds,
bad data and --output.

Each expected value is computed from its definition:
  loss        = sum of -log p(token | tokens before) over learned tokens / their count
  rewards/*   = beta * (log pi(answer) - log pi_ref(answer)), pi = base + adapter merged
  accuracy    = fraction of questions whose right letter scores highest, a letter's
                score the summed log-probability of its tokens after the prompt
"""
import json
import math
import os

import pytest
import torch

import llama
import lora
import tulu
from machinery import cli, evaluate, outputs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HF_TINY = os.path.join(HERE, "fixtures", "cli", "hf_tiny")


def base():
    return llama.load_model(HF_TINY, torch.float32)


@pytest.fixture(scope="module")
def tok():
    return llama.Tokenizer(HF_TINY)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_lines(name, n):
    with open(os.path.join(ROOT, "data", name)) as f:
        return [json.loads(next(f)) for _ in range(n)]


def run_eval(tmp_path, *argv):
    out = tmp_path / "result.json"
    tulu.main(["eval", "--model", HF_TINY, *map(str, argv), "--output", str(out)])
    return json.loads(out.read_text())


@torch.no_grad()
def logp_after(model, ids, start):
    """sum over t >= start of log p(ids[t] | ids[:t]): one unpadded sequence."""
    logits = model(torch.tensor([ids]))[0].double()
    return sum(float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(start, len(ids)))


@torch.no_grad()
def learned_logp(model, ids, labels):
    """sum of log p over the tokens whose label is not -100 (labels equal ids there)."""
    logits = model(torch.tensor([ids]))[0].double()
    return sum(float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(1, len(ids)) if labels[t] != -100)


# -----------------------------------------------------------------------------
# SFT conversations: loss and perplexity


def test_sft_loss_is_the_token_weighted_nll_of_the_learned_tokens(tmp_path, tok):
    """7 conversations (one multi-turn) in batches of 3: padding and a short last batch.
    Token-weighted, not the mean of per-conversation means."""
    rows = first_lines("sft_train.jsonl", 7)
    got = run_eval(tmp_path, "--data", jsonl(tmp_path / "sft.jsonl", rows), "--batch-size", 3)
    model, nll, count = base(), 0.0, 0
    for row in rows:
        ids, labels = tulu.encode_messages(row["messages"], tok, 2048)
        nll -= learned_logp(model, ids, labels)
        count += sum(label != -100 for label in labels[1:])
    assert set(got) == {"loss", "perplexity"}
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


# -----------------------------------------------------------------------------
# Preference pairs: DPO's metrics against a reference


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter on hf_tiny with B != 0, so that policy and reference differ."""
    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = base()
    lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, 0.0, 0.05)
    lora.save_adapter(model, str(out), base_model_name_or_path=HF_TINY)
    return out


def expected_preferences(pairs, tok, policy, reference, beta=0.1):
    """DPO's metrics from their definitions, pair by pair."""
    per = []
    for p in pairs:
        cid, cl, rid, rl = tulu.encode_pair(p["chosen"], p["rejected"], tok, 2048)
        pc, pr = learned_logp(policy, cid, cl), learned_logp(policy, rid, rl)
        rc, rr = learned_logp(reference, cid, cl), learned_logp(reference, rid, rl)
        c, r = beta * (pc - rc), beta * (pr - rr)
        per.append({"loss": -math.log(1 / (1 + math.exp(-(c - r)))), "rewards/chosen": c, "rewards/rejected": r,
                    "rewards/accuracy": float(c > r), "rewards/margin": c - r, "logps/chosen": pc,
                    "logps/rejected": pr})
    return {k: sum(x[k] for x in per) / len(per) for k in per[0]}


def assert_metrics(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k


def merged(adapter_dir):
    model = base()
    lora.load_adapter(model, str(adapter_dir))
    return lora.merge_lora(model)


def test_preference_metrics_with_the_model_without_its_adapter_as_reference(tmp_path, tok, adapter):
    pairs = first_lines("prefs_train.jsonl", 6)
    got = run_eval(tmp_path, "--adapter", adapter, "--data", jsonl(tmp_path / "p.jsonl", pairs), "--batch-size", 4)
    want = expected_preferences(pairs, tok, merged(adapter), base())
    assert_metrics(got, want)
    assert 0 < want["rewards/accuracy"] < 1  # the test can tell accuracy from its complement


def test_preference_metrics_against_a_reference_folder_and_another_beta(tmp_path, tok, adapter):
    """--reference DIR: a full model (the adapter merged and saved) against hf_tiny."""
    pairs = first_lines("prefs_train.jsonl", 5)
    policy = tmp_path / "policy"
    llama.save_model(merged(adapter), str(policy))
    for name in outputs.TOKENIZER_FILES:
        if os.path.exists(os.path.join(HF_TINY, name)):
            (policy / name).write_bytes(open(os.path.join(HF_TINY, name), "rb").read())
    out = tmp_path / "r.json"
    tulu.main(["eval", "--model", str(policy), "--reference", HF_TINY, "--beta", "0.5",
               "--data", str(jsonl(tmp_path / "p.jsonl", pairs)), "--output", str(out)])
    assert_metrics(json.loads(out.read_text()), expected_preferences(pairs, tok, merged(adapter), base(), beta=0.5))


# -----------------------------------------------------------------------------
# Multiple choice, MMLU's protocol


ITEM = {"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1,
        "subject": "elementary_mathematics"}
DEV = [{"question": "What is 1 + 1?", "choices": ["1", "2", "3", "4"], "answer": 1, "subject": "elementary_mathematics"},
       {"question": "Who wrote Hamlet?", "choices": ["Shakespeare", "Milton"], "answer": 0, "subject": "literature"},
       {"question": "What is 3 - 1?", "choices": ["2", "1", "0", "4"], "answer": 0, "subject": "elementary_mathematics"},
       {"question": "What is 5 + 0?", "choices": ["0", "5", "6", "50"], "answer": 1, "subject": "elementary_mathematics"}]

PROMPT_2_SHOT = ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                 "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                 "What is 3 - 1?\nA. 2\nB. 1\nC. 0\nD. 4\nAnswer: A\n\n"
                 "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")


def test_choice_prompt_is_mmlus_character_for_character():
    assert evaluate.choice_prompt(ITEM, [DEV[0], DEV[2]]) == PROMPT_2_SHOT
    bare = {k: v for k, v in ITEM.items() if k != "subject"}
    assert evaluate.choice_prompt(bare, []) == ("The following are multiple choice questions (with answers).\n\n"
                                            "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")


def test_shots_are_the_first_of_the_same_subject_in_dev_file_order(tmp_path, monkeypatch):
    prompts = []
    prompt = evaluate.choice_prompt
    monkeypatch.setattr(evaluate, "choice_prompt", lambda *a: prompts.append(prompt(*a)) or prompts[-1])
    got = run_eval(tmp_path, "--data", jsonl(tmp_path / "q.jsonl", [ITEM]),
                   "--dev", jsonl(tmp_path / "dev.jsonl", DEV), "--shots", 2)
    assert set(prompts) == {PROMPT_2_SHOT}
    assert set(got) == {"accuracy", "accuracy/elementary_mathematics"}


def test_shots_are_dropped_from_the_end_until_the_prompt_fits(tok):
    shots = [DEV[0], DEV[2], DEV[3]]
    full = len(tok.encode(evaluate.choice_prompt(ITEM, shots), bos=True))
    two = len(tok.encode(evaluate.choice_prompt(ITEM, shots[:2]), bos=True))
    rows = lambda k, length=10**6: evaluate.choice_rows(ITEM, shots[:k], tok, length)  # noqa: E731
    assert rows(3, full + 2) == rows(3) and rows(3, full + 1) == rows(2) and rows(3, two + 1) == rows(1)
    assert rows(3)[0][0][:full] == tok.encode(evaluate.choice_prompt(ITEM, shots), bos=True)


def test_a_letter_of_two_tokens_is_scored_by_both(tok):
    """In hf_tiny's vocabulary " E" after "Answer:" is two tokens; the score of every
    letter is the sum over all its tokens, batched and padded as eval does."""
    item = {"question": "Pick one.", "choices": ["a", "b", "c", "d", "e"], "answer": 4}
    prompt = evaluate.choice_prompt(item, [])
    rows = evaluate.choice_rows(item, [], tok, 2048)
    cut = len(tok.encode(prompt, bos=True))
    assert [len(ids) - cut for ids, _ in rows] == [1, 1, 1, 2, 2]  # D and E: "▁" + the letter
    model = base()
    args = tulu.TrainConfig(batch_size=3, device="cpu", dtype=torch.float32)
    got = evaluate.choice_scores(model, rows, tulu.SFTTask(tok.eos_id), args, cli.eval_batches, cli.autocast)
    want = [logp_after(model, tok.encode(f"{prompt} {letter}", bos=True), cut) for letter in "ABCDE"]
    assert got == pytest.approx(want, rel=1e-5)
    one_token = [logp_after(model, tok.encode(f"{prompt} {letter}", bos=True)[:cut + 1], cut) for letter in "DE"]
    assert all(abs(g - o) > 1e-3 for g, o in zip(got[3:], one_token))  # the second token counts


def test_accuracy_is_the_fraction_whose_right_letter_scores_highest(tmp_path, tok):
    """Six questions in two subjects; the right answer set to the hand-computed best
    letter for four of them, to another letter for two: 4/6, per subject 2/3 and 2/3."""
    model, items = base(), []
    for i, subject in enumerate(["history", "physics"] * 3):
        item = {"question": f"Question {i}: which?", "choices": ["one", "two", "three", "four"], "answer": 0,
                "subject": subject}
        prompt = evaluate.choice_prompt(item, [])
        cut = len(tok.encode(prompt, bos=True))
        scores = [logp_after(model, tok.encode(f"{prompt} {letter}", bos=True), cut) for letter in "ABCD"]
        best = max(range(4), key=scores.__getitem__)
        item["answer"] = best if i < 4 else (best + 1) % 4
        items.append(item)
    got = run_eval(tmp_path, "--data", jsonl(tmp_path / "q.jsonl", items), "--batch-size", 5)
    assert got == pytest.approx({"accuracy": 4 / 6, "accuracy/history": 2 / 3, "accuracy/physics": 2 / 3})


# -----------------------------------------------------------------------------
# What a user sees


def test_kind_comes_from_the_keys_and_one_line_is_printed(tmp_path, capsys):
    run_eval(tmp_path, "--data", jsonl(tmp_path / "q.jsonl", [ITEM]))
    line = [x for x in capsys.readouterr().out.splitlines() if "accuracy" in x]
    assert len(line) == 1 and "(1 questions, 0-shot): accuracy " in line[0]


@pytest.mark.parametrize("rows, flags, message", [
    ([{"chosen": [], "rejected": []}], [], "preference pairs need a reference model: --adapter"),
    ([{"prompt": "hi"}], [], "x.jsonl:1: expected the keys of SFT conversations"),
    ([ITEM, {**ITEM, "answer": 4}], [], "x.jsonl:2: 'answer' must be the index of the right choice, 0 to 3"),
    ([ITEM, {**ITEM, "choices": "ABCD"}], [], "x.jsonl:2: expected 'question' (a string) and 'choices'"),
    ([ITEM], ["--shots", "5"], "--shots needs --dev"),
])
def test_bad_data_is_one_line_with_file_and_line(tmp_path, capsys, rows, flags, message):
    path = jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(SystemExit) as e:
        tulu.main(["eval", "--model", HF_TINY, "--data", str(path), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 1 and message in err and len(err.strip().splitlines()) == 1, err
