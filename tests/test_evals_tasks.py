"""The paper's synthetic tasks: induction stories and polynomial arithmetic over F_7[X]/(X^5)."""

import itertools
import json
import random
import re

import pytest
import torch

from mtp.cli import main
from mtp.evals.taskdata import load_task_data, make_corpus
from mtp.config import ModelConfig
from mtp.errors import MTPError
from mtp.evals import EvalOptions, run_task
from mtp.evals import induction as ind
from mtp.evals import polyarith as pa
from mtp.model import MTPTransformer
from mtp.tokenizers import ByteTokenizer


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, n_future=2, vocab_size=257, max_seq_len=160)
    return MTPTransformer(cfg).eval()


# ---- polyarith: the reference ring -----------------------------------------------------------
def _polys(n, seed=0):
    rng = random.Random(seed)
    return [pa.random_poly(rng) for _ in range(n)]


def test_ring_laws():
    ps = _polys(12)
    for p, q, r in itertools.islice(itertools.product(ps, repeat=3), 300):
        assert pa.add(p, q) == pa.add(q, p)
        assert pa.mul(p, q) == pa.mul(q, p)
        assert pa.mul(p, pa.add(q, r)) == pa.add(pa.mul(p, q), pa.mul(p, r))  # distributivity
        assert pa.mul(pa.mul(p, q), r) == pa.mul(p, pa.mul(q, r))
        assert pa.add(p, pa.neg(p)) == pa.ZERO
        assert pa.mul(p, pa.ONE) == p
        # composition is additive in its first argument; multiplicative (a ring map) when
        # r(0) = 0, where it is well defined on the quotient ring: X^5 at r is then 0
        assert pa.compose(pa.add(p, q), r) == pa.add(pa.compose(p, r), pa.compose(q, r))
        r0 = (0,) + r[1:]
        assert pa.compose(pa.mul(p, q), r0) == pa.mul(pa.compose(p, r0), pa.compose(q, r0))
        assert pa.compose(pa.compose(p, q), r0) == pa.compose(p, pa.compose(q, r0))
    for p in ps:
        assert pa.compose(p, pa.X) == p  # X is the identity of composition, on both sides
        assert pa.compose(pa.X, p) == p
        assert pa.compose(p, pa.ZERO) == pa.poly(p[0])  # p(0) = constant term
        assert pa.poly(*[7 * a for a in p]) == pa.ZERO  # 7 = 0


def test_truncation_and_hand_values():
    x2, x3 = pa.poly(0, 0, 1), pa.poly(0, 0, 0, 1)
    assert pa.mul(x2, x3) == pa.ZERO  # X^5 = 0
    assert pa.mul(x2, pa.poly(0, 0, 0, 0, 1)) == pa.ZERO
    assert pa.mul(pa.poly(0, 0, 0, 0, 1), pa.X) == pa.ZERO
    # (1 + 2X + 3X^2)(4 + X^2) = 4 + 8X + 13X^2 + 2X^3 + 3X^4 = 4 + X + 6X^2 + 2X^3 + 3X^4 (mod 7)
    assert pa.to_text(pa.mul(pa.poly(1, 2, 3), pa.poly(4, 0, 1))) == "41623"
    # (5 + 2X + 3X^2 + X^3) at 4X: 5 + 8X + 48X^2 + 64X^3 = 5 + X + 6X^2 + X^3
    e = pa.parse_expr("(12300+40010)@(-03000)")
    assert pa.to_text(pa.value(e)) == "51610"
    # composition on canonical representatives: X^4 at (1 + X) = (1 + X)^4 = 1 + 4X + 6X^2 + 4X^3 + X^4
    assert pa.to_text(pa.compose(pa.poly(0, 0, 0, 0, 1), pa.poly(1, 1))) == "14641"
    assert pa.to_text(pa.neg(pa.poly(0, 1, 6))) == "06100"


def test_expression_format_round_trips():
    rng = random.Random(3)
    for m in range(0, 11):
        for _ in range(20):
            e = pa.random_expr(rng, m)
            assert pa.n_ops(e) == m
            text = pa.format_expr(e)
            assert set(text) <= set("0123456-+*@()")
            assert pa.parse_expr(text) == e
    with pytest.raises(MTPError):
        pa.parse_expr("1230+40010")


