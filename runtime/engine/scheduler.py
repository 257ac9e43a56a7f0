"""Scheduler: which sequences compute how many tokens in the next engine step.

Continuous batching under a per-step token budget (max_step_tokens) and at most max_num_seqs
sequences per step, shared out fairly between requests (a request is a group: its n samples):

1. Every group running or waiting gets a share of the step: share = max_num_seqs // groups
   sequences and fair = max_step_tokens // groups tokens in all (the whole step when alone).
   Running groups take their share first, in turns that rotate from step to step; within a
   group the samples scheduled longest ago go first. A decoding sequence takes 1 token, one
   still prefilling takes what is left of its prompt up to its fair tokens (chunked prefill),
   so decodes never wait behind a long prompt and a long prompt never starves the others.
2. Then waiting sequences are admitted, requests not yet running first, then in arrival
   order, while the step's sequences, the budget, the free KV blocks, and max_num_seqs running
   requests allow. Admission first takes the sequence's cached prefix blocks (prefix caching).
3. What the shares left unused goes to whoever can use it: more prefill tokens to the step's
   prefilling sequences, more sequences of the running groups (a request with n samples uses
   every sequence of the step when nobody else is there).
So a request's n samples or long prompt delay a newcomer by at most one step.

With align > 1 (recurrent models: kernels/delta_rule.py CHUNK_ALIGN) a prefill that does not
finish its prompt in a step stops at a multiple of align positions, when that leaves it any
tokens: the native delta rule computes a sequence's chunks of align positions the same way
whatever step holds them, so a prompt's result is then the same alone or batched, bit for bit.

A running sequence that needs a block when none is free preempts the newest running sequence
not yet given room in this step (possibly itself): its blocks are freed and it goes back to
the head of the waiting queue with all its tokens (prompt + generated so far) to recompute;
no admissions happen in that step. A shortage is BlockManager.prepare_append returning None,
never an exception.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runtime.engine.block_manager import BlockManager
from runtime.engine.sequence import Sequence


@dataclass
class Step:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, n tokens)
    copies: list[tuple[int, int]] = field(default_factory=list)  # KV pages to copy first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_step_tokens: int,
        align: int = 1,  # no cut: see the module's last paragraph
    ) -> None:
        self.blocks = blocks
        self.align = align
        self.max_num_seqs = max_num_seqs
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions_total = 0
        self.cached_tokens_total = 0  # prompt tokens served from the prefix cache
        self.steps = 0  # schedule() calls so far: rotates the groups' turns

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

    # ---- the step ------------------------------------------------------------------
    def schedule(self) -> Step:
        step = Step()
        self.steps += 1
        groups = self._running_groups()
        waiting_groups = {seq.group for seq in self.waiting} - set(groups)
        n_groups = max(1, len(groups) + len(waiting_groups))
        share = max(1, self.max_num_seqs // n_groups)
        fair = max(1, self.max_step_tokens // n_groups)
        planned: dict[int, int] = {}  # seq id → index in step.scheduled
        budget = self.max_step_tokens

        # 1. running groups, their share each (share sequences, fair tokens in all)
        for members in groups.values():
            tokens = fair
            for seq in members[:share]:
                if min(budget, tokens) <= 0 or len(step.scheduled) >= self.max_num_seqs:
                    break
                if seq not in self.running:  # preempted earlier in this step
                    continue
                n = self._fit(seq.num_computed, seq.pending, min(tokens, budget))
                if self._make_room(seq, n, step, planned):
                    planned[seq.seq_id] = len(step.scheduled)
                    step.scheduled.append((seq, n))
                    budget -= n
                    tokens -= n

        # 2. admissions
        if not step.preempted:
            budget = self._admit(step, budget, fair, planned, groups)

        # 3. what is left: more prefill, then more sequences of the running groups
        for i, (seq, n) in enumerate(step.scheduled):
            extra = self._fit(seq.num_computed, seq.pending, n + budget) - n
            if extra > 0:
                copies = self.blocks.prepare_append(seq.seq_id, seq.num_computed + n, extra)
                if copies is not None:
                    step.copies += copies
                    step.scheduled[i] = (seq, n + extra)
                    budget -= extra
        for members in groups.values():
            for seq in members[share:]:
                if budget <= 0 or len(step.scheduled) >= self.max_num_seqs:
                    break
                if seq not in self.running or seq.seq_id in planned:
                    continue
                n = self._fit(seq.num_computed, seq.pending, budget)
                copies = self.blocks.prepare_append(seq.seq_id, seq.num_computed, n)
                if copies is None:
                    break
                step.copies += copies
                planned[seq.seq_id] = len(step.scheduled)
                step.scheduled.append((seq, n))
                budget -= n

        for seq, _ in step.scheduled:
            seq.last_scheduled = self.steps
        return step

    def _fit(self, done: int, pending: int, room: int) -> int:
        """Tokens a sequence with `done` computed and `pending` to go takes where `room` are
        free: all it can, cut back to end on a multiple of align unless it finishes or the cut
        would leave none."""
        n = min(pending, room)
        if self.align <= 1 or n >= pending:
            return n
        end = (done + n) // self.align * self.align
        return end - done if end > done else n

    def _running_groups(self) -> dict[object, list[Sequence]]:
        """The running sequences by group: the groups in turns that rotate each step (in
        order of arrival otherwise), each group's members scheduled longest ago first."""
        groups: dict[object, list[Sequence]] = {}
        for seq in self.running:
            groups.setdefault(seq.group, []).append(seq)
        keys = list(groups)
        if keys:
            turn = self.steps % len(keys)
            keys = keys[turn:] + keys[:turn]
        return {
            key: sorted(groups[key], key=lambda s: s.last_scheduled)  # stable: oldest first
            for key in keys
        }

    def _make_room(self, seq: Sequence, n: int, step: Step, planned: dict[int, int]) -> bool:
        """Blocks for seq's next n tokens, preempting the newest running sequences not yet
        given room in this step if needed. → False when seq itself had to be preempted."""
        while True:
            copies = self.blocks.prepare_append(seq.seq_id, seq.num_computed, n)
            if copies is not None:
                step.copies += copies
                return True
            victim = next(s for s in reversed(self.running) if s.seq_id not in planned)
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

    def _admit(
        self,
        step: Step,
        budget: int,
        fair: int,
        planned: dict[int, int],
        groups: dict[object, list[Sequence]],
    ) -> int:
        """Admit waiting sequences: a request with nothing running before the others, then in
        queue order. → the budget left."""
        running_groups = set(groups)
        while self.waiting and budget > 0 and len(step.scheduled) < self.max_num_seqs:
            seq = next((s for s in self.waiting if s.group not in running_groups), None)
            if seq is None:
                seq = self.waiting[0]
            if seq.group not in running_groups and len(running_groups) >= self.max_num_seqs:
                return budget
            cached = self.blocks.open(seq.seq_id, seq.token_ids)
            n = self._fit(cached, len(seq.token_ids) - cached, min(fair, budget))
            copies = self.blocks.prepare_append(seq.seq_id, cached, n)
            if copies is None:
                self.blocks.free(seq.seq_id)
                return budget
            step.copies += copies
            seq.num_computed = cached
            self.cached_tokens_total += cached
            self.waiting.remove(seq)
            self.running.append(seq)
            running_groups.add(seq.group)
            planned[seq.seq_id] = len(step.scheduled)
            step.scheduled.append((seq, n))
            budget -= n
        return budget
