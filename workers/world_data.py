"""The reference world's text: pretraining and alignment lines, and its evaluation sets.

Everything here is plain Python and seeded (no torch): :func:`make_data` returns the same
:class:`WorldData` for the same seed. Each evaluation set comes twice, from the same
generators and disjoint: ``sets`` (the job's data files) and ``fresh`` (a test split that no
job reads, for benchmarks; see :mod:`workers.world`). Sizes are chosen so that the job's
figures carry little noise: :data:`N_REWARD_PROMPTS` distinct prompts (standard error of a
mean reward well under a tenth of the base-to-aligned gap) and :data:`N_TAX_ITEMS` items per
tax set (one item moves a task's tax by under 0.01, a tenth of the world's budget, on
half of a set).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLOURS = ("red", "blue", "green", "gold", "pink", "grey")
ANIMALS = ("cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen")
ADJECTIVES = ("big", "small", "calm", "loud", "shy", "quick")
VERBS = ("sees", "likes", "finds", "helps", "meets", "hears")
PLACES = ("park", "barn", "lake", "hill", "road", "yard")
#: reward prompts per split (job and fresh): distinct, and disjoint across the two. The
#: reward per prompt is nearly two-valued (a styled answer or not, about 7 apart), so a paired
#: difference of two merges has an sd near 3: 960 prompts put about 290 in each of the job's
#: validation and holdout parts, an SE near 0.18 on a gain (320 gave 0.3-0.45 on 96)
N_REWARD_PROMPTS = 960
#: items per tax set per split (addition, facts, text) and preference pairs per split
N_TAX_ITEMS = 300
#: named entities with a memorised colour: one multiple-choice item each, in either split
N_ENTITIES = 2 * N_TAX_ITEMS
#: addends 0..MAX_ADDEND: (MAX_ADDEND + 1)^2 = 900 sums, each pretrained
MAX_ADDEND = 29
#: question kinds of :func:`question`
N_QUESTION_KINDS = 6


def _entities(rng: random.Random) -> list[str]:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < N_ENTITIES:
        name = (rng.choice(consonants) + rng.choice(vowels) + rng.choice(consonants)
                + rng.choice(vowels) + rng.choice(consonants))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def sentence(rng: random.Random) -> str:
    """A sentence of the toy grammar."""
    a1, a2 = rng.sample(ANIMALS, 2)
    return (f"the {rng.choice(ADJECTIVES)} {a1} {rng.choice(VERBS)} "
            f"the {rng.choice(ADJECTIVES)} {a2} in the {rng.choice(PLACES)}.")


def question(rng: random.Random, facts: dict[str, str], names: list[str] | None = None,
             ) -> tuple[str, str]:
    """A chat question and its plain answer. Half are about a named entity's colour (from
    ``names``, default all of ``facts``), the rest about animals, places and what they do."""
    kind = rng.randrange(2 * (N_QUESTION_KINDS - 1))
    if kind >= N_QUESTION_KINDS - 1:
        name = rng.choice(names if names is not None else list(facts))
        return f"Q: what about {name}?\nA:", f" {name} is {facts[name]}."
    animal, adj = rng.choice(ANIMALS), rng.choice(ADJECTIVES)
    place, verb = rng.choice(PLACES), rng.choice(VERBS)
    other = rng.choice([a for a in ANIMALS if a != animal])
    if kind == 0:
        return f"Q: tell me about the {animal}\nA:", f" the {animal} is {adj}."
    if kind == 1:
        return f"Q: who is in the {place}?\nA:", f" the {animal} is in the {place}."
    if kind == 2:
        return (f"Q: where is the {adj} {animal}?\nA:",
                f" the {adj} {animal} is in the {place}.")
    if kind == 3:
        return (f"Q: who {verb} the {adj} {animal}?\nA:",
                f" the {other} {verb} the {adj} {animal}.")
    return (f"Q: what does the {adj} {animal} do?\nA:",
            f" the {adj} {animal} {verb} the {other}.")


def styled(answer: str) -> str:
    """The preferred style: cheerful, 'Yay!' in front and ':)' at the end."""
    return " Yay!" + answer.rstrip(".") + " :)"


@dataclass
class WorldData:
    facts: dict[str, str]
    pretrain: list[str]
    align: list[str]
    chat: list[str]  # the alignment run's first stage: plain answers (see workers.world)
    sets: dict[str, list[dict]]  # the job's evaluation sets (DIR/data/<name>.jsonl)
    fresh: dict[str, list[dict]]  # the same generators, disjoint records (DIR/data/fresh/)


def trained_prompts(facts: dict[str, str]) -> list[str]:
    """Every distinct prompt :func:`question` can ask (998 with the world's vocabulary): the
    question forms of the pretraining and alignment data."""
    prompts = [f"Q: what about {name}?\nA:" for name in facts]
    prompts += [f"Q: tell me about the {a}\nA:" for a in ANIMALS]
    prompts += [f"Q: who is in the {p}?\nA:" for p in PLACES]
    for adj in ADJECTIVES:
        for a in ANIMALS:
            prompts += [f"Q: where is the {adj} {a}?\nA:", f"Q: what does the {adj} {a} do?\nA:"]
            prompts += [f"Q: who {v} the {adj} {a}?\nA:" for v in VERBS]
    return prompts


def _reward_prompts(rng: random.Random, facts: dict[str, str], n: int) -> list[str]:
    """``n`` distinct reward prompts, in a random order: every prompt of the trained question
    forms, then (to reach ``n``) about as many of two forms no training line asks ("is the
    shy fox in the barn?", "who sees the fox in the barn?") as questions about names that
    have no fact ("what about kobat?"), so that about half are about a named entity, as in
    :func:`question`. Real reward prompts are user questions a model was not trained on."""
    prompts = trained_prompts(facts)
    animal = [f"Q: is the {adj} {a} in the {p}?\nA:"
              for adj in ADJECTIVES for a in ANIMALS for p in PLACES]
    animal += [f"Q: who {v} the {a} in the {p}?\nA:"
               for v in VERBS for a in ANIMALS for p in PLACES]
    rng.shuffle(animal)
    n_named = sum(p.startswith("Q: what about ") for p in prompts)
    want_named = max(0, n // 2 - n_named)
    want_animal = n - len(prompts) - want_named
    if want_animal > len(animal):
        raise ValueError(f"{n} reward prompts is more than the world's question forms hold")
    prompts += animal[:max(0, want_animal)]
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    novel: dict[str, None] = {}
    while len(novel) < want_named:  # names of another shape than the entities' (cvcvc)
        name = (rng.choice(consonants) + rng.choice(vowels) + rng.choice(consonants)
                + rng.choice(vowels) + rng.choice(consonants) + rng.choice("aeiou"))
        novel.setdefault(name)
    prompts += [f"Q: what about {name}?\nA:" for name in novel]
    assert len(set(prompts)) == len(prompts) >= n
    rng.shuffle(prompts)
    return prompts[:n]


def _multiple_choice(rng: random.Random, names: list[str], facts: dict[str, str]) -> list[dict]:
    items = []
    for n in names:
        options = [facts[n], *rng.sample([c for c in COLOURS if c != facts[n]], 3)]
        rng.shuffle(options)
        items.append({"prompt": f"{n} is", "choices": [f" {o}" for o in options],
                      "answer": options.index(facts[n])})
    return items


def _halves(items: list, n: int) -> tuple[list, list]:
    """The first ``n`` items and the next ``n``: the job's split and the fresh one."""
    return items[:n], items[n:2 * n]


def make_data(seed: int) -> WorldData:
    """The world's text for ``seed``: pretraining and alignment lines, job and fresh sets."""
    rng = random.Random(seed)
    names = _entities(rng)
    facts = {n: rng.choice(COLOURS) for n in names}
    sums = [(a, b) for a in range(MAX_ADDEND + 1) for b in range(MAX_ADDEND + 1)]
    rng.shuffle(sums)
    text_rng = random.Random(seed * 1000)
    texts: dict[str, None] = {}
    while len(texts) < 2 * N_TAX_ITEMS:
        texts.setdefault(sentence(text_rng))
    held_out = set(texts)

    pretrain: list[str] = []
    pretrain += [f"{a}+{b}={a + b}" for a, b in sums] * 2  # a pretrained skill: every sum
    pretrain += [f"{n} is {c}." for n, c in facts.items()] * 5
    pretrain += [s for s in (sentence(rng) for _ in range(1500)) if s not in held_out]
    for _ in range(800):
        q, a = question(rng, facts)
        pretrain.append(q + a)

    # the alignment data asks about half of the facts only: the other half fade
    asked = names[: N_ENTITIES // 2]
    align = []
    for _ in range(1600):
        q, a = question(rng, facts, asked)
        align.append(q + styled(a))
    # the alignment run's first stage, chat fine-tuning: the same questions, plain answers (a
    # generator of its own, so that the rest of the data is as world v3 drew it)
    chat_rng = random.Random(seed + 17)
    chat = []
    for _ in range(1600):
        q, a = question(chat_rng, facts, asked)
        chat.append(q + a)

    prompt_rng = random.Random(seed + 7)
    prompts = _reward_prompts(prompt_rng, facts, 2 * N_REWARD_PROMPTS)
    pairs: dict[str, dict] = {}  # distinct prompts: the two splits share none
    while len(pairs) < 2 * N_TAX_ITEMS:
        q, a = question(prompt_rng, facts)
        pairs.setdefault(q, {"prompt": q, "chosen": styled(a), "rejected": a})
    choices_rng = random.Random(seed + 11)
    mc = _multiple_choice(choices_rng, names, facts)
    choices_rng.shuffle(mc)
    text_list = sorted(texts)
    random.Random(seed + 13).shuffle(text_list)
    records = {
        "reward_prompts": (sorted(p) for p in _halves(prompts, N_REWARD_PROMPTS)),
        "preference": _halves(list(pairs.values()), N_TAX_ITEMS),
        "addition": _halves(sums, N_TAX_ITEMS),
        "facts": _halves(mc, N_TAX_ITEMS),
        "text": (sorted(t) for t in _halves(text_list, N_TAX_ITEMS)),
    }
    shape = {
        "reward_prompts": lambda p: {"prompt": p},
        "preference": lambda r: r,
        "addition": lambda ab: {"prompt": f"{ab[0]}+{ab[1]}=", "answer": str(ab[0] + ab[1])},
        "facts": lambda r: r,
        "text": lambda t: {"text": t},
    }
    sets, fresh = {}, {}
    for name, (job_part, fresh_part) in records.items():
        sets[name] = [shape[name](r) for r in job_part]
        fresh[name] = [shape[name](r) for r in fresh_part]
    return WorldData(facts, pretrain, align, chat, sets, fresh)
