"""Scheduler: which sequences compute how many tokens in the next engine step.

Continuous batching under a per-step token budget (max_step_tokens):
1. Running sequences first, oldest first: a decoding sequence takes 1 token, one still
   prefilling takes what is left of its prompt up to the remaining budget (chunked prefill),
   so decodes never wait behind a long prompt.
2. Then waiting sequences are admitted, in arrival order, while the budget, max_num_seqs
   (counting all n samples of a request) and the free KV blocks allow. Admission first takes
   the sequence's cached prefix blocks (prefix caching).
When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the head of the waiting queue with all
its tokens (prompt + generated so far) to recompute; no admissions happen in that step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runtime.block_manager import BlockManager
from runtime.sequence import Sequence


@dataclass
class Step:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, n tokens)
    copies: list[tuple[int, int]] = field(default_factory=list)  # KV pages to copy first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_step_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions_total = 0
        self.cached_tokens_total = 0  # prompt tokens served from the prefix cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds blocks (an n > 1 fork)."""
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)

    def schedule(self) -> Step:
        step, budget = Step(), self.max_step_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.pending, budget)
            if self._make_room(seq, n, step):
                step.scheduled.append((seq, n))
                budget -= n
                i += 1
        if not step.preempted:
            self._admit(step, budget)
        return step

    def _make_room(self, seq: Sequence, n: int, step: Step) -> bool:
        """Blocks for seq's next n tokens, preempting the newest sequences if needed.
        → False when seq itself had to be preempted."""
        while True:
            try:
                step.copies += self.blocks.prepare_append(seq.seq_id, seq.num_computed, n)
                return True
            except MemoryError:
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence, step: Step) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        step.preempted.append(seq)
        self.preemptions_total += 1

    def _admit(self, step: Step, budget: int) -> None:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            samples = seq.params.n if not seq.generated else 1  # forks come after prefill
            if self.running and len(self.running) + samples > self.max_num_seqs:
                return
            cached = self.blocks.open(seq.seq_id, seq.token_ids)
            n = min(len(seq.token_ids) - cached, budget)
            try:
                step.copies += self.blocks.prepare_append(seq.seq_id, cached, n)
            except MemoryError:
                self.blocks.free(seq.seq_id)
                return
            seq.num_computed = cached
            self.cached_tokens_total += cached
            self.waiting.popleft()
            self.running.append(seq)
            step.scheduled.append((seq, n))
            budget -= n
