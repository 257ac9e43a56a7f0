"""The trigger of a lazy tool grammar (runtime/engine/trigger.py): found in the decoded
output however the tokens split it, never inside the reasoning, never when absent; the text
handed to the grammar starts at the trigger (what came before is the model's own)."""

from __future__ import annotations

from runtime.engine.trigger import Quiet, Trigger, TriggerMatcher

HERMES = (Trigger("<tool_call>"),)
LLAMA3 = (Trigger("<|python_tag|>"), Trigger('{"name"', at_start=True))
THINK = Quiet("<think>", "</think>", inside=False)


def _push_all(watch: TriggerMatcher, pieces: list[str], token: int = 7) -> list[str | None]:
    return [watch.push(token, p) for p in pieces]


def test_a_trigger_split_over_tokens_fires_on_the_token_that_completes_it():
    # SmolLM2's pieces of 'Sure. <tool_call>\n{"name"': the trigger begins inside ' <'
    pieces = ["Sure", ".", " <", "tool", "_", "call", ">", "\n", '{"', "name"]
    got = _push_all(TriggerMatcher(HERMES), pieces)
    assert got == [None] * 6 + ["<tool_call>"] + [None] * 3


def test_the_text_after_the_trigger_in_the_same_token_goes_to_the_grammar():
    watch = TriggerMatcher(HERMES)
    assert _push_all(watch, ["ok <tool", '_call>\n{"']) == [None, '<tool_call>\n{"']
    assert watch.fired_at == 3


def test_no_trigger_leaves_the_output_alone():
    watch = TriggerMatcher(HERMES)
    text = "I will look it up: <tool> is not <tool_cal, and <tool_"  # ends in a partial one
    assert _push_all(watch, list(text)) == [None] * len(text)
    assert watch.fired_at is None


def test_a_trigger_inside_the_reasoning_does_not_fire():
    watch = TriggerMatcher(HERMES, quiet=THINK)
    pieces = ["<think>", "I should emit <tool_call>", " now.</th", "ink>\n", "<tool_call>"]
    assert _push_all(watch, pieces) == [None, None, None, None, "<tool_call>"]
    assert watch.fired_at == len("".join(pieces[:4]))


def test_the_reasoning_opened_by_the_prompt_is_quiet_until_it_closes():
    watch = TriggerMatcher(HERMES, quiet=Quiet("<think>", "</think>", inside=True))
    assert _push_all(watch, ["<tool_call> in thought", "</think>", "<tool_call>"]) == [
        None,
        None,
        "<tool_call>",
    ]


def test_without_reasoning_a_trigger_at_the_start_fires():
    watch = TriggerMatcher(HERMES, quiet=THINK)  # reasoning markers known, not used
    assert _push_all(watch, ["<", "tool_call>"]) == [None, "<tool_call>"]


def test_an_at_start_trigger_counts_only_as_the_output_s_first_text():
    assert _push_all(TriggerMatcher(LLAMA3), ["\n", '{"', "name", '":']) == [
        None,
        None,
        None,
        '{"name":',
    ]
    late = TriggerMatcher(LLAMA3)
    assert _push_all(late, ["Use ", '{"name": 1}', " <|python_tag|>"]) == [
        None,
        None,
        "<|python_tag|>",
    ]


def test_a_trigger_token_fires_on_its_id_even_when_its_text_is_not_shown():
    watch = TriggerMatcher(HERMES, tokens=frozenset({151657}))
    assert watch.push(11, "Sure. ") is None
    assert watch.push(151657, "") == ""  # skipped special text: the id alone starts it
    assert watch.fired_at == len("Sure. ")


def test_after_a_long_output_a_trigger_pushed_a_character_at_a_time_still_fires():
    watch = TriggerMatcher(HERMES, quiet=THINK)
    text = "<think>" + "a <tool_call> thought; " * 200 + "</think>" + "x < y " * 300
    assert all(watch.push(1, ch) is None for ch in text)
    got = [watch.push(1, ch) for ch in "<tool_call>\n"]
    assert got == [None] * 10 + ["<tool_call>", None] and watch.fired_at == len(text)
