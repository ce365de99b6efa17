"""The evaluation harness: what the model cards report -- held-out loss, preference
accuracy, multiple-choice accuracy (MMLU 5-shot, QLoRA Sec. 5) -- and the demo's exact
answers. `tulu.py eval` tells a data file's kind by the keys of its first object:
messages (SFT), chosen/rejected (preferences), question/choices/answer (multiple choice).
Every number comes from the model in eval mode, in batches of --batch-size, by the code
that trains: tulu.py's task (SFTTask, DPOTask), eval_batches and autocast, handed in as
parameters (this folder never imports tulu.py), as are the files' objects (read with
file:line errors by machinery/data.py's readers).

Multiple choice follows Hendrycks et al.'s evaluate.py: a header, solved examples of
the same subject, the question ending in "Answer:", and each letter scored by the
summed log-probability of the tokens " A" adds to the prompt.
"""
import math

import torch
from tqdm import tqdm

import llama
from llama import TuluError
from machinery.data import KIND_KEYS, row_keys

EVAL_KINDS = {**KIND_KEYS, "choice": ("question", "choices", "answer")}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def data_kind(path, objects) -> str:
    """sft (QLoRA's rows too), prefs or choice, from the keys of the first of `objects`
    ((line, object) pairs)."""
    n, obj = next(objects)
    found = (k for k, keys in EVAL_KINDS.items() if all(key in obj for key in keys))
    kind = next(found, "sft" if row_keys(obj) else None)
    if kind is None:
        raise TuluError(f"{path}:{n}: expected the keys of SFT conversations ('messages') or QLoRA's rows "
                        f"('input', 'output' or 'text'), preference pairs ('chosen', 'rejected') or multiple "
                        f"choice ('question', 'choices', 'answer')")
    return kind


def check_eval_args(args, kind):
    """The flags a kind of data needs: a reference for preference pairs, --dev for --shots."""
    if kind == "prefs" and not (args.adapter or args.reference):
        raise TuluError(f"{args.data}: preference pairs need a reference model: --adapter (the model "
                        f"without it is the reference) or --reference DIR")
    if kind == "choice" and args.shots and not args.dev:
        raise TuluError("--shots needs --dev, the file the solved examples come from")


@torch.no_grad()
def sft_metrics(model, examples, task, args, eval_batches, autocast) -> dict:
    """loss: the mean negative log-likelihood of the learned tokens (the assistant answers
    and their EOS), every token weighing the same; perplexity: exp(loss)."""
    nll, tokens = 0.0, 0
    for _, batch in eval_batches(model, examples, task, args, "loss"):
        with autocast(args):
            total, _ = task.loss(model, batch, 1)  # summed over the batch's learned tokens
        nll, tokens = nll + float(total), tokens + task.count(batch)
    return {"loss": nll / tokens, "perplexity": math.exp(nll / tokens)}


@torch.no_grad()
def preference_metrics(model, pairs, task, args, eval_batches, autocast) -> dict:
    """DPO's metrics (dpo.dpo_metrics) averaged over pairs: rewards/accuracy is the fraction
    whose chosen answer gains more over the reference than the rejected one."""
    sums = {}
    for _, batch in eval_batches(model, pairs, task, args, desc="pairs"):
        with autocast(args):
            _, m = task.loss(model, batch, 1)
        sums = {k: sums.get(k, 0.0) + v for k, v in m.items()}
    return {k: v / len(pairs) for k, v in sums.items()}


# -----------------------------------------------------------------------------
# Multiple choice (MMLU's protocol)


def read_choices(path, objects) -> list[dict]:
    """The multiple-choice items of a file's `objects` ((line, object) pairs), checked."""
    items = []
    for n, obj in objects:
        q, c, a, s = obj.get("question"), obj.get("choices"), obj.get("answer"), obj.get("subject")
        if not isinstance(q, str) or not isinstance(c, list) or not all(isinstance(x, str) for x in c):
            raise TuluError(f"{path}:{n}: expected 'question' (a string) and 'choices' (a list of strings)")
        if not 2 <= len(c) <= len(LETTERS):
            raise TuluError(f"{path}:{n}: 'choices' must hold 2 to {len(LETTERS)} answers, not {len(c)}")
        if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < len(c):
            raise TuluError(f"{path}:{n}: 'answer' must be the index of the right choice, 0 to {len(c) - 1}")
        if s is not None and not isinstance(s, str):
            raise TuluError(f"{path}:{n}: 'subject' must be a string")
        items.append(obj)
    return items


