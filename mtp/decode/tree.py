"""Tree verification: several candidates per drafting head, verified in one forward pass.

A chain step verifies one draft per head. A tree step verifies a static tree of candidates
(Medusa, SpecInfer, Sequoia): node (r_1, ..., r_d) is the rank-r_d candidate of head d (the head
predicting offset d + 1), read at the row's last accepted position, and follows node
(r_1, ..., r_{d-1}); the root is the row's last committed token. Every candidate of depth d comes
from the same output of head d, so the heads run once per step, as in the chain.

One step, for every row of a ragged batch at once (positions, slots and masks are per row):
- feed the root and the N nodes, N + 1 tokens. Their keys and values go to cache slots
  L - 1 .. L - 1 + N (one per node), their rotary positions are L - 1 + depth, and each node
  attends to the committed slots (< L - 1) and to its ancestors and itself in the tree;
- accept: greedy walks from the root to the child whose token is the verifier's argmax, while
  there is one (so the output is token for token plain greedy's); sampling tries a node's children
  in order, accepting child x with probability min(1, p(x) / q(x)) and replacing p by
  normalize(max(p - q, 0)) after each rejection (recursive rejection sampling, SpecInfer): with
  the children drawn i.i.d. from q the committed token is distributed exactly as p;
- commit the accepted path's tokens and the verifier's token after its last node (1 .. depth + 1
  tokens per row), move the accepted nodes' keys and values from their slots to slots L, L + 1,
  ... in every cache (at most `depth` entries per row and cache, no full-cache copy), and take
  the next candidates from the heads' outputs at the last accepted node.

Which tree: `choose_tree` grows it greedily by path probability from each head's measured
top-c acceptance (`measure_acceptance`, on held-out text) and keeps the size that maximises
expected tokens per step over the step's measured cost on this device (`measure_step_cost`):
where verifying more tokens is nearly free (a GPU at batch 1) the tree is wide, where it is not
(a CPU) it stays a short chain, or nothing. `auto_tree` does the three.

Parallel, linear, causal and anticausal heads draft this way; sequential heads read their own
drafts' embeddings and keep the chain.
"""

from __future__ import annotations

import heapq
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mtp.decode.cache import KVCache
from mtp.decode.decoder import Decoder
from mtp.decode.sampling import process_logits, residual_distribution, sample, tokens_to_commit
from mtp.errors import MTPError
from mtp.generate import GenerationConfig, usable_heads

Path = tuple[int, ...]


# ---- the tree -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tree:
    """A static token tree: its nodes as rank paths, ordered by depth, then by ranks. Node j
    (1-based; 0 is the root) is paths[j - 1]; its token is the rank-(path[-1]) candidate of head
    len(path), and its parent is the node of path[:-1]."""

    paths: tuple[Path, ...] = ()

    def __post_init__(self):
        paths = tuple(tuple(int(r) for r in p) for p in self.paths)
        if len(set(paths)) != len(paths):
            raise MTPError("tree: a node is given twice")
        for p in paths:
            if not p or min(p) < 0:
                raise MTPError(f"tree: node {_fmt(p)!r} must be one or more ranks >= 0")
            if len(p) > 1 and p[:-1] not in paths:
                raise MTPError(f"tree: node {_fmt(p)} has no parent {_fmt(p[:-1])} in the tree")
        object.__setattr__(self, "paths", tuple(sorted(paths, key=lambda p: (len(p), p))))

    @classmethod
    def parse(cls, spec: "Tree | str | Sequence[Sequence[int]]") -> "Tree":
        """A tree from its spec: rank paths separated by ';', ranks by ',' ("0;1;0,0;0,1": the top
        two candidates of head 2, and the top two of head 3 after the first of head 2); also
        "chain:D" (one candidate per head, D heads deep)."""
        if isinstance(spec, Tree):
            return spec
        if isinstance(spec, str):
            s = spec.replace(" ", "")
            if s.startswith("chain:"):
                try:
                    return cls.chain(int(s[len("chain:"):]))
                except ValueError:
                    raise MTPError(f"tree {spec!r}: chain:D needs a whole number D") from None
            try:
                return cls(tuple(tuple(int(r) for r in p.split(",")) for p in s.split(";") if p))
            except ValueError:
                raise MTPError(f"tree {spec!r}: expected rank paths like '0;1;0,0;0,1' (';' between nodes, "
                               "',' between ranks) or chain:D") from None
        return cls(tuple(tuple(p) for p in spec))

    @classmethod
    def chain(cls, depth: int) -> "Tree":
        if depth < 0:
            raise MTPError(f"tree: chain depth must be >= 0, got {depth}")
        return cls(tuple((0,) * d for d in range(1, depth + 1)))

    def spec(self) -> str:
        return ";".join(_fmt(p) for p in self.paths)

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def parents(self) -> list[int]:
        index = {p: j + 1 for j, p in enumerate(self.paths)}
        return [index.get(p[:-1], 0) for p in self.paths]

    def ranks_needed(self) -> int:
        """Candidates to take from each head: one more than the largest rank."""
        return max((p[-1] for p in self.paths), default=-1) + 1

    def expected_tokens(self, acceptance: Sequence[Sequence[float]]) -> float:
        """Tokens a step commits on average if head d's rank-r candidate is right with probability
        acceptance[d - 1][r], independently: 1 + the sum of the nodes' path probabilities."""
        return 1.0 + sum(_path_prob(p, acceptance) for p in self.paths)