def test_polyarith_generator_deterministic_and_disjoint():
    a = pa.train_examples(200, seed=1)
    assert a == pa.train_examples(200, seed=1)
    assert a != pa.train_examples(200, seed=2)
    assert {ex["m"] for ex in a} == {1, 2, 3, 4, 5}
    ms = [ex["m"] for ex in a]
    assert ms.count(1) > 2 * ms.count(5)  # m ~ 1/m by default
    uniform = [ex["m"] for ex in pa.train_examples(1000, seed=1, m_weights="uniform")]
    assert all(150 < uniform.count(m) < 250 for m in range(1, 6))
    with pytest.raises(MTPError, match="m_weights"):
        pa.train_examples(1, seed=1, m_weights="zipf")
    for ex in a[:50]:
        assert ex["text"] == f"{ex['expr']}={ex['result']}\n"
        assert pa.to_text(pa.value(pa.parse_expr(ex["expr"]))) == ex["result"]
        assert pa.n_ops(pa.parse_expr(ex["expr"])) == ex["m"]
    # negations of a leaf are few (7^5): a held-out set drawn against a training set of m = 1
    # examples would share some with it, and make_documents leaves those out
    train, held, settings = pa.make_documents(20000, seed=5, n_eval=60, train_max_m=1, eval_max_m=1)
    train_exprs = {t.split("=")[0] for t in train}
    plain = [r["expr"] for r in pa.eval_examples(60, max_m=1)]
    assert train_exprs & set(plain)
    held_exprs = [r["expr"] for r in held]
    assert not train_exprs & set(held_exprs)
    assert len(set(held_exprs)) == len(held_exprs) == 60 and settings["train_max_m"] == 1


def test_polyarith_scoring_oracle():
    exs = pa.eval_examples(5, max_m=8)
    right = pa.score(exs, [ex["result"] + "\n" for ex in exs])
    assert right["metrics"] == {"accuracy": 1.0, "digit_accuracy": 1.0, "in_domain": 1.0, "out_of_domain": 1.0}
    assert right["by_name"] == "m" and list(right["by"]) == [str(m) for m in range(1, 9)]
    assert all(row == {"accuracy": 1.0, "n": 5} for row in right["by"].values())
    ops = [pa.top_op(ex["expr"]) for ex in exs]
    assert set(right["by_op"]) == set(ops) <= {"neg", "add", "mul", "comp"}
    assert {op: row["n"] for op, row in right["by_op"].items()} == {op: ops.count(op) for op in set(ops)}
    # wrong: a changed digit (the constant: 4 of 5 coefficients right), a missing digit, extra text
    wrong = [pa.to_text(pa.add(pa.parse_expr(ex["result"]), pa.ONE)) for ex in exs]
    assert pa.score(exs, wrong)["metrics"]["accuracy"] == 0.0
    assert pa.score(exs, wrong)["metrics"]["digit_accuracy"] == pytest.approx(0.8)
    assert pa.score(exs, [ex["result"][:-1] for ex in exs])["metrics"]["accuracy"] == 0.0
    assert pa.score(exs, [ex["result"] + "0\n" for ex in exs])["metrics"]["accuracy"] == 0.0
    # right in domain only; by operation, right where the outermost one is negation only
    mixed = pa.score(exs, [ex["result"] if ex["m"] <= 5 else "x" for ex in exs])
    assert mixed["metrics"] == {"accuracy": 25 / 40, "digit_accuracy": 25 / 40, "in_domain": 1.0,
                                "out_of_domain": 0.0}
    by_neg = pa.score(exs, [ex["result"] if op == "neg" else "" for ex, op in zip(exs, ops)])["by_op"]
    assert all(row["accuracy"] == (op == "neg") for op, row in by_neg.items())
    assert pa.top_op("(12300+40010)@(-03000)") == "comp" and pa.top_op("-(12300*40010)") == "neg"


