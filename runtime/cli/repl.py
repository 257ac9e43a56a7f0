"""Repl: `tandem run`'s conversation — one answer, or an interactive chat like ollama's.

Interactive commands: /bye, /clear, /set parameter NAME VALUE, /show [info|parameters], /?.
A line of \"\"\" starts (and ends) a multi-line message.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TextIO

from modelfiles.parameters import OPTIONS, SAMPLING, UNSUPPORTED, parse_value
from quant.errors import InvalidParameterError, TandemError
from runtime.engine.sequence import Timings
from runtime.llm import LLM
from runtime.sampling_params import OLLAMA_OPTIONS, SamplingParams

HELP = """Available commands:
  /set parameter NAME VALUE   set a sampling parameter (e.g. temperature 0.2)
  /show info | parameters     show the model or the current parameters
  /clear                      forget the conversation
  /bye                        exit
  \"\"\"                         begin or end a multi-line message"""


class Repl:
    def __init__(
        self,
        llm: LLM,
        params: SamplingParams,
        raw: bool = False,
        verbose: bool = False,
        out: TextIO | None = None,
    ) -> None:
        self.llm, self.params, self.raw, self.verbose = llm, params, raw, verbose
        self.out = out or sys.stdout  # looked up now, so a redirected stdout is honoured
        self.messages: list[dict[str, str]] = []

    def answer(self, prompt: str) -> str:
        """Stream the model's answer to `prompt` (continuing the conversation) and return it."""
        start = time.perf_counter()
        user = {"role": "user", "content": prompt}
        if self.raw:
            ids = self.llm.tokenize(prompt)
        else:  # the turn joins the conversation only once answered (an error leaves it as it was)
            ids = self.llm.lm.chat_prompt_ids([*self.messages, user])
        parts, timings = [], None
        for delta in self.llm.stream(ids, self.params):
            self.out.write(delta.text)
            self.out.flush()
            parts.append(delta.text)
            timings = delta.timings
        self.out.write("\n")
        text = "".join(parts)
        if not self.raw:
            self.messages.extend([user, {"role": "assistant", "content": text}])
        if self.verbose and timings:
            self._report(timings, time.perf_counter() - start)
        return text

    def _report(self, t: Timings, total: float) -> None:
        def rate(n: int, s: float) -> str:
            return f"{n / s:.2f} tokens/s" if s > 0 else "n/a"

        print(
            f"total duration:       {total:.3f}s\n"
            f"load duration:        {self.llm.lm.load_seconds:.3f}s\n"
            f"prompt eval count:    {t.prompt_tokens} token(s)\n"
            f"prompt eval duration: {t.prompt_seconds:.3f}s\n"
            f"prompt eval rate:     {rate(t.prompt_tokens, t.prompt_seconds)}\n"
            f"eval count:           {t.eval_tokens} token(s)\n"
            f"eval duration:        {t.eval_seconds:.3f}s\n"
            f"eval rate:            {rate(t.eval_tokens, t.eval_seconds)}",
            file=sys.stderr,
        )

    def loop(self, stdin: TextIO = sys.stdin) -> int:
        while True:
            message = self._read_message(stdin)
            if message is None or message.strip() == "/bye":
                return 0
            if not message.strip():
                continue
            try:
                if message.startswith("/"):
                    self.command(message.strip())
                else:
                    self.answer(message)
            except TandemError as err:
                print(f"Error: {err}", file=self.out)
            except KeyboardInterrupt:
                self.out.write("\n")

    def _read_message(self, stdin: TextIO) -> str | None:
        self.out.write(">>> ")
        self.out.flush()
        line = stdin.readline()
        if not line:
            return None
        line = line.rstrip("\n")
        if not line.startswith('"""'):
            return line
        lines, rest = [], line[3:]
        while not rest.endswith('"""'):
            lines.append(rest)
            self.out.write("... ")
            self.out.flush()
            rest = stdin.readline()
            if not rest:  # end of input inside the message: take what was typed
                return "\n".join(lines).strip("\n")
            rest = rest.rstrip("\n")
        lines.append(rest[:-3])
        return "\n".join(lines).strip("\n")

    def command(self, line: str) -> None:
        words = line.split()
        if words[0] == "/clear":
            self.messages.clear()
            print("Cleared session context", file=self.out)
        elif words[0] == "/set" and len(words) >= 4 and words[1] == "parameter":
            self._set(words[2], " ".join(words[3:]))
        elif words[0] == "/show":
            self._show(words[1] if len(words) > 1 else "info")
        elif words[0] in ("/?", "/help"):
            print(HELP, file=self.out)
        else:
            print(f"Unknown command '{words[0]}'. Type /? for help", file=self.out)

    def _set(self, name: str, text: str) -> None:
        """A sampling option of the table, typed and checked as a Modelfile PARAMETER is."""
        option = OPTIONS.get(name)
        if option is None or option.effect != SAMPLING:
            fixed = option is not None and option.effect != UNSUPPORTED
            raise InvalidParameterError(
                f"{name} is set when the model loads: give it as a flag (--"
                f"{name.replace('_', '-')}) or a Modelfile PARAMETER"
                if fixed
                else f"unknown sampling parameter {name!r}; known: {', '.join(OLLAMA_OPTIONS)}"
            )
        try:
            value = parse_value(name, text)
        except ValueError as err:
            raise InvalidParameterError(f"{name}: {err}") from None
        if name == "stop":
            value = [*self.params.stop, value]
        self.params = SamplingParams.from_options({name: value}, self.params)
        print(f"Set parameter '{name}' to '{text}'", file=self.out)

    def _show(self, what: str) -> None:
        if what == "parameters":
            for f in dataclasses.fields(self.params):
                print(f"{f.name:20} {getattr(self.params, f.name)}", file=self.out)
            return
        c = self.llm.lm.config
        print(
            f"  Model\n    architecture   {c.arch}\n    parameters     {c.n_layer} layers, "
            f"{c.n_embd} embedding\n    context length {c.n_ctx_train}\n"
            f"    file           {self.llm.lm.path}",
            file=self.out,
        )