def choice_prompt(item, shots) -> str:
    """MMLU's prompt (Hendrycks et al. 2021, their evaluate.py): the header ("... about
    {subject}."), the solved examples `shots` with their answers, then the question."""
    def question(q, solved: bool) -> str:
        text = q["question"] + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q["choices"]))
        return text + (f"\nAnswer: {LETTERS[q['answer']]}\n\n" if solved else "\nAnswer:")
    subject = item.get("subject")
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    head = f"The following are multiple choice questions (with answers){about}.\n\n"
    return head + "".join(question(s, True) for s in shots) + question(item, False)


def fitting_prompt(item, shots, tok, max_seq_length) -> str:
    """choice_prompt with as many of `shots` as fit (MMLU's evaluate.py drops them from the end)."""
    k = len(shots)
    while k and len(tok.encode(choice_prompt(item, shots[:k]), bos=True)) + 2 > max_seq_length:
        k -= 1
    return choice_prompt(item, shots[:k])


def choice_rows(prompt, n_choices, tok) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) for each letter: ids = encode(prompt + " " + letter) with BOS,
    labels only on the tokens beyond encode(prompt), the letter's (one or more)."""
    cut = len(tok.encode(prompt, bos=True))
    rows = [tok.encode(f"{prompt} {letter}", bos=True) for letter in LETTERS[:n_choices]]
    return [(ids, [-100] * cut + ids[cut:]) for ids in rows]


@torch.no_grad()
def choice_scores(model, rows, task, args, eval_batches, autocast) -> list[float]:
    """The summed log-probability of each row's labelled tokens (choice_rows); task: an SFTTask."""
    scores = []
    for _, batch in eval_batches(model, rows, task, args, "choices"):
        with autocast(args):
            logp = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        scores += logp.sum(-1).tolist()
    return scores


def choice_metrics(items, dev, shots, tok, args, score) -> dict:
    """accuracy: the fraction of questions whose right letter has the highest summed
    log-probability (`score`: rows -> choice_scores); accuracy/SUBJECT the same per subject."""
    rows, spans = [], []
    for item in items:
        same = [d for d in dev if d.get("subject") == item.get("subject")][:shots]
        prompt = fitting_prompt(item, same, tok, args.max_seq_length)
        spans.append((len(rows), len(item["choices"])))
        rows += choice_rows(prompt, len(item["choices"]), tok)
    scores, right = score(rows), {}  # subject -> [right or not, for each of its questions]
    for item, (start, n) in zip(items, spans):
        ok = max(range(n), key=lambda i: scores[start + i]) == item["answer"]
        right.setdefault(item.get("subject"), []).append(ok)
    per = {f"accuracy/{s}": sum(r) / len(r) for s, r in sorted(i for i in right.items() if i[0] is not None)}
    return {"accuracy": sum(map(sum, right.values())) / len(items), **per}


def report(args, kind, n, result, shots=0):
    """One line (multiple choice: overall accuracy only), and --output as JSON."""
    what = {"sft": f"{n} conversations", "prefs": f"{n} pairs",
            "choice": f"{n} questions, {shots}-shot"}[kind]
    shown = {k: v for k, v in result.items() if kind != "choice" or k == "accuracy"}
    print(f"{args.data} ({what}): " + " ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    if args.output:
        llama.write_json(args.output, result)
        print(f"wrote {args.output}")


# -----------------------------------------------------------------------------
# The demo's exact answers


def answer_prompts(conversations, n=None) -> list[tuple[list[dict], str]]:
    """(prompt, reference) for the first n `conversations` ((line, object) pairs): every
    turn before the last assistant answer (earlier answers as written), and that answer."""
    out = []
    for _, obj in conversations:
        last = max((i for i, m in enumerate(obj["messages"]) if m["role"] == "assistant"), default=None)
        if last is not None and obj["messages"][last - 1]["role"] == "user":
            out.append((obj["messages"][:last], obj["messages"][last]["content"]))
        if n and len(out) == n:
            break
    return out


@torch.no_grad()
def greedy_answers(model, tok, prompts, stop, max_new_tokens=48, show=True) -> list[str]:
    """The model's greedy answer to each prompt's ids (tulu.py's encode_prompt), stripped."""
    model.eval()
    answers = [llama.generate(model, ids, max_new_tokens, eos_id=stop)
               for ids in tqdm(prompts, desc="answers", leave=False, disable=not show)]
    return [tok.decode([t for t in a if t not in stop]).strip() for a in answers]


def exact_match(answers, references) -> float:
    """The fraction of answers equal to their reference (both stripped)."""
    return sum(a.strip() == r.strip() for a, r in zip(answers, references)) / len(references)