def test_polyarith_evaluate_tiny_model(tiny_model, tmp_path):
    tok = ByteTokenizer()
    opts = EvalOptions(limit=3, batch_size=8, extra={"max_m": 7})
    res = run_task("polyarith", tiny_model, tok, opts, progress=False)
    assert res["task"] == "polyarith" and res["n_problems"] == 21
    assert set(res["metrics"]) == {"accuracy", "digit_accuracy", "in_domain", "out_of_domain"}
    assert all(0.0 <= v <= 1.0 for v in res["metrics"].values())
    assert res["by_name"] == "m" and list(res["by"]) == [str(m) for m in range(1, 8)]
    assert all(row["n"] == 3 for row in res["by"].values())
    assert res["options"]["max_m"] == 7
    # greedy and deterministic: plain decoding (k = 1) gives the same completions as speculative
    plain = run_task("polyarith", tiny_model, tok, EvalOptions(limit=3, batch_size=5, speculative=1,
                                                             extra={"max_m": 7}), progress=False)
    assert [d["got"] for d in plain["details"]] == [d["got"] for d in res["details"]]
    # from a task directory: the held-out set is read from it
    make_corpus("polyarith", tmp_path / "pa", n_train=50, seed=1, n_eval=2)
    res = run_task("polyarith", tiny_model, tok, EvalOptions(limit=1, data=str(tmp_path / "pa"),
                                                             extra={"max_m": 3}), progress=False)
    _, held = load_task_data(tmp_path / "pa", "polyarith")
    assert [d["expr"] for d in res["details"]] == [r["expr"] for r in held if r["m"] <= 3][::2]
    with pytest.raises(MTPError, match="context"):
        small = MTPTransformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_future=2, max_seq_len=32))
        run_task("polyarith", small, tok, EvalOptions(limit=1), progress=False)


# ---- induction -------------------------------------------------------------------------------
def test_story_generator():
    a = ind.stories(30, seed=1)
    assert a == ind.stories(30, seed=1)
    assert [s["text"] for s in a] != [s["text"] for s in ind.stories(30, seed=2)]
    tok = ByteTokenizer()
    for s in a:
        names = s["names"]
        assert 2 <= len(names) <= 3
        assert len({n[0] for n in names}) == len(names)  # different first letters
        for n in names:
            assert n[0].isupper() and n[1:].islower() and 6 <= len(n) <= 10
            assert n[0] not in ind.RESERVED_INITIALS
            assert len(tok.encode(n)) >= 2
            assert len(ind.name_occurrences(s["text"], [n])) >= 3
    # no word of the grammar starts with a letter a name may start with
    assert "O" in ind.RESERVED_INITIALS and "T" in ind.RESERVED_INITIALS
    assert not set(ind.NAME_INITIALS) & {c.lower() for c in ind.RESERVED_INITIALS}


def test_induction_labels_hand_checked():
    tok = ByteTokenizer()
    text = "Bo met Kiva. Kiva saw Bo. Bobo ran."  # "Bobo" is another word, not the name Bo
    ids, labels = ind.label_tokens(tok, text, ["Bo", "Kiva"])
    assert ids == list(text.encode())
    I, R, F, O = ind.INDUCTION, ind.REPEAT_FIRST, ind.FIRST_LATER, ind.OTHER
    expected = [O] * len(text)
    expected[1] = F  # "o" of the first Bo
    expected[8:11] = [F] * 3  # "iva" of the first Kiva
    expected[13], expected[14:17] = R, [I] * 3  # the second Kiva
    expected[22], expected[23] = R, I  # the second Bo
    assert labels == expected
    assert [text[i] for i, lab in enumerate(labels) if lab == I] == list("ivao")


class _WordTokenizer:
    """A tokenizer whose tokens are whole words and the spaces/punctuation between them."""

    def __init__(self, vocab):
        self.vocab = list(vocab)
        self.eot_id = len(self.vocab)
        self.vocab_size = self.eot_id + 1

    def encode(self, text):
        return [self.vocab.index(w) for w in re.findall(r"\w+|\W", text)]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids if i < len(self.vocab))


