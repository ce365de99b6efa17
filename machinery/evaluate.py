"""The evaluation harness: held-out loss, preference accuracy and multiple-choice accuracy
(MMLU 5-shot, QLoRA Sec. 5), as the model cards report them, and the demo's exact answers.
Every number comes from the model in eval mode by the code that trains: tulu.py's tasks,
eval_batches and autocast, handed in (this folder never imports tulu.py). Multiple choice
follows Hendrycks et al.'s evaluate.py: a header, solved examples of the same subject, the
question ending in "Answer:", and each letter scored by the summed log-probability of the
tokens " A" adds to the prompt.
"""
import itertools
import math

import torch
from tqdm import tqdm

import llama
from llama import TuluError
from machinery.data import KIND_KEYS, row_keys

EVAL_KINDS = {**KIND_KEYS, "choice": ("question", "choices", "answer")}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def data_kind(args, objects) -> str:
    """sft (QLoRA's rows too), prefs or choice, by the keys of the first of `objects` ((line,
    object) pairs); and the flags that kind needs: a reference for pairs, --dev for --shots."""
    n, obj = next(objects)
    found = (k for k, keys in EVAL_KINDS.items() if all(key in obj for key in keys))
    kind = next(found, "sft" if row_keys(obj) else None)
    if kind is None:
        raise TuluError(f"{args.data}:{n}: expected the keys of SFT conversations ('messages') or QLoRA's "
                        f"rows ('input', 'output' or 'text'), preference pairs ('chosen', 'rejected') or "
                        f"multiple choice ('question', 'choices', 'answer')")
    if kind == "prefs" and not (args.adapter or args.reference):
        raise TuluError(f"{args.data}: preference pairs need a reference model: --adapter (the model "
                        f"without it is the reference) or --reference DIR")
    if kind == "choice" and args.shots and not args.dev:
        raise TuluError("--shots needs --dev, the file the solved examples come from")
    return kind


@torch.no_grad()
def held_out_metrics(model, examples, task, args, eval_batches, autocast) -> dict:
    """The task's numbers summed over the batches, over its count: for SFT the loss, the mean
    negative log-likelihood of the learned tokens (each weighing the same), and perplexity
    = exp(loss); for pairs DPO's metrics (dpo.dpo_metrics) averaged, rewards/accuracy the
    fraction whose chosen answer gains more over the reference than the rejected one."""
    sums, count = {}, 0
    for _, batch in eval_batches(model, examples, task, args, "held-out"):
        with autocast(args):
            total, metrics = task.loss(model, batch, 1)  # summed over the batch
        sums = {k: sums.get(k, 0.0) + v for k, v in {"loss": float(total), **metrics}.items()}
        count += task.count(batch)  # learned tokens, or pairs
    mean = {k: v / count for k, v in sums.items()}
    return mean if metrics else {**mean, "perplexity": math.exp(mean["loss"])}  # SFT's task has no metrics


# -----------------------------------------------------------------------------
# Multiple choice (MMLU's protocol)


def read_choices(path, objects) -> list[dict]:
    """The multiple-choice items of `objects` ((line, object) pairs), checked."""
    items = []
    for n, obj in objects:
        c, a, s = obj.get("choices"), obj.get("answer"), obj.get("subject")
        strings = isinstance(c, list) and 2 <= len(c) <= len(LETTERS) and all(isinstance(x, str) for x in c)
        if not (strings and isinstance(obj.get("question"), str) and isinstance(s, (str, type(None)))):
            raise TuluError(f"{path}:{n}: expected 'question' (a string) and 'choices' (a list of 2 to "
                            f"{len(LETTERS)} strings), and 'subject' a string if given")
        if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < len(c):
            raise TuluError(f"{path}:{n}: 'answer' must be the index of the right choice, 0 to {len(c) - 1}")
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


def choice_rows(item, shots, tok, max_seq_length) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) for each letter: ids = encode(prompt + " " + letter) with BOS, labels on the
    tokens beyond encode(prompt), the letter's (one or more). The prompt holds as many of `shots`
    as fit (MMLU's evaluate.py drops them from the end)."""
    k = len(shots)
    while k and len(tok.encode(choice_prompt(item, shots[:k]), bos=True)) + 2 > max_seq_length:
        k -= 1
    prompt = choice_prompt(item, shots[:k])
    cut = len(tok.encode(prompt, bos=True))
    rows = [tok.encode(f"{prompt} {letter}", bos=True) for letter in LETTERS[:len(item["choices"])]]
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
    rows = []
    for item in items:
        same = [d for d in dev if d.get("subject") == item.get("subject")][:shots]
        rows += choice_rows(item, same, tok, args.max_seq_length)
    scores, right = iter(score(rows)), {}  # subject -> [right or not, for each of its questions]
    for item in items:
        letters = [next(scores) for _ in item["choices"]]
        right.setdefault(item.get("subject"), []).append(letters.index(max(letters)) == item["answer"])
    named = sorted(k for k in right if k is not None)
    return {"accuracy": sum(map(sum, right.values())) / len(items),
            **{f"accuracy/{k}": sum(right[k]) / len(right[k]) for k in named}}


def report(args, kind, n, result, shots=0):
    """One line (multiple choice: overall accuracy only), and --output as JSON."""
    what = {"sft": f"{n} conversations", "prefs": f"{n} pairs", "choice": f"{n} questions, {shots}-shot"}
    shown = {k: v for k, v in result.items() if kind != "choice" or k == "accuracy"}
    print(f"{args.data} ({what[kind]}): " + " ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    if args.output:
        llama.write_json(args.output, result)
        print(f"wrote {args.output}")


# -----------------------------------------------------------------------------
# The demo's exact answers


def answer_prompts(conversations, n) -> list[tuple[list[dict], str]]:
    """(prompt, reference) for the first n `conversations` ((line, object) pairs), each ending
    in an assistant's answer as the demo's do: the turns before that answer, and the answer."""
    return [(o["messages"][:-1], o["messages"][-1]["content"]) for _, o in itertools.islice(conversations, n)]


def greedy_answers(model, tok, prompts, stop, max_new_tokens=48, show=True) -> list[str]:
    """The model's greedy answer to each prompt's ids (tulu.py's encode_prompt), stripped."""
    model.eval()
    answers = [llama.generate(model, ids, max_new_tokens, eos_id=stop)
               for ids in tqdm(prompts, desc="answers", leave=False, disable=not show)]
    return [tok.decode([t for t in a if t not in stop]).strip() for a in answers]


def exact_match(answers, references) -> float:
    """The fraction of answers equal to their reference (both stripped)."""
    return sum(a.strip() == r.strip() for a, r in zip(answers, references)) / len(references)
