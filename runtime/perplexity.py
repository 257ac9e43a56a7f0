"""Perplexity and KL divergence by llama-perplexity's method (tools/perplexity/perplexity.cpp),
on tandem's own forward (a ModelRunner over the KV pool, as the engine runs a prompt).

    result = perplexity(lm, text, n_ctx=512, n_chunks=4, save=Path("base.kl"))
    report = kl_divergence(lm, KLBase.read("base.kl"))

Perplexity: the whole text is tokenized once (BOS where the model adds one, special-token
texts as plain text), cut into n_ctx-token chunks; each chunk is evaluated alone from
position 0 with BOS as its first token (where the model adds one), and the negative
log-likelihood of tokens n_ctx/2+1 … n_ctx-1 is accumulated: PPL = exp(mean NLL), ± its
standard error times PPL. `save` writes those positions' log-probabilities in llama.cpp's
KL-divergence base format (loaders/kl_base.py), which llama-perplexity --kl-divergence reads.

KL divergence: the base file's tokens are evaluated the same way, and each scored position
compares this model (Q) with the base: KL(base‖Q) over the tokens whose base log p > -16
(as llama.cpp sums it), whether both pick the same top token, NLL of both, and Δp of the
correct token; the report holds llama-perplexity's figures (KLDivergence.summary()).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loaders.kl_base import CLIP, KLBase, pack_rows
from quant.errors import InvalidParameterError
from runtime.execution.model_runner import ModelRunner
from runtime.kv.forward_batch import ForwardBatch
from runtime.kv.kv_pool import BLOCK_SIZE
from runtime.loaded_model import LoadedModel


class ChunkEvaluator:
    """Runs n_ctx-token chunks from position 0 through one ModelRunner; returns the logits
    of positions n_ctx/2 … n_ctx-2 (the scored ones)."""

    def __init__(self, lm: LoadedModel, n_ctx: int) -> None:
        self.lm, self.n_ctx = lm, n_ctx
        blocks = -(-n_ctx // BLOCK_SIZE)
        self.table = list(range(blocks))
        self.runner = ModelRunner(lm.model, blocks, "f16", blocks * BLOCK_SIZE, graphs=False)
        tok = lm.tokenizer
        self.bos = tok.bos_id if tok.add_bos and tok.bos_id is not None else None

    def logits(self, chunk: list[int]) -> np.ndarray:
        """(R, V) float32 logits of the scored positions of `chunk` (n_ctx ids)."""
        ids = list(chunk)
        if self.bos is not None:
            ids[0] = self.bos
        first = self.n_ctx // 2
        batch = ForwardBatch.build([(ids, 0, self.table, True)])
        batch = dataclasses.replace(batch, logit_rows=torch.arange(first, self.n_ctx - 1))
        with torch.inference_mode():
            out = self.runner.run(batch)  # (R, V)
        return out.float().cpu().numpy()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(R, V) float32 → (R, V) float64 log-probabilities."""
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama-perplexity's mean and its standard error (0 for fewer than 11 values)."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0


@dataclass
class PerplexityResult:
    n_ctx: int
    n_chunks: int
    n_tokens: int  # the text's tokens
    running: list[float]  # PPL after each chunk, as llama-perplexity prints [i]PPL
    ppl: float
    ppl_error: float  # ± (standard error of the mean NLL, times PPL)
    mean_top_p: float  # mean probability of the top token at the scored positions

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tokenize(lm: LoadedModel, text: str, n_ctx: int) -> list[int]:
    """The text's tokens as llama-perplexity takes them; InvalidParameterError if the text
    is shorter than two chunks."""
    if n_ctx < 4:
        raise InvalidParameterError(f"-c {n_ctx}: the context must be at least 4 tokens")
    tokens = lm.tokenizer.encode(text, add_special=True, parse_special=False)
    if len(tokens) < 2 * n_ctx:
        raise InvalidParameterError(
            f"the text tokenizes to {len(tokens)} tokens; perplexity with -c {n_ctx} needs at "
            f"least {2 * n_ctx} (give a longer text or a smaller -c)"
        )
    return tokens


def perplexity(
    lm: LoadedModel,
    text: str,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    save: Path | None = None,
) -> PerplexityResult:
    """Perplexity of `text`; `save`: also write the KL-divergence base file there."""
    tokens = tokenize(lm, text, n_ctx)
    chunks = len(tokens) // n_ctx if n_chunks is None else min(n_chunks, len(tokens) // n_ctx)
    evaluator, first = ChunkEvaluator(lm, n_ctx), n_ctx // 2
    nll = nll2 = top_p = 0.0
    count, running, packed = 0, [], []
    for i in range(chunks):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
        logits = evaluator.logits(chunk)  # (R, V)
        logp = log_softmax(logits)
        values = -logp[np.arange(len(logp)), chunk[first + 1 :]]  # (R,)
        nll, nll2 = nll + values.sum(), nll2 + (values * values).sum()
        top_p += np.exp(logp.max(-1)).sum()
        count += len(values)
        running.append(math.exp(nll / count))
        if save is not None:
            packed.append(pack_rows(logits))
    if save is not None:
        ids = np.array(tokens[: chunks * n_ctx], dtype=np.int32)
        KLBase(n_ctx, lm.config.vocab_size, ids, np.stack(packed)).write(save)
    mean, err = nll / count, nll2 / count - (nll / count) ** 2
    err = math.sqrt(err / (count - 1)) if err > 0 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(n_ctx, chunks, len(tokens), running, ppl, err * ppl, top_p / count)