def _fmt(p: Path) -> str:
    return ",".join(str(r) for r in p)


def _path_prob(p: Path, acceptance) -> float:
    prob = 1.0
    for d, r in enumerate(p):
        prob *= acceptance[d][r] if d < len(acceptance) and r < len(acceptance[d]) else 0.0
    return prob


def resolve_tree(model, cfg: GenerationConfig, k: int) -> tuple[Tree | None, int]:
    """The tree of cfg.tree checked against the model -> (tree, heads used), or (None, 1) for an
    empty tree (plain decoding). k: the heads resolve_k allows (an explicit --speculative K
    bounds the depth at K - 1)."""
    if isinstance(cfg.tree, str) and cfg.tree.strip() == "auto":
        raise MTPError("tree 'auto' is chosen from measurements: pass the Tree that "
                       "mtp.decode.tree.auto_tree(model, texts) returns (the CLI does it for --tree auto)")
    tree = Tree.parse(cfg.tree)
    if tree.size == 0:
        return None, 1
    if not model.graph.drafts_in_parallel:
        raise MTPError("a token tree needs heads that draft in parallel (parallel, linear, causal, anticausal): "
                       "sequential heads read their own drafts, so they keep the chain (--speculative)")
    limit = usable_heads(model) - 1 if cfg.speculative is None else k - 1
    if tree.depth > limit:
        raise MTPError(f"tree {tree.spec()!r} is {tree.depth} deep, but only {max(limit, 0)} head"
                       f"{'s' * (limit != 1)} can draft here (heads 2..{limit + 1} must predict offsets 2..{limit + 1})")
    if tree.ranks_needed() > model.config.vocab_size:
        raise MTPError(f"tree {tree.spec()!r} asks for rank {tree.ranks_needed() - 1}, beyond the vocabulary of "
                       f"{model.config.vocab_size}")
    return tree, tree.depth + 1


