"""The model's own continuations as a training corpus (Medusa-2's self-distillation data).

A frozen model's heads are accepted when they predict what the model itself will write, and what
it writes after a prompt is not what the corpus says next: small models repeat, copy from their
context and settle into patterns. `write_self_data` takes prompts from the *training* split of a
corpus (so held-out prompts stay unseen), decodes the model's continuation of each (greedy by
default, or sampled) with the batched decoder, and writes one JSON line per prompt,
``{"text": prompt + continuation, ...}``: a corpus that `mtp finetune` reads like any other
``.jsonl``. On greedy continuations, the corpus loss of head i *is* the loss towards the token
the model would choose at t+i, the one greedy verification accepts.

The file is appended batch by batch and flushed, so a crash loses at most one batch, and a rerun
with the same settings resumes after the last complete line (a sidecar ``FILE.meta.json`` holds
the settings; a rerun with others is refused unless ``overwrite``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from mtp.errors import MTPError


@dataclass
class SelfDataConfig:
    n_prompts: int = 512
    prompt_len: int = 64
    max_new_tokens: int = 192
    batch_size: int = 32
    temperature: float = 0.0  # 0: greedy continuations
    top_p: float = 1.0
    seed: int = 0  # the sampled batches' seeds (seed + batch index), so a resumed file is the same
    speculative: int | None = None  # heads used to decode (the output does not depend on it)
    pack_weights: bool | None = None  # as GenerationConfig.pack_weights

    def validate(self) -> None:
        for name in ("n_prompts", "prompt_len", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise MTPError(f"{name} must be at least 1, got {getattr(self, name)}")


def _complete_lines(path: Path) -> int:
    """Complete JSON lines at the start of `path`; a torn last line (a crash mid-write) is cut."""
    if not path.exists():
        return 0
    good, n = 0, 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                json.loads(line)
            except ValueError:
                break
            good += len(line)
            n += 1
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return n


def write_self_data(model, tokenizer, prompts: Sequence[Sequence[int]], out: str | Path, cfg: SelfDataConfig,
                    source: dict | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Decode every prompt's continuation and append it to the JSONL file `out`; return a summary
    (lines, new tokens, seconds, tokens per second of this call, resumed lines)."""
    from mtp.generate import GenerationConfig, generate

    cfg.validate()
    eot = getattr(tokenizer, "eot_id", None)
    gcfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            speculative=cfg.speculative, eot_id=eot, pack_weights=cfg.pack_weights)
    gcfg.validate()  # bad sampling settings fail before anything is written
    out = Path(out)
    meta_path = out.with_name(out.name + ".meta.json")
    meta = {"config": asdict(cfg), "source": source or {}, "n_prompts": len(prompts)}
    if overwrite:
        out.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
    if out.exists():
        old = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if old != meta:
            raise MTPError(f"{out} exists and was written with other settings (or without {meta_path.name}): "
                           "give another file or --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=1))
    done = _complete_lines(out)
    bos = list(getattr(tokenizer, "bos_ids", ()))  # the start tokens are the tokenizer's to add again
    new_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), initial=min(done, len(prompts)), desc="self-data", unit="prompt",
               disable=not progress)
    with open(out, "a", encoding="utf-8") as f:
        for start in range(done - done % cfg.batch_size, len(prompts), cfg.batch_size):
            batch = [list(p) for p in prompts[start : start + cfg.batch_size]]
            res = generate(model, batch, dataclasses.replace(gcfg, seed=cfg.seed + start // cfg.batch_size))
            for j, (prompt, toks) in enumerate(zip(batch, res.tokens)):
                if start + j < done:  # written before a crash inside this batch
                    continue
                cont = [t for t in toks if t != eot]
                body = prompt[len(bos):] if bos and prompt[: len(bos)] == bos else prompt
                f.write(json.dumps({"text": tokenizer.decode(body + cont), "prompt_tokens": len(prompt),
                                    "new_tokens": len(cont), "ended": len(cont) < len(toks)}) + "\n")
                new_tokens += len(cont)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch) - max(0, done - start))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")
    bar.close()
    seconds = time.perf_counter() - t0
    return {"file": str(out), "lines": _complete_lines(out), "resumed_from": done, "new_tokens": new_tokens,
            "seconds": seconds, "tokens_per_s": new_tokens / seconds if seconds > 0 else 0.0}