def test_induction_labels_multi_character_tokens():
    # tokens spanning several characters: "Ki" + "va" (a name of two tokens), and a whole-word name
    text = "Kiva and Bo. Kiva and Bo."
    tok = _WordTokenizer(["Ki", "va", " ", "and", "Bo", "."])
    tok.encode = lambda t: [0, 1, 2, 3, 2, 4, 5, 2, 0, 1, 2, 3, 2, 4, 5]
    ids, labels = ind.label_tokens(tok, text, ["Kiva", "Bo"])
    assert tok.decode(ids) == text
    I, R, F, O = ind.INDUCTION, ind.REPEAT_FIRST, ind.FIRST_LATER, ind.OTHER
    assert labels == [O, F, O, O, O, O, O, O, R, I, O, O, O, R, O]


def test_induction_scoring_oracle():
    tokens = torch.tensor([[9, 1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([[ind.IGNORE, 0, 1, 0, 2, 3, 3]])
    perfect = torch.stack([torch.cat([tokens[:, o:], torch.zeros(1, o, dtype=torch.long)], 1) for o in (1, 2)], 1)
    counts = ind.score(tokens, labels, perfect, [1, 2])
    res = ind.result_from_counts(counts, 1)
    assert res["metrics"]["induction_accuracy"] == 1.0 and res["metrics"]["induction_tokens"] == 2
    assert res["metrics"]["other_accuracy"] == 1.0 and res["metrics"]["repeated_names"] == 1
    assert res["per_head"]["induction_accuracy"] == [1.0, 1.0]
    # head 2 at position t guesses token t + 2: position 0 sees no target of head 1, but one of head 2
    assert counts[ind.OTHER][1] == [2, 1]
    wrong = perfect + 1
    res = ind.result_from_counts(ind.score(tokens, labels, wrong, [1, 2]), 1)
    assert all(v == 0.0 for k, v in res["metrics"].items() if k.endswith("accuracy"))
    half = perfect.clone()
    half[0, 0, 4] = 0  # head 1's guess of token 5 (the first induction token)
    res = ind.result_from_counts(ind.score(tokens, labels, half, [1, 2]), 1)
    assert res["metrics"]["induction_accuracy"] == 0.5 and res["per_head"]["induction_accuracy"] == [0.5, 1.0]


def test_induction_evaluate_tiny_model(tiny_model, tmp_path):
    tok = ByteTokenizer()
    res = run_task("induction", tiny_model, tok, EvalOptions(limit=4, batch_size=3), progress=False)
    m = res["metrics"]
    assert res["task"] == "induction" and res["n_problems"] == 4
    assert m["induction_tokens"] > 20 and m["repeated_names"] >= 4
    for k in ind.CATEGORY_METRICS.values():
        assert 0.0 <= m[k] <= 1.0
        assert len(res["per_head"][k]) == 2
    assert res["per_head"]["induction_accuracy"][0] == m["induction_accuracy"]

    # the model's argmax, counted by hand for the first story
    story = ind.stories(1, ind.EVAL_SEED)[0]
    ids, labels = ind.label_tokens(tok, story["text"], story["names"])
    ctx = tiny_model.config.max_seq_len
    x = torch.tensor([[tok.eot_id] + ids])[:, :ctx]  # the story is cut at the context
    labels = labels[: ctx - 1]
    with torch.no_grad():
        pred = tiny_model(x).argmax(-1)[0]
    right = [int(pred[j] == x[0, j + 1]) for j, lab in enumerate(labels) if lab == ind.INDUCTION]
    one = run_task("induction", tiny_model, tok, EvalOptions(limit=1), progress=False)["metrics"]
    assert one["induction_tokens"] == len(right)
    assert one["induction_accuracy"] == pytest.approx(sum(right) / len(right))

    # a tokenizer that keeps names whole has no induction positions
    words = sorted({w for s in ind.stories(2, ind.EVAL_SEED) for w in re.findall(r"\w+|\W", s["text"])})
    with pytest.raises(MTPError, match="cannot be used for the induction task"):
        run_task("induction", tiny_model, _WordTokenizer(words), EvalOptions(limit=2), progress=False)


# ---- task directories and the command ------------------------------------------------------------
def test_make_corpus_and_bad_data(tmp_path, tiny_model):
    out = tmp_path / "ind"
    summary = make_corpus("induction", out, n_train=20, seed=4, n_eval=3)
    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and all(set(d) == {"text"} for d in lines)
    assert [d["text"] for d in lines] == [s["text"] for s in ind.stories(20, 4)]
    info, held = load_task_data(out, "induction")
    assert info["task"] == "induction" and info["seed"] == 4 and info["eval_seed"] == ind.EVAL_SEED
    assert held == ind.stories(3, ind.EVAL_SEED)
    assert not {d["text"] for d in lines} & {r["text"] for r in held}
    assert summary["n_train"] == 20 and summary["train_characters"] == sum(len(d["text"]) for d in lines)
    tok = ByteTokenizer()
    with pytest.raises(MTPError, match="no such directory"):
        run_task("induction", tiny_model, tok, EvalOptions(data=str(tmp_path / "nope")), progress=False)
    with pytest.raises(MTPError, match="not 'polyarith'"):
        run_task("polyarith", tiny_model, tok, EvalOptions(data=str(out)), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MTPError, match="no task.json"):
        run_task("induction", tiny_model, tok, EvalOptions(data=str(tmp_path / "empty")), progress=False)
    with pytest.raises(MTPError, match="held-out seed"):
        make_corpus("induction", tmp_path / "x", n_train=2, seed=ind.EVAL_SEED)


def test_tasks_make_command(tmp_path, capsys):
    out = tmp_path / "pa"
    assert main(["tasks", "make", "polyarith", "--out", str(out), "--n-train", "30", "--n-eval", "2", "--seed", "3",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "polyarith" and summary["n_train"] == 30 and summary["n_eval"] == 20
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "task.json", "train.jsonl"]
    train = (out / "train.jsonl").read_text()
    assert [json.loads(x)["text"] for x in train.splitlines()] == [ex["text"] for ex in pa.train_examples(30, 3)]
    # refuses to overwrite a non-empty directory, and leaves it as it was
    assert main(["tasks", "make", "polyarith", "--out", str(out), "--n-train", "5"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "train.jsonl").read_text() == train
    assert main(["tasks", "make", "polyarith", "--out", str(out), "--n-train", "5", "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "5 documents" in text and "train.jsonl" in text
    assert len((out / "train.jsonl").read_text().splitlines()) == 5
    assert main(["tasks", "make", "induction", "--out", str(tmp_path / "ind"), "--n-train", "0"]) == 2


def test_tasks_make_polyarith_settings(tmp_path, capsys):
    out = tmp_path / "pa"
    assert main(["tasks", "make", "polyarith", "--out", str(out), "--n-train", "40", "--n-eval", "3",
                 "--train-max-m", "2", "--eval-max-m", "4", "--m-weights", "uniform", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["settings"]["train_max_m"] == 2 and summary["settings"]["train_m_weights"] == "uniform"
    train = [json.loads(x)["text"] for x in (out / "train.jsonl").read_text().splitlines()]
    assert train == [ex["text"] for ex in pa.train_examples(40, 0, max_m=2, m_weights="uniform")]
    held = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert sorted({r["m"] for r in held}) == [1, 2, 3, 4] and len(held) == 12
    # the evaluation splits in and out of domain at the training range written in task.json
    examples, settings = pa.load_examples(EvalOptions(data=str(out)), 1, 4)
    scored = pa.score(examples, [r["result"] if r["m"] <= 2 else "" for r in examples], settings["train_max_m"])
    assert scored["metrics"]["in_domain"] == 1.0 and scored["metrics"]["out_of_domain"] == 0.0
    # polyarith's options are refused for induction, with one clear line
    assert main(["tasks", "make", "induction", "--out", str(tmp_path / "ind"), "--train-max-m", "2"]) == 2
    err = capsys.readouterr().err
    assert "--train-max-m" in err and len(err.strip().splitlines()) == 1