# ---- a tree step ----------------------------------------------------------------------------
class TreeSteps:
    """The tree's index tensors on the decoder's device and the tree steps of one generate()
    call: `start` after the prefill, then `advance` once per decode step (as
    `mtp.decode.chain.ChainSteps`)."""

    def __init__(self, dec: Decoder, tree: Tree):
        self.dec, self.tree, self.model = dec, tree, dec.model
        dev = dec.device
        N, D = tree.size, tree.depth
        parents = [0] + tree.parents  # by node, the root's own entry unused
        anc = torch.zeros(N + 1, N + 1, dtype=torch.bool)  # anc[j, a]: a is j or one of its ancestors
        for j in range(N + 1):
            a = j
            while True:
                anc[j, a] = True
                if a == 0:
                    break
                a = parents[a]
        self.anc = anc.to(dev)
        self.path_anc = anc[1:, 1:].T.float().to(dev)  # (N, N): [a, j] = node a is on the path to j
        self.parent = torch.tensor(tree.parents, dtype=torch.long, device=dev)  # (N,)
        self.depth = torch.tensor([0] + [len(p) for p in tree.paths], dtype=torch.long, device=dev)  # (N + 1,)
        self.node_head = torch.tensor([len(p) - 1 for p in tree.paths], dtype=torch.long, device=dev)  # (N,)
        self.node_rank = torch.tensor([p[-1] for p in tree.paths], dtype=torch.long, device=dev)  # (N,)
        self.at_depth = (self.depth[None, 1:] == torch.arange(1, D + 1, device=dev)[:, None])  # (D, N)
        self.node_ids = torch.arange(1, N + 1, device=dev)
        kids = [[j + 1 for j, p in enumerate(parents[1:]) if p == i] for i in range(N + 1)]  # rank order
        width = max(len(c) for c in kids)
        self.children = torch.tensor([c + [-1] * (width - len(c)) for c in kids], dtype=torch.long, device=dev)
        self.ar_T = torch.arange(N + 1, device=dev)
        self.ranks = tree.ranks_needed()
        self.caches = _distinct_caches(dec.cache)
        self.nodes = self.q = None  # (B, N) the next step's candidate tokens; (D, B, V) their proposals

    def start(self, extra, last: torch.Tensor) -> None:
        """The first candidates, from the heads' outputs at each row's last prompt position."""
        self._candidates(extra, last)

    def _candidates(self, extra, idx: torch.Tensor) -> None:
        """Every node's token from the drafting heads at index idx (B,) of the step just run:
        greedy, head d's rank-r token; sampling, the r-th of i.i.d. draws from head d's q."""
        dec = self.dec
        logits = dec.head_logits(dec.draft_hidden(extra, idx))  # (D, B, V)
        if dec.cfg.greedy:
            cands = torch.topk(logits, self.ranks, dim=-1).indices  # (D, B, C)
            self.q = None
        else:
            self.q = process_logits(logits, dec.cfg.temperature, dec.cfg.top_k, dec.cfg.top_p)  # (D, B, V)
            D, B, V = self.q.shape
            cands = sample(self.q[:, :, None].expand(D, B, self.ranks, V).contiguous(), dec.generator)  # (D, B, C)
        self.nodes = cands[self.node_head, :, self.node_rank].T  # (B, N)

    def mask(self, root: torch.Tensor, kv_len: int) -> torch.Tensor:
        """(B, 1, N + 1, kv_len): each fed token sees the committed slots (< root, the root's slot)
        and the slots of its ancestors and itself in the tree (root + their node index)."""
        N = self.tree.size
        rel = torch.arange(kv_len, device=root.device)[None, :] - root[:, None]  # (B, S) slot - root's slot
        in_tree = self.anc[:, rel.clamp(0, N)].transpose(0, 1) & ((rel >= 0) & (rel <= N))[:, None]  # (B, T, S)
        return ((rel < 0)[:, None] | in_tree)[:, None]

    def advance(self, longest: int, eot_id: int | None) -> torch.Tensor:
        """One tree step of every row; longest: an upper bound of the rows' committed lengths ->
        commit()'s result for the host, packed (tokens of width depth + 1)."""
        dec = self.dec
        kv_len = dec.kv_len(longest - 1 + self.tree.size)  # the tree's last slot is lengths - 1 + its size
        root = dec.lengths - 1  # (B,) the root's slot and position
        fed = torch.cat([dec.seq.gather(1, root[:, None]), self.nodes], 1)  # (B, N + 1)
        h, extra = dec.forward(fed, root[:, None] + self.depth, kv_len, root[:, None] + self.ar_T,
                                self.mask(root, kv_len))
        logits = self.model.logits(h)  # (B, N + 1, V)
        path, m, bonus = self._walk_greedy(logits) if dec.cfg.greedy else self._walk_sampling(logits)
        last = path.gather(1, (m - 1).clamp(min=0)[:, None])[:, 0] * (m > 0)  # (B,) the last accepted node
        new = tokens_to_commit(fed.gather(1, path), bonus, m)  # (B, D + 1): the path's tokens, then the bonus
        self._candidates(extra, last)  # before the move: the stacked heads' drafting reads the tree's slots
        move_accepted(self.caches, root, path, m)
        dec.count(m)
        return dec.commit(new, m + 1, eot_id)

    def _walk_greedy(self, logits: torch.Tensor):
        """-> path (B, D): the accepted node at each depth (0 past the path), m (B,) its length,
        and the verifier's argmax after its last node. A node is accepted when its token is the
        verifier's argmax after its parent and so is every ancestor's (siblings have distinct
        tokens: at most one node per depth)."""
        target = logits.argmax(-1)  # (B, N + 1)
        match = self.nodes == target[:, self.parent]  # (B, N)
        accepted = ((~match).float() @ self.path_anc) == 0  # no mismatch on the path from the root
        path = ((accepted[:, None, :] & self.at_depth[None]) * self.node_ids).sum(-1)  # (B, D)
        m = accepted.sum(1)
        last = (accepted * self.node_ids).amax(1) if self.tree.size else m
        return path, m, target.gather(1, last[:, None])[:, 0]

    def _walk_sampling(self, logits: torch.Tensor):
        """Recursive rejection sampling down the tree -> (path, m, bonus) as _walk_greedy."""
        dec, cfg = self.dec, self.dec.cfg
        p_all = process_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)  # (B, N + 1, V)
        B, D = p_all.shape[0], self.tree.depth
        rows = torch.arange(B, device=logits.device)
        cur = torch.zeros(B, dtype=torch.long, device=logits.device)  # the node each row stands at
        alive = torch.ones(B, dtype=torch.bool, device=logits.device)  # every node so far accepted
        path = torch.zeros(B, D, dtype=torch.long, device=logits.device)
        p = p_all[:, 0]  # the target at cur: the verifier's, or its residual after rejected children
        for d in range(D):
            q = self.q[d]  # (B, V) every depth-(d + 1) candidate was drawn from it
            moved = torch.zeros_like(alive)
            for i in range(self.children.shape[1]):
                child = self.children[cur, i]  # (B,) -1: no such child
                tried = alive & ~moved & (child >= 0)
                x = self.nodes[rows, (child - 1).clamp(min=0)]
                px, qx = p[rows, x], q[rows, x]
                u = torch.rand(B, generator=dec.generator, device=logits.device)
                ok = tried & (u * qx < px)  # accept with probability min(1, p(x) / q(x))
                p = torch.where((tried & ~ok)[:, None], residual_distribution(p, q), p)
                p = torch.where(ok[:, None], p_all[rows, child.clamp(min=0)], p)
                cur = torch.where(ok, child, cur)
                path[:, d] = torch.where(ok, child, path[:, d])
                moved |= ok
            alive &= moved
        m = (path > 0).sum(1)
        return path, m, sample(p, dec.generator)  # after the last accepted node, or from the residual