@dataclass
class KLDivergence:
    """llama-perplexity's kl_divergence_result, accumulated over scored positions."""

    nll: list[np.ndarray] = field(default_factory=list)  # per chunk (R,) float64
    nll_base: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)  # (R,) bool
    base_top_p: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, base_logp: np.ndarray, targets: np.ndarray) -> None:
        """One chunk: logits (R, V) of Q, base_logp (R, V) decoded base, targets (R,)."""
        logq = log_softmax(logits)
        rows = np.arange(len(targets))
        self.nll.append(-logq[rows, targets])
        self.nll_base.append(-base_logp[rows, targets].astype(np.float64))
        p_base = np.where(base_logp > -CLIP, np.exp(base_logp.astype(np.float64)), 0.0)
        self.kld.append((p_base * (base_logp - logq)).sum(-1))
        self.same_top.append(logits.argmax(-1) == base_logp.argmax(-1))
        self.base_top_p.append(np.exp(base_logp.max(-1).astype(np.float64)))

    def summary(self) -> dict:
        """The figures llama-perplexity prints, by name (each value, or [value, ±])."""
        nll, base = np.concatenate(self.nll), np.concatenate(self.nll_base)
        kld, n = np.concatenate(self.kld), len(nll)
        log_ppl = mean_and_uncertainty(nll.sum(), (nll * nll).sum(), n)
        log_base = mean_and_uncertainty(base.sum(), (base * base).sum(), n)
        cov = 0.0
        if n >= 10:
            cov = ((nll * base).sum() / n - (nll.sum() / n) * (base.sum() / n)) / (n - 1)
        ratio = log_ppl[0] - log_base[0]
        ratio_err = math.sqrt(max(0.0, log_ppl[1] ** 2 + log_base[1] ** 2 - 2 * cov))
        p_diff = np.exp(-nll) - np.exp(-base)
        rms = mean_and_uncertainty((p_diff**2).sum(), (p_diff**4).sum(), n)
        rms_val = math.sqrt(rms[0])
        same = float(np.concatenate(self.same_top).mean())
        ppl, ppl_base = math.exp(log_ppl[0]), math.exp(log_base[0])
        return {
            "count": n,
            "ppl": [ppl, ppl * log_ppl[1]],
            "ppl_base": [ppl_base, ppl_base * log_base[1]],
            "ln_ppl_ratio": [ratio, ratio_err],
            "ppl_ratio": [math.exp(ratio), math.exp(ratio) * ratio_err],
            "kld": list(mean_and_uncertainty(kld.sum(), (kld * kld).sum(), n)),
            "kld_max": float(kld.max()),
            "kld_median": float(np.median(kld)),
            "kld_99": float(np.percentile(kld, 99)),
            "rms_dp": [rms_val, 0.5 / rms_val * rms[1] if rms_val else 0.0],
            "same_top": [same, math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0],
            "base_mean_top_p": float(np.concatenate(self.base_top_p).mean()),
        }


def chunk_targets(base: KLBase, chunk: int) -> np.ndarray:
    """(R,) the tokens the scored positions of `chunk` predict."""
    first = base.n_ctx // 2
    return base.chunk_tokens(chunk)[first + 1 :].astype(np.int64)


def kl_divergence(lm: LoadedModel, base: KLBase, n_chunks: int | None = None) -> dict:
    """This model against the base file's log-probabilities: KLDivergence.summary()."""
    if base.n_vocab != lm.config.vocab_size:
        raise InvalidParameterError(
            f"the KL base file has a vocabulary of {base.n_vocab} tokens, the model "
            f"{lm.config.vocab_size}: compare models that share a tokenizer"
        )
    evaluator, result = ChunkEvaluator(lm, base.n_ctx), KLDivergence()
    for i in _chunks(base, n_chunks):
        logits = evaluator.logits(base.chunk_tokens(i).tolist())
        result.add(logits, base.log_probs(i), chunk_targets(base, i))
    return result.summary()


def _chunks(base: KLBase, n_chunks: int | None) -> Iterator[int]:
    return iter(range(base.n_chunk if n_chunks is None else min(n_chunks, base.n_chunk)))
