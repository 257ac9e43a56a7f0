"""Structured output's cost on one model (issue 15): decode tokens/s of the same prompt with
and without a JSON schema (greedy, the same max_tokens, one request at a time, the two kinds
interleaved round by round), and llguidance's mask time per token.

    TANDEM_HOME=... python scripts/bench_structured.py smollm2 --rounds 5 --max-tokens 128

Decode tok/s counts the tokens after the first over the wall time of their engine steps
(sampling and the grammar included, the prompt's prefill not). Both runs ignore the end token
and the schema (an array of at least 100 objects) cannot end first, so both decode exactly
max_tokens. Mask time: the run computes a mask only where the grammar refused the sampled
token ("in the run"); each constrained output is then replayed through a fresh matcher with
the mask computed at every position (llguidance's compute_bitmask and the unpacking to one
bool per token), p50 / p99; a fresh matcher's first mask is reported apart. The grammar's
mean time per token (checks and masks) against the free decode's time per token bounds what
the schema can cost where the tok/s runs are noisy (a shared machine).

    python scripts/bench_structured.py qwen2.5-coder:0.5b --tools --rounds 5 --max-tokens 80

--tools: a tool_choice=auto request as the server builds it (chat_setup), with its lazy
grammar against the same request free (auto before the lazy grammar), the same seed,
interleaved: decode tok/s, the grammar's time per token before the trigger (0: nothing runs)
and from it on, and the mask at every position after the trigger (replayed).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.engine.grammar import Grammar, GrammarMatcher, LazyGrammar, json_schema  # noqa: E402
from runtime.engine.llm_engine import EngineOptions, LLMEngine  # noqa: E402
from runtime.engine.sequence import Timings  # noqa: E402
from runtime.engine.trigger import TriggerMatcher  # noqa: E402
from runtime.loaded_model import LoadedModel  # noqa: E402
from runtime.sampling_params import SamplingParams  # noqa: E402
from runtime.server.chat_setup import chat_setup  # noqa: E402
from runtime.server.tool_request import parse_tools  # noqa: E402

SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"type": "string", "maxLength": 20},
        },
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    },
    "minItems": 100,
}
ASK = "List 100 people as a JSON array of objects with name, age and city."


def decode(
    engine: LLMEngine, ids: list[int], params: SamplingParams, rid: str
) -> tuple[float, list[int], list[float], list[float]]:
    """(decode tok/s, the tokens, accept-check seconds, seconds of the masks computed)."""
    rate, tokens, t = decode_timed(engine, ids, params, rid)
    return rate, tokens, t.grammar_check_seconds, t.grammar_mask_seconds


def decode_timed(
    engine: LLMEngine, ids: list[int], params: SamplingParams, rid: str
) -> tuple[float, list[int], Timings]:
    """(decode tok/s, the tokens, the sample's timings)."""
    engine.add_request(rid, ids, params)
    tokens: list[int] = []
    started = None
    timings = Timings()
    while engine.has_unfinished:
        events = engine.step()
        for e in events:
            d = e.delta
            assert d is not None, e.error
            tokens += [d.token_id] if d.token_id is not None else []
            if d.timings is not None and d.finish_reason:
                timings = d.timings
        if started is None and tokens:  # the first token ends the prefill
            started = time.perf_counter()
    assert started is not None
    return (len(tokens) - 1) / (time.perf_counter() - started), tokens, timings


def mask_every_position(lm: LoadedModel, grammar: Grammar, tokens: list[int]) -> list[float]:
    """Seconds of the mask at each position of `tokens`, replayed through a fresh matcher."""
    m = GrammarMatcher(lm.tokenizer, grammar)
    logits = torch.zeros(lm.tokenizer.vocab_size)
    for t in tokens:
        m.mask(logits)
        m.advance(t)
    return m.mask_seconds


def _pct(values: list[float], q: float) -> float:
    """The q-quantile of values in microseconds (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def _times(values: list[float]) -> str:
    return f"p50 {_pct(values, 0.5):.0f} us, p99 {_pct(values, 0.99):.0f} us"


# ---- --tools: tool_choice=auto, free vs the lazy grammar ---------------------------------
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 3},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TOOL_ASK = [
    {"role": "system", "content": "You are a weather assistant. Answer with a tool call."},
    {"role": "user", "content": "What is the weather in Paris?"},
]


def after_trigger(lm: LoadedModel, lazy: LazyGrammar, tokens: list[int]) -> list[int]:
    """The output from the trigger on, retokenized as the grammar was fed it ([]: none)."""
    watch = TriggerMatcher(lazy.triggers, lazy.tokens, lazy.quiet)
    for t in tokens:
        if watch.push(t, lm.tokenizer.decode([t], skip_special=False)) is not None:
            break
    if watch.fired_at is None:
        return []
    text = lm.tokenizer.decode(tokens, skip_special=False)
    return lm.tokenizer.encode(text[watch.fired_at :], add_special=False, parse_special=True)


def main_tools(lm: LoadedModel, rounds: int, max_tokens: int, seed: int) -> None:
    """tool_choice=auto (the server's chat_setup) with its lazy grammar against the same
    request with none (as before the lazy grammar: auto was free), interleaved."""
    engine = LLMEngine(lm, EngineOptions(num_ctx=1024, max_num_seqs=1))
    base = SamplingParams(temperature=0.8, seed=seed, max_tokens=max_tokens)
    setup = chat_setup(lm, TOOL_ASK, parse_tools([TOOL], "auto", None), {}, base, 1024)
    lazy = setup.params.grammar
    assert isinstance(lazy, LazyGrammar), "this model's template family has no lazy grammar"
    kinds = {"free": dataclasses.replace(setup.params, grammar=None), "lazy": setup.params}
    decode_timed(engine, setup.ids, kinds["lazy"], "warm")
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    before, after, masks, every = [], [], [], []
    for r in range(rounds):
        for kind in list(kinds) if r % 2 == 0 else list(reversed(kinds)):
            rate, tokens, t = decode_timed(engine, setup.ids, kinds[kind], f"{kind}{r}")
            rates[kind].append(rate)
            if kind == "lazy":
                at = len(tokens) if t.grammar_started_at is None else t.grammar_started_at
                before += t.grammar_token_seconds[:at]
                after += t.grammar_token_seconds[at:]
                masks += t.grammar_mask_seconds
                fed = after_trigger(lm, lazy, tokens)
                every += mask_every_position(lm, lazy.grammar, fed)[1:] if fed else []
            if r == 0:
                print(f"  {kind}: {lm.tokenizer.decode(tokens, skip_special=False)!r}")
    print(f"{lm.name}: tool_choice=auto, {rounds} rounds, seed {seed}, temperature 0.8")
    for kind, values in rates.items():
        line = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {kind:5s} decode tok/s median {statistics.median(values):6.1f} ({line})")
    per_token = sum(after) / max(1, len(after))
    share = per_token * statistics.median(rates["free"])
    print(f"  grammar per token from the trigger on: {per_token * 1e6:.0f} us mean, {share:.2%} of")
    print("    a free token's time (the bound on its cost where tok/s is noise)")
    worst = max(before, default=0.0) * 1e6
    print(f"  grammar time per token before the trigger ({len(before)}): max {worst:.0f} us")
    print(f"  grammar time per token from the trigger on ({len(after)}): {_times(after)}")
    print(f"  masks in the run: {len(masks)}, {_times(masks)}")
    print(f"  mask at every position after the trigger ({len(every)}): {_times(every)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tools", action="store_true", help="tool_choice=auto: free vs lazy grammar")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lm = LoadedModel.load(args.model)
    if args.tools:
        return main_tools(lm, args.rounds, args.max_tokens, args.seed)
    engine = LLMEngine(lm, EngineOptions(num_ctx=512 + args.max_tokens, max_num_seqs=1))
    ids = lm.chat_prompt_ids([{"role": "user", "content": ASK}])
    grammar = json_schema(SCHEMA, "schema")
    kinds = {
        "free": SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True),
        "schema": SamplingParams(
            temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, grammar=grammar
        ),
    }
    decode(engine, ids, kinds["schema"], "warm")  # the grammar compiled, the kernels warm
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    checks, masks, every, first = [], [], [], []
    for r in range(args.rounds):
        order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
        for kind in order:
            rate, tokens, c, m = decode(engine, ids, kinds[kind], f"{kind}{r}")
            assert len(tokens) == args.max_tokens, (kind, len(tokens))
            rates[kind].append(rate)
            if kind == "schema":
                checks += c
                masks += m
                seconds = mask_every_position(lm, grammar, tokens)
                first.append(seconds[0])
                every += seconds[1:]
    print(f"{lm.name}: prompt {len(ids)} tokens, {args.max_tokens} decoded, {args.rounds} rounds")
    for kind, values in rates.items():
        line = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {kind:6s} decode tok/s median {statistics.median(values):6.1f} ({line})")
    slow = 1 - statistics.median(rates["schema"]) / statistics.median(rates["free"])
    print(f"  schema vs free: {slow:+.1%} slower (median over median)")
    per_token = (sum(checks) + sum(masks)) / max(1, len(checks))
    share = per_token * statistics.median(rates["free"])
    print(f"  grammar per token: {per_token * 1e6:.0f} us mean, {share:.2%} of a free token's time")
    print(f"  accept check on every token: {_times(checks)}")
    print(f"  masks in the run: {len(masks)} of {len(checks)} tokens, {_times(masks)}")
    print(f"  mask at every later position ({len(every)}): {_times(every)}")
    print(f"  mask at a fresh matcher's first position ({len(first)}): {_times(first)}")


if __name__ == "__main__":
    main()