def _distinct_caches(cache) -> list[KVCache]:
    """Every KV cache of a ModelCache once: the trunk's, the stacked heads' (not again through
    their views in cache.heads) and the other heads'. Moving an entry twice would be wrong."""
    out = list(cache.trunk)
    stacked = None if cache.stacked is None else cache.stacked.k.untyped_storage().data_ptr()
    if cache.stacked is not None:
        out.append(cache.stacked)
    for kv in cache.heads:
        if isinstance(kv, KVCache) and kv.k.untyped_storage().data_ptr() != stacked:
            out.append(kv)
    return out


def move_accepted(caches: Sequence[KVCache], root: torch.Tensor, path: torch.Tensor, m: torch.Tensor) -> None:
    """Keys and values of each row's accepted nodes path[:, :m] (node j sat at slot root + j) to
    the slots after the root (root + 1, root + 2, ...), in every cache. The rest of the row's
    tree slots are left as they are: the next step writes its own there before reading them."""
    B, D = path.shape
    if D == 0:
        return
    ar = torch.arange(1, D + 1, device=path.device)
    dst = root[:, None] + ar  # (B, D)
    src = torch.where(ar[None] <= m[:, None], root[:, None] + path, dst)  # unaccepted depths stay put
    for kv in caches:
        rep = kv.k.shape[0] // B  # stacked heads: one block of B rows per head
        s, t = src.repeat(rep, 1), dst.repeat(rep, 1)
        for buf in (kv.k, kv.v):
            shape = (-1, buf.shape[1], -1, buf.shape[3])
            moved = buf.gather(2, s[:, None, :, None].expand(shape))  # read all before writing any
            buf.scatter_(2, t[:, None, :, None].expand(shape), moved)


