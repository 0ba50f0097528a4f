"""The induction task (the paper's section 4.1): children's stories with made-up names.

Stories come from a small seeded grammar: two or three characters are introduced ("Once there was a
little fox named Zubaleko."), then short sentences make them meet, go places,
have objects and talk, and a last sentence ends the story. Every character's name is fresh for
the story: 3-5 consonant-vowel syllables, capitalised ("Zubaleko", "Mirako"), so the byte-level
tokenizer splits it into 6-10 tokens; within a story the names start with different letters, and
never with the capital of a grammar word, so once a name's first token is read its remaining
tokens follow from the earlier occurrence alone. Each name occurs at least three times.

The metric (teacher forcing, the model's argmax): accuracy on the second and later tokens of a
name occurrence whose name already appeared earlier in the story -- the induction positions.
For context it also reports the first token of such repeated names, the second and later tokens
of names at their first occurrence (which no copying can predict: the "no induction" baseline)
and all other tokens. ``per_head`` gives the same figures for every head i, predicting the token
at its own offset (o_i) from o_i positions earlier. Tokens are mapped to character spans, so
byte-level and BPE tokenizers both work; a tokenizer that keeps names as single tokens leaves no
induction positions and is refused.

Each story is read after an end-of-text token, as in training (documents joined with it), and is
cut at the model's context. ``opts.limit`` is the number of stories (default 200).
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from mtp.errors import MTPError

TASK = "induction"
EVAL_SEED = 31337
N_EVAL = 200  # default held-out stories
N_TRAIN = 20_000  # default training stories (about 5 MB)

# token categories
IGNORE, OTHER, FIRST_LATER, REPEAT_FIRST, INDUCTION = -1, 0, 1, 2, 3
CATEGORY_METRICS = {INDUCTION: "induction_accuracy", REPEAT_FIRST: "repeat_first_token_accuracy",
                    FIRST_LATER: "first_occurrence_accuracy", OTHER: "other_accuracy"}

KINDS = "girl boy cat dog bird rabbit bear fox frog duck mouse owl".split()
ADJECTIVES = "little big happy kind brave small shy funny clever quiet".split()
OBJECTS = "ball kite book hat toy cake box drum boat apple".split()
PLACES = "park river forest garden beach school farm hill shop pond".split()
FEELINGS = "happy sad tired hungry excited scared proud".split()

INTRO_FIRST = "Once there was a {adj} {kind} named {A}."
INTRO_MORE = "A {kind} named {A} lived there too."
SENTENCES = (
    "{A} had a {adj} {obj}.",
    "{A} went to the {place}.",
    "{A} met {B} at the {place}.",
    "{A} and {B} played with the {obj}.",
    '{A} said, "Hello, {B}!"',
    "{A} gave the {obj} to {B}.",
    "{A} was {feeling}.",
    "{B} asked {A} to play.",
    '"Let us go to the {place}, {B}!" said {A}.',
    "Then {A} found a {obj}.",
    "{A} liked the {obj} of {B}.",
)
ENDING = "In the end, {A} and {B} were {feeling}."

ONSETS = "bdfgkmnprsvz"
VOWELS = "aeiou"
_GRAMMAR_TEXT = " ".join([INTRO_FIRST, INTRO_MORE, *SENTENCES, ENDING])
# capitals that start grammar words: a name never starts with one, so after a name's first
# letter nothing but that name can follow
RESERVED_INITIALS = frozenset(w[0] for w in re.findall(r"\b[A-Z][a-z]*", re.sub(r"\{\w+\}", "", _GRAMMAR_TEXT)))
NAME_INITIALS = tuple(c for c in ONSETS if c.upper() not in RESERVED_INITIALS)


def random_name(rng: random.Random, initial: str | None = None) -> str:
    """A made-up name: 3-5 consonant-vowel syllables, capitalised."""
    syllables = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(3, 5))]
    if initial is not None:
        syllables[0] = initial + syllables[0][1]
    name = "".join(syllables)
    return name[0].upper() + name[1:]


def make_story(rng: random.Random) -> tuple[str, list[str]]:
    """(story text, the characters' names); every name occurs at least three times."""
    n_chars = rng.randint(2, 3)
    names = [random_name(rng, c) for c in rng.sample(NAME_INITIALS, n_chars)]
    while True:
        sents = [INTRO_FIRST.format(adj=rng.choice(ADJECTIVES), kind=rng.choice(KINDS), A=names[0])]
        for name in names[1:]:
            sents.append(INTRO_MORE.format(kind=rng.choice(KINDS), A=name))
        for _ in range(rng.randint(6, 9)):  # dense in names: most tokens can be copied
            a, b = rng.sample(names, 2)
            sents.append(rng.choice(SENTENCES).format(
                A=a, B=b, adj=rng.choice(ADJECTIVES), obj=rng.choice(OBJECTS), place=rng.choice(PLACES),
                feeling=rng.choice(FEELINGS)))
        a, b = rng.sample(names, 2)
        sents.append(ENDING.format(A=a, B=b, feeling=rng.choice(FEELINGS)))
        text = " ".join(sents)
        if all(len(name_occurrences(text, [n])) >= 3 for n in names):
            return text, names


def stories(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text, names = make_story(rng)
        out.append({"text": text, "names": names})
    return out


def make_documents(n_train: int, seed: int, n_eval: int | None = None, eval_seed: int = EVAL_SEED):
    """(training texts, held-out records, settings) for `mtp tasks make induction`."""
    n_eval = N_EVAL if n_eval is None else n_eval
    train = [s["text"] for s in stories(n_train, seed)]
    held_out = stories(n_eval, eval_seed)
    settings = {"characters": "2-3", "name_syllables": "3-5", "min_occurrences": 3,
                "body_sentences": "6-9"}
    return train, held_out, settings


# ---- labelling tokens -------------------------------------------------------------------------
def name_occurrences(text: str, names: Sequence[str]) -> list[tuple[int, int, str]]:
    """(start, end, name) of every occurrence of the names in text, in order."""
    if not names:
        return []
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")\b")
    return [(m.start(), m.end(), m.group(1)) for m in pattern.finditer(text)]


def token_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of text and each token's character span [start, end)."""
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    if "".join(pieces) == text:
        lengths = [len(p) for p in pieces]
    else:  # tokens that are parts of characters: the text decoded so far, prefix by prefix
        ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
        lengths = [e - s for s, e in zip([0] + ends[:-1], ends)]
    spans, pos = [], 0
    for n in lengths:
        spans.append((pos, pos + n))
        pos += n
    return ids, spans


def label_tokens(tokenizer, text: str, names: Sequence[str]) -> tuple[list[int], list[int]]:
    """(ids, category per token). A name occurrence covers the tokens whose span overlaps it;
    its first token is the one holding its first character, the later ones start inside it."""
    ids, spans = token_spans(tokenizer, text)
    labels = [OTHER] * len(ids)
    seen = set()
    k = 0
    for start, end, name in name_occurrences(text, names):
        repeated = name in seen
        seen.add(name)
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        j = k
        while j < len(spans) and spans[j][0] < end:
            if spans[j][0] <= start:
                labels[j] = REPEAT_FIRST if repeated else OTHER  # a first occurrence's first token: other
            else:
                labels[j] = INDUCTION if repeated else FIRST_LATER
            j += 1
    return ids, labels


# ---- scoring (no model needed) ----------------------------------------------------------------
def score(tokens, labels, predictions, offsets: Sequence[int]) -> dict:
    """Accuracies per category and head. tokens, labels (B, T) and predictions (B, n, T) are
    tensors; predictions[b, i, t] is head i's argmax at position t, a guess of tokens[b, t + o_i].
    Labels IGNORE mark tokens that are no target (the document start, padding). Returns
    {category: ([right per head], [count per head])}."""
    out = {c: ([0] * len(offsets), [0] * len(offsets)) for c in CATEGORY_METRICS}
    for i, o in enumerate(offsets):
        if o >= tokens.shape[1]:
            continue
        right = predictions[:, i, :-o] == tokens[:, o:]  # (B, T - o)
        lab = labels[:, o:]
        for c in CATEGORY_METRICS:
            mask = lab == c
            out[c][0][i] += int((right & mask).sum())
            out[c][1][i] += int(mask.sum())
    return out


def _accumulate(total: dict, part: dict) -> None:
    for c, (right, count) in part.items():
        for i in range(len(right)):
            total[c][0][i] += right[i]
            total[c][1][i] += count[i]


def result_from_counts(counts: dict, n_stories: int) -> dict:
    def acc(c, i):
        right, count = counts[c][0][i], counts[c][1][i]
        return right / count if count else None

    n = len(counts[INDUCTION][0])
    metrics = {name: acc(c, 0) for c, name in CATEGORY_METRICS.items()}
    metrics["induction_tokens"] = counts[INDUCTION][1][0]
    metrics["repeated_names"] = counts[REPEAT_FIRST][1][0]
    result = {"metrics": metrics, "n_problems": n_stories}
    if n > 1:
        result["per_head"] = {name: [acc(c, i) for i in range(n)] for c, name in CATEGORY_METRICS.items()}
    return result


# ---- the evaluation ---------------------------------------------------------------------------
def load_stories(opts) -> list[dict]:
    if opts.data:
        from mtp.evals.taskdata import load_task_data

        _, records = load_task_data(opts.data, TASK)
        for i, r in enumerate(records):
            if not (isinstance(r.get("names"), list) and all(isinstance(n, str) for n in r["names"])):
                raise MTPError(f"{opts.data}: held-out story {i + 1} has no list of names")
        return records[: opts.limit] if opts.limit else records
    return stories(opts.limit or N_EVAL, EVAL_SEED)


def evaluate(model, tokenizer, opts, meta: dict, progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm

    from mtp.evals import check_encodable

    records = load_stories(opts)
    check_encodable(tokenizer, [r["text"] for r in records], TASK)
    ctx = model.config.max_seq_len
    seqs = []
    for r in records:
        ids, labels = label_tokens(tokenizer, r["text"], r["names"])
        seqs.append((([tokenizer.eot_id] + ids)[:ctx], ([IGNORE] + labels)[:ctx]))
    if not any(INDUCTION in lab for _, lab in seqs):
        raise MTPError("this tokenizer cannot be used for the induction task: it keeps the names whole "
                       "(or the model's context is too short), so there are no later name tokens to predict")
    offsets = model.config.head_offsets
    device = model.output.weight.device
    counts = {c: ([0] * len(offsets), [0] * len(offsets)) for c in CATEGORY_METRICS}
    bs = opts.batch_size
    with torch.no_grad():
        for s in tqdm(range(0, len(seqs), bs), desc="induction", unit="batch", disable=not progress):
            batch = seqs[s:s + bs]
            T = max(len(ids) for ids, _ in batch)
            tokens = torch.zeros(len(batch), T, dtype=torch.long)
            labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
            for b, (ids, lab) in enumerate(batch):  # right padding: causal attention ignores it
                tokens[b, : len(ids)] = torch.tensor(ids)
                labels[b, : len(lab)] = torch.tensor(lab)
            x = tokens.to(device)
            hidden = model.heads_hidden(model.trunk(x), x)
            preds = torch.stack([model.logits(h).argmax(-1).cpu() for h in hidden], 1)  # (B, n, T)
            _accumulate(counts, score(tokens, labels, preds, offsets))
    return result_from_counts(counts, len(records))
