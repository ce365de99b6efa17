"""Write the sample data sets in data/, written for this project (no third-party text).

    python data/make_data.py      # rewrites the five .jsonl files, byte for byte the same

Small tasks with short answers, so that the tiny default Llama (about a million
parameters, two minutes on a laptop CPU) visibly learns them:

- arithmetic: additions and subtractions of small numbers, some multi-turn
  ("Now add 3.");
- word games: reverse or spell a word, count its letters, its first or last
  letter, opposites, upper case;
- short facts: colours of things, capitals, animal sounds and legs.

Formats are those of the Tulu 2 releases (see DESIGN.md): SFT lines
{"dataset", "messages"} and preference lines {"chosen", "rejected"}, the
two conversations sharing every turn but the last assistant answer, which is
correct in "chosen" and wrong in "rejected". Held-out files share no prompt
with the training files. Deterministic: a fixed seed and sorted tables.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1234
N_SFT_TRAIN, N_SFT_HELDOUT = 3000, 200
N_PREFS_TRAIN, N_PREFS_HELDOUT = 1000, 100

# -----------------------------------------------------------------------------
# Tables

WORDS = """apple bread chair cloud dream earth flame glass green happy house juice
lemon light money mouse music night ocean paper party plant queen river robot
salad sheep smile snake spoon storm sugar table tiger train water whale world
zebra bird book cake door fish frog gold hand kite lamp moon nest rain ring rose
sand ship shoe star tree wind wolf bell coat drum milk road seed sock tent boat
cat dog sun sky cup hat pen box egg fox bus map car bee owl ant pig hen jam""".split()

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"),
             ("day", "night"), ("open", "closed"), ("light", "dark"), ("old", "new"), ("early", "late"),
             ("full", "empty"), ("hard", "soft"), ("high", "low"), ("left", "right"), ("long", "short"),
             ("loud", "quiet"), ("rich", "poor"), ("wet", "dry"), ("win", "lose"), ("yes", "no"),
             ("in", "out"), ("first", "last"), ("thick", "thin"), ("push", "pull"),
             ("clean", "dirty"), ("near", "far"), ("strong", "weak"), ("top", "bottom"), ("buy", "sell")]

COLORS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
          ("a tomato", "red"), ("an orange", "orange"), ("a carrot", "orange"), ("milk", "white"),
          ("a lemon", "yellow"), ("a strawberry", "red"), ("the sea", "blue"), ("a leaf", "green"),
          ("chocolate", "brown"), ("a crow", "black"), ("a flamingo", "pink"), ("an eggplant", "purple"),
          ("a lime", "green"), ("the sun", "yellow"), ("blood", "red")]

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasília"), ("Peru", "Lima"),
            ("Colombia", "Bogotá"), ("Iceland", "Reykjavík"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Poland", "Warsaw"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("India", "New Delhi"),
            ("Russia", "Moscow"), ("Australia", "Canberra"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
            ("Austria", "Vienna"), ("Cuba", "Havana"), ("Chile", "Santiago"), ("Thailand", "Bangkok"),
            ("Vietnam", "Hanoi"), ("Ghana", "Accra")]

SOUNDS = [("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
          ("pig", "oink"), ("horse", "neigh"), ("owl", "hoot"), ("lion", "roar"), ("bee", "buzz"),
          ("snake", "hiss"), ("frog", "croak"), ("mouse", "squeak"), ("rooster", "cock-a-doodle-doo")]

LEGS = [("spider", 8), ("dog", 4), ("cat", 4), ("bird", 2), ("ant", 6), ("bee", 6), ("horse", 4),
        ("chicken", 2), ("octopus", 8), ("fish", 0), ("snake", 0), ("cow", 4), ("duck", 2), ("beetle", 6)]

NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()

SYSTEMS = ["You are a helpful assistant.", "You are a friendly tutor for children.",
           "Answer briefly.", "You are Tulu, a small assistant trained on a laptop."]
TERSE = "Reply with just the answer."  # changes the answer's form: the model must read the system turn


def msg(role, content):
    return {"role": role, "content": content}


# -----------------------------------------------------------------------------
# Tasks: each returns (question, answer, terse answer, wrong answer)


def arithmetic(r):
    a, b = r.randint(0, 20), r.randint(0, 20)
    if r.random() < 0.5:
        op, c = "+", a + b
    else:
        a, b = max(a, b), min(a, b)
        op, c = "-", a - b
    q = r.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "How much is {a} {op} {b}?"])
    wrong = c + r.choice([-2, -1, 1, 2]) if c > 1 else c + r.choice([1, 2])
    return q.format(a=a, op=op, b=b), f"{a} {op} {b} = {c}", str(c), f"{a} {op} {b} = {wrong}"


def word_game(r):
    w = r.choice(WORDS)
    kind = r.randrange(6)
    if kind == 0:
        q, a = r.choice(["Reverse the word \"{w}\".", "Write \"{w}\" backwards."]).format(w=w), w[::-1]
        wrong = w  # not reversed at all (WORDS holds no palindrome)
    elif kind == 1:
        q, a = f"Spell the word \"{w}\".", "-".join(w)
        wrong = "-".join(w[:-1]) if len(w) > 2 else "-".join(w + w[-1])
    elif kind == 2:
        q = r.choice(["How many letters are in \"{w}\"?", "Count the letters in \"{w}\"."]).format(w=w)
        a, wrong = f"\"{w}\" has {len(w)} letters.", f"\"{w}\" has {len(w) + r.choice([-1, 1])} letters."
    elif kind == 3:
        first = r.random() < 0.5
        q = f"What is the {'first' if first else 'last'} letter of \"{w}\"?"
        a = w[0] if first else w[-1]
        wrong = next(c for c in "xqzjkv" if c != a)
    elif kind == 4:
        x, y = r.choice(OPPOSITES)
        if r.random() < 0.5:
            x, y = y, x
        q, a = r.choice(["What is the opposite of \"{x}\"?", "Give the opposite of \"{x}\"."]).format(x=x), y
        wrong = x
    else:
        q, a, wrong = f"Write \"{w}\" in capital letters.", w.upper(), w.capitalize()
    return q, a, a, wrong


def fact(r):
    kind = r.randrange(4)
    if kind == 0:
        thing, color = r.choice(COLORS)
        q = r.choice(["What color is {t}?", "What colour is {t}?"]).format(t=thing)
        wrong = r.choice([c for _, c in COLORS if c != color])
        return q, f"{thing[0].upper() + thing[1:]} is {color}.", color, f"{thing[0].upper() + thing[1:]} is {wrong}."
    if kind == 1:
        country, city = r.choice(CAPITALS)
        q = r.choice(["What is the capital of {c}?", "Which city is the capital of {c}?"]).format(c=country)
        wrong = r.choice([c for _, c in CAPITALS if c != city])
        return q, f"The capital of {country} is {city}.", city, f"The capital of {country} is {wrong}."
    if kind == 2:
        animal, sound = r.choice(SOUNDS)
        wrong = r.choice([s for _, s in SOUNDS if s != sound])
        return f"What sound does a {animal} make?", f"A {animal} says \"{sound}\".", sound, \
            f"A {animal} says \"{wrong}\"."
    animal, n = r.choice(LEGS)
    wrong = r.choice([m for m in (0, 2, 4, 6, 8) if m != n])
    return f"How many legs does a {animal} have?", f"A {animal} has {NUMBER_WORDS[n]} legs.", str(n), \
        f"A {animal} has {NUMBER_WORDS[wrong]} legs."


TASKS = [("arith", arithmetic), ("words", word_game), ("facts", fact)]

# -----------------------------------------------------------------------------
# Conversations


def follow_up(r, last):
    """A second arithmetic turn that builds on the previous answer ("Now add 3.")."""
    c = int(last.rsplit(" ", 1)[-1])
    d = r.randint(1, 9)
    if r.random() < 0.5 or c < d:
        return f"Now add {d}.", f"{c} + {d} = {c + d}"
    return f"Now subtract {d}.", f"{c} - {d} = {c - d}"


def conversation(r):
    """One SFT conversation: 1-3 user/assistant exchanges, a system turn in about 30%."""
    name, task = r.choice(TASKS)
    system = r.choice(SYSTEMS + [TERSE]) if r.random() < 0.3 else None
    q, a, terse, _ = task(r)
    messages = ([msg("system", system)] if system else []) + [msg("user", q), msg("assistant", terse if system == TERSE else a)]
    while r.random() < 0.15 and len(messages) < 7:  # multi-turn
        if name == "arith" and system != TERSE:
            q, a = follow_up(r, messages[-1]["content"])
        else:
            q, a, terse, _ = task(r)
            a = terse if system == TERSE else a
        messages += [msg("user", q), msg("assistant", a)]
    return name, messages


def pair(r):
    """One preference pair: the same prompt, a correct and a wrong final answer."""
    name, task = r.choice(TASKS)
    q, a, _, wrong = task(r)
    prompt = ([msg("system", r.choice(SYSTEMS))] if r.random() < 0.2 else []) + [msg("user", q)]
    return prompt, a, wrong


def split(items, key, n_held, r):
    """(train, held_out): n_held items whose key occurs once in `items`, so that no
    held-out prompt is also a training prompt; the rest, in order, for training."""
    counts = {}
    for item in items:
        counts[key(item)] = counts.get(key(item), 0) + 1
    singles = [i for i, item in enumerate(items) if counts[key(item)] == 1]
    held = set(r.sample(singles, n_held))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")  # compact: small files


# -----------------------------------------------------------------------------
# Pre-training text: what a base model knows before SFT teaches it to chat


def reference_pages():
    """The knowledge the tasks draw on, written as plain reference text (no chat
    markers, no questions): addition and subtraction tables, a page per word
    (spelling, length, first and last letter, backwards, capitals), opposites,
    colours, capitals, animal sounds and legs. A real base model has read such
    text; SFT then teaches the tiny one to answer questions with it, so held-out
    questions test the format learned in SFT and the knowledge of pre-training,
    as in Tulu 2. No held-out question appears here: these are facts, not prompts."""
    lines = [f"{a} + {b} = {a + b}" for a in range(21) for b in range(21)]
    lines += [f"{a} - {b} = {a - b}" for a in range(21) for b in range(a + 1)]
    lines += [f"The opposite of \"{x}\" is {y}. The opposite of \"{y}\" is {x}." for x, y in OPPOSITES]
    lines += [f"{t[0].upper() + t[1:]} is {c}." for t, c in COLORS]
    lines += [f"The capital of {c} is {city}." for c, city in CAPITALS]
    lines += [f"A {a} says \"{s}\"." for a, s in SOUNDS]
    lines += [f"A {a} has {NUMBER_WORDS[n]} legs." for a, n in LEGS]
    pages = ["\n".join(lines[i:i + 4]) for i in range(0, len(lines), 4)]  # short pages: batches pad little
    for w in sorted(set(WORDS)):
        pages.append(f"The word \"{w}\" is spelled {'-'.join(w)} and has {len(w)} letters.")
        pages.append(f"The first letter of \"{w}\" is {w[0]}, the last letter is {w[-1]}. \"{w}\" backwards is "
                     f"{w[::-1]}; in capital letters, {w.upper()}.")
    return [{"text": p} for p in pages]


def main(out_dir=HERE):
    r = random.Random(SEED)
    convs = [conversation(r) for _ in range(N_SFT_TRAIN + N_SFT_HELDOUT)]
    rows = [{"dataset": name, "messages": m} for name, m in convs]
    first_prompt = lambda row: json.dumps(row["messages"][:2 if row["messages"][0]["role"] == "system" else 1])  # noqa: E731
    train, held = split(rows, first_prompt, N_SFT_HELDOUT, r)
    write_jsonl(os.path.join(out_dir, "sft_train.jsonl"), train)
    write_jsonl(os.path.join(out_dir, "sft_heldout.jsonl"), held)

    pairs = [pair(r) for _ in range(N_PREFS_TRAIN + N_PREFS_HELDOUT)]
    assert all(a != w for _, a, w in pairs), "a rejected answer equals the chosen one"
    prefs = [{"chosen": p + [msg("assistant", a)], "rejected": p + [msg("assistant", w)]} for p, a, w in pairs]
    train, held = split(prefs, lambda row: json.dumps(row["chosen"][:-1]), N_PREFS_HELDOUT, r)
    write_jsonl(os.path.join(out_dir, "prefs_train.jsonl"), train)
    write_jsonl(os.path.join(out_dir, "prefs_heldout.jsonl"), held)
    write_jsonl(os.path.join(out_dir, "pretrain.jsonl"), reference_pages())


if __name__ == "__main__":
    main()