# ---- choosing the tree ----------------------------------------------------------------------
@torch.no_grad()
def measure_acceptance(model, texts: Sequence[Sequence[int]], max_depth: int, max_rank: int,
                       chunk_elems: int = 1 << 26) -> list[list[float]]:
    """P[d - 1][r]: the share of positions t of the texts where head d's rank-r token at t equals
    the verifier's argmax at t + d (both predict token t + d + 1; teacher-forced on the text),
    for d = 1..max_depth, r = 0..max_rank - 1."""
    if max_depth < 1:
        return []
    cfg = model.config
    hits = torch.zeros(max_depth, max_rank, dtype=torch.float64)
    count = torch.zeros(max_depth, dtype=torch.float64)
    dev = model.output.weight.device
    seqs = [list(t)[: cfg.max_seq_len] for t in texts if len(t) > max_depth + 1]
    if not seqs:
        raise MTPError(f"texts to measure acceptance on must be longer than {max_depth + 1} tokens")
    for length in sorted({len(s) for s in seqs}):
        same = [s for s in seqs if len(s) == length]
        per = max(1, chunk_elems // (length * cfg.n_future * cfg.vocab_size))
        for i in range(0, len(same), per):
            x = torch.tensor(same[i : i + per], dtype=torch.long, device=dev)
            logits = model(x, return_all_heads=True).float()  # (M, T, n, V)
            verifier = logits[:, :, 0].argmax(-1)  # (M, T)
            top = torch.topk(logits[:, :, 1 : max_depth + 1], max_rank, dim=-1).indices  # (M, T, D, C)
            for d in range(1, max_depth + 1):
                hit = top[:, : length - d, d - 1] == verifier[:, d:, None]  # (M, T - d, C)
                hits[d - 1] += hit.double().sum((0, 1)).cpu()
                count[d - 1] += hit.shape[0] * hit.shape[1]
    return (hits / count[:, None]).tolist()


@torch.no_grad()
def measure_step_cost(model, batch: int, max_tokens: int, k: int, repeats: int = 9, context: int = 64,
                      pack_weights: bool | None = None) -> list[float]:
    """cost[T - 1]: the time of a decode step verifying T tokens per row over a plain greedy
    step's (cost[0] = 1), for T = 1..max_tokens, on the model's device at this batch size: a
    whole tree step (forward pass of the trunk and heads 0..k-1, acceptance, next candidates,
    moving keys and values, commit, the transfer to the host) of a tree of T - 1 nodes using the
    k - 1 drafting heads, after `context` committed positions. Each the median of `repeats`
    steps; the sizes take turns within each round."""
    from mtp.decode.packed import packing

    dev = model.output.weight.device
    V, depth = model.config.vocab_size, max(k - 1, 1)
    steps_run = repeats + 1
    room = steps_run * (depth + 1) + max_tokens + 1
    context = max(1, min(context, model.config.max_seq_len - room))
    max_len = context + room
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (batch, context), generator=g).tolist()

    def tree_of(n: int) -> Tree:  # n nodes: a chain through the heads, then more candidates per depth
        chain = [(0,) * d for d in range(1, depth + 1)]
        wide = [(0,) * (d - 1) + (r,) for d in range(1, depth + 1) for r in range(1, V)]
        return Tree(tuple((chain + wide)[:n]))

    def prepared(T: int):
        cfg = GenerationConfig(max_new_tokens=room)
        dec = Decoder(model, 1 if T == 1 else k, batch, max_len, cfg).reset(cfg)
        dec.start(prompts, [room] * batch)
        h, extra = dec.forward(dec.seq[:, :context], torch.arange(context, device=dev).expand(batch, -1),
                               dec.kv_len(context - 1))
        if T == 1:
            return dec, lambda: dec.greedy_round_fn(dec.kv_len(max_len - 1), None)
        steps = TreeSteps(dec, tree_of(T - 1))
        steps.start(extra, dec.lengths - 1)
        # attention reads the whole cache, as the longest row's last step would
        return dec, lambda: steps.advance(max_len - steps.tree.size, None)

    was_training = model.training
    model.eval()
    try:
        with packing(model, pack_weights):
            runs = {T: prepared(T)[1] for T in range(1, max_tokens + 1)}
            for fn in runs.values():
                fn().tolist()  # warm-up
            times: dict[int, list[float]] = {T: [] for T in runs}
            for _ in range(repeats):
                for T, fn in runs.items():
                    sync()
                    t0 = time.perf_counter()
                    fn().tolist()  # the host reads each step's tokens, as generate does
                    times[T].append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    med = [statistics.median(times[T]) for T in sorted(times)]
    # a cost never falls with more tokens: the tree steps' times as the closest non-decreasing curve
    return [1.0] + [t / med[0] for t in _non_decreasing(med[1:])]


def _non_decreasing(xs: Sequence[float]) -> list[float]:
    """The least-squares non-decreasing fit of xs (pool adjacent violators): noise neither way wins."""
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for x in xs:
        blocks.append([x, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, n = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += n
    return [total / n for total, n in blocks for _ in range(int(n))]


def choose_tree(acceptance: Sequence[Sequence[float]], cost: Sequence[float], max_nodes: int) -> tuple[Tree, float]:
    """The tree maximising expected tokens per step over the step's cost -> (tree, its expected
    tokens per step). Nodes are added in decreasing order of path probability (the product of
    acceptance[d - 1][r_d] along the path; so every prefix of the order is a tree); the expected
    tokens of the first N nodes are E(N) = 1 + their probabilities' sum, and the N kept
    maximises E(N) / cost[N] (cost[T - 1]: a step verifying T tokens over a plain step). N = 0:
    no tree (plain decoding) where nothing pays for its cost."""
    depth, limit = len(acceptance), min(max_nodes, len(cost) - 1)
    order: list[tuple[Path, float]] = []
    heap = [(-float(a), (r,)) for r, a in enumerate(acceptance[0])] if depth else []
    heapq.heapify(heap)
    while heap and len(order) < limit:
        neg, path = heapq.heappop(heap)
        order.append((path, -neg))
        if len(path) < depth:
            for r, a in enumerate(acceptance[len(path)]):
                heapq.heappush(heap, (neg * float(a), path + (r,)))
    best_n, best, expected = 0, 1.0 / cost[0], 1.0
    for n, (_, prob) in enumerate(order, start=1):
        expected += prob
        if expected / cost[n] > best * (1 + 1e-9):
            best_n, best = n, expected / cost[n]
    tree = Tree(tuple(p for p, _ in order[:best_n]))
    return tree, 1.0 + sum(prob for _, prob in order[:best_n])


@dataclass
class TreeChoice:
    tree: Tree
    expected_tokens_per_step: float | None  # None: no acceptance measured
    acceptance: list[list[float]]  # [d - 1][r]: head d's rank-r candidate is the verifier's token
    cost: list[float] = field(default_factory=list)  # [T - 1]: a step of T tokens over a plain step
    seconds: float = 0.0  # spent measuring

    def to_dict(self) -> dict:
        return {"tree": self.tree.spec(), "nodes": self.tree.size, "depth": self.tree.depth,
                "tokens_per_forward_expected": self.expected_tokens_per_step, "acceptance": self.acceptance,
                "step_cost_by_tokens": self.cost, "seconds": self.seconds}


def auto_tree(model, texts: Sequence[Sequence[int]], batch: int = 1, max_nodes: int = 32, max_depth: int | None = None,
              max_rank: int = 8, repeats: int = 9, pack_weights: bool | None = None) -> TreeChoice:
    """The tree for this model on this device at this batch size: each drafting head's top-c
    acceptance on the texts, the step cost by tokens verified, then choose_tree."""
    if not model.graph.drafts_in_parallel:
        raise MTPError("a token tree needs heads that draft in parallel: sequential heads keep the chain")
    t0 = time.perf_counter()
    depth = usable_heads(model) - 1 if max_depth is None else min(max_depth, usable_heads(model) - 1)
    if depth < 1:
        return TreeChoice(Tree(), 1.0, [], [1.0], 0.0)
    max_rank = min(max_rank, model.config.vocab_size)
    acceptance = measure_acceptance(model, texts, depth, max_rank)
    cost = measure_step_cost(model, batch, max_nodes + 1, depth + 1, repeats, pack_weights=pack_weights)
    tree, expected = choose_tree(acceptance, cost, max_nodes)
    return TreeChoice(tree, expected, acceptance, cost, time.perf_counter() - t0)
