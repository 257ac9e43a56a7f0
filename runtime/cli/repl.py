"""Repl: `tandem run`'s conversation — one answer, or an interactive chat like ollama's.

On a terminal the prompt is prompt_toolkit's: line editing, history (Up/Down, kept in
TANDEM_HOME/history), Ctrl-C clears the line, Ctrl-D or /bye exits. Ctrl-C during an answer
stops it; the conversation before that turn is kept. Answers are word-wrapped to the
terminal's width unless --nowordwrap (or /set nowordwrap). Without a terminal, lines are
read from stdin. A line of \"\"\" starts (and ends) a multi-line message. Commands: see HELP.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from modelfiles.parameters import OPTIONS, SAMPLING, UNSUPPORTED, format_value, parse_value
from quant.errors import InvalidParameterError, TandemError, UnsupportedError
from runtime.cli.chat_backend import Local, Piece
from runtime.cli.terminal import printable_lines
from runtime.cli.wordwrap import WordWrap
from runtime.engine.sequence import Timings
from runtime.sampling_params import OLLAMA_DEFAULTS, OLLAMA_OPTIONS, SamplingParams

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <model>   Save your current session
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message."""
SET_HELP = """Available Commands:
  /set parameter NAME VALUE   Set a parameter (e.g. /set parameter temperature 0.2)
  /set system <string>        Set system message
  /set history | nohistory    Enable or disable history
  /set wordwrap | nowordwrap  Enable or disable wordwrap
  /set format json | noformat Enable or disable JSON mode
  /set verbose | quiet        Show or hide LLM stats
  /set think | nothink        Enable or disable thinking"""
SHOW_HELP = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template"""
SHORTCUTS = """Available keyboard shortcuts:
  Ctrl + a   Move to the beginning of the line (Home)
  Ctrl + e   Move to the end of the line (End)
  Ctrl + k   Delete the sentence after the cursor
  Ctrl + u   Delete the sentence before the cursor
  Ctrl + w   Delete the word before the cursor
  Ctrl + l   Clear the screen
  Ctrl + c   Stop the model from responding, or clear the line
  Ctrl + d   Exit (/bye)
  Up / Down  Recall earlier messages"""
FIELD_NAMES = {field: name for name, field in OLLAMA_OPTIONS.items()}  # SamplingParams → Modelfile


class Repl:
    def __init__(
        self,
        llm,
        params: SamplingParams | None = None,
        raw: bool = False,
        verbose: bool = False,
        out: TextIO | None = None,
        wordwrap: bool = True,
        backend=None,
    ) -> None:
        """`llm` (an LLM loaded here) or `backend` (chat_backend.Local or Remote) answers."""
        self.backend = backend or Local(llm)
        self.params = params or OLLAMA_DEFAULTS  # the local answer's settings
        self.options: dict = {}  # what /set parameter changed, by Modelfile name (for a server)
        self.raw, self.verbose, self.wordwrap = raw, verbose, wordwrap
        self.out = out or sys.stdout  # looked up now, so a redirected stdout is honoured
        self.messages: list[dict[str, str]] = []
        self.system: str | None = None  # /set system: replaces the Modelfile's SYSTEM
        self.history = True
        self._session = None  # prompt_toolkit's, on a terminal
        self._loaded_counted = False  # the first answer's total includes the load (ollama)

    # -- answering --------------------------------------------------------------------------

    def _conversation(self, user: dict) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.messages, user]

    def answer(self, prompt: str) -> str:
        """Stream the model's answer to `prompt` (continuing the conversation) and return it.
        Ctrl-C stops the answer: the turn is then left out of the conversation."""
        start = time.perf_counter()
        user = {"role": "user", "content": prompt}
        width = shutil.get_terminal_size((80, 24)).columns
        sink = WordWrap(self.out, width) if self.wordwrap and self.out.isatty() else None
        parts: list[str] = []
        last: Piece | None = None
        options = self._options()
        stop = threading.Event()  # Ctrl-C: the answer stops between two pieces, never
        pieces = self.backend.chat(self._conversation(user), options, self.raw)  # inside a step
        restore = _on_sigint(stop.set)
        try:
            for piece in pieces:
                (sink or self.out).write(piece.text)
                self.out.flush()
                parts.append(piece.text)
                last = piece
                if stop.is_set():
                    break
        finally:
            restore()
            pieces.close()  # a stopped answer is aborted in the engine (or the stream closed)
            if sink:
                sink.finish()
            self.out.write("\n")
            self.out.flush()
        if stop.is_set():
            raise KeyboardInterrupt  # the turn is left out; the loop goes on
        text = "".join(parts)
        if not self.raw:  # joins the conversation only once answered
            self.messages.extend([user, {"role": "assistant", "content": text}])
        if self.verbose and last is not None and last.timings is not None:
            self._report(last, time.perf_counter() - start)
        return text

    def _options(self) -> dict:
        """The Modelfile-named options an answer uses: for the local model, everything the
        params say differently from its defaults; for a server, what was set."""
        if isinstance(self.backend, Local):
            self.backend.base = self.params
        return dict(self.options)

    def _report(self, last: Piece, seconds: float) -> None:
        """ollama's --verbose: total duration includes the load (the first answer's, here or
        on the server), so it is never below the load duration."""
        t: Timings = last.timings  # type: ignore[assignment]
        before = 0.0 if self._loaded_counted else self.backend.load_seconds  # before answer 1
        self._loaded_counted = True
        load = before + (last.load_seconds or 0.0)  # a server's load is inside `seconds`
        total = seconds + before

        def rate(n: int, s: float) -> str:
            return f"{n / s:.2f} tokens/s" if s > 0 else "n/a"

        print(
            f"total duration:       {total:.3f}s\n"
            f"load duration:        {load:.3f}s\n"
            f"prompt eval count:    {t.prompt_tokens} token(s)\n"
            f"prompt eval duration: {t.prompt_seconds:.3f}s\n"
            f"prompt eval rate:     {rate(t.prompt_tokens, t.prompt_seconds)}\n"
            f"eval count:           {t.eval_tokens} token(s)\n"
            f"eval duration:        {t.eval_seconds:.3f}s\n"
            f"eval rate:            {rate(t.eval_tokens, t.eval_seconds)}",
            file=sys.stderr,
        )

    # -- the loop ---------------------------------------------------------------------------

    def loop(self, stdin: TextIO | None = None) -> int:
        source: TextIO = stdin or sys.stdin
        while True:
            try:
                message = self._read_message(source)
            except KeyboardInterrupt:  # Ctrl-C at the prompt: the line is cleared
                print("Use Ctrl + d or /bye to exit.", file=self.out)
                continue
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
            except KeyboardInterrupt:  # Ctrl-C during the answer: stopped, chat kept
                self.out.flush()

    def _read_message(self, stdin: TextIO) -> str | None:
        if self._interactive(stdin):
            return self._prompt()
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

    def _interactive(self, stdin: TextIO) -> bool:
        return stdin is sys.stdin and stdin.isatty() and self.out.isatty()

    def _prompt(self) -> str | None:
        """One message from prompt_toolkit (a multi-line one between \"\"\" lines)."""
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        if self._session is None:
            path = _history_path()
            history = FileHistory(str(path)) if path else InMemoryHistory()
            self._session = PromptSession(history=history)
        try:
            line = self._session.prompt(">>> ", placeholder="Send a message (/? for help)")
        except EOFError:
            return None
        if not line.startswith('"""'):
            return line
        lines, rest = [], line[3:]
        while not rest.endswith('"""'):
            lines.append(rest)
            try:
                rest = self._session.prompt("... ")
            except EOFError:
                break
        else:
            lines.append(rest[:-3])
        return "\n".join(lines).strip("\n")

    # -- commands ---------------------------------------------------------------------------

    def command(self, line: str) -> None:
        words = line.split()
        head = words[0]
        if head == "/clear":
            self.messages.clear()
            print("Cleared session context", file=self.out)
        elif head == "/set":
            self._set_command(words[1:], line)
        elif head == "/show":
            self._show(words[1] if len(words) > 1 else "")
        elif head == "/load" and len(words) == 2:
            self._load(words[1])
        elif head == "/save" and len(words) == 2:
            self._save(words[1])
        elif head in ("/?", "/help"):
            topic = words[1] if len(words) > 1 else ""
            text = {"set": SET_HELP, "show": SHOW_HELP, "shortcuts": SHORTCUTS}.get(
                topic.lstrip("/"), HELP
            )
            print(text, file=self.out)
        else:
            print(f"Unknown command '{head}'. Type /? for help", file=self.out)

    def _set_command(self, args: list[str], line: str) -> None:
        what = args[0] if args else ""
        flags = {
            "verbose": ("verbose", True, "Set 'verbose' mode."),
            "quiet": ("verbose", False, "Set 'quiet' mode."),
            "wordwrap": ("wordwrap", True, "Set 'wordwrap' mode."),
            "nowordwrap": ("wordwrap", False, "Set 'nowordwrap' mode."),
            "history": ("history", True, "Set 'history' mode."),
            "nohistory": ("history", False, "Set 'nohistory' mode."),
            "nothink": ("think", False, "Set 'nothink' mode."),
            "noformat": ("format", None, "Disabled format."),
        }
        if what == "parameter" and len(args) >= 3:
            self._set(args[1], " ".join(args[2:]))
        elif what == "system" and len(args) >= 2:
            text = line.split("system", 1)[1].strip().strip('"')
            self.system = text
            print("Set system message.", file=self.out)
        elif what in flags:
            attr, value, said = flags[what]
            if attr not in ("think", "format"):  # thinking and JSON mode are off already
                setattr(self, attr, value)
            print(said, file=self.out)
        elif what == "think":
            raise UnsupportedError(
                "thinking is not supported by `tandem run` yet; the model answers directly"
            )
        elif what == "format":
            raise UnsupportedError(
                "JSON mode (format) is not supported by `tandem run` yet; ask for JSON in the "
                "message, or use the server's OpenAI API with a grammar"
            )
        else:
            print(SET_HELP, file=self.out)

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
        self.options[name] = value
        print(f"Set parameter '{name}' to '{text}'", file=self.out)

    def parameters(self) -> dict:
        """The current sampling settings by Modelfile name (None: unset)."""
        return {
            FIELD_NAMES[f.name]: getattr(self.params, f.name)
            for f in dataclasses.fields(self.params)
            if f.name in FIELD_NAMES
        }

    def _show(self, what: str) -> None:
        if what == "parameters":
            print("Model defined parameters:" if not self.options else "Parameters:", file=self.out)
            for name, value in self.parameters().items():
                shown = "unset" if value is None else _shown(value)
                print(f"{name:20} {shown}", file=self.out)
        elif what == "info":
            print("  Model", file=self.out)
            for key, value in self.backend.info().items():
                print(printable_lines(f"    {key:<20} {value}"), file=self.out)
        elif what == "system":
            print(
                self.system
                or self.backend.system()
                or "No system message was specified for this model.",
                file=self.out,
            )
        elif what == "template":
            print(printable_lines(self.backend.template()), file=self.out)
        elif what == "license":
            print(
                printable_lines(self._license() or "No license was specified for this model."),
                file=self.out,
            )
        elif what == "modelfile":
            print(printable_lines(self.modelfile()), file=self.out)
        else:
            print(SHOW_HELP, file=self.out)

    def _license(self) -> str:
        lm = getattr(getattr(self.backend, "llm", None), "lm", None)
        license_ = lm.gguf.metadata.get("general.license", "") if lm is not None else ""
        return str(license_)

    def modelfile(self) -> str:
        """This session as a Modelfile: FROM the model, its changed PARAMETERs, SYSTEM,
        MESSAGEs (what /save stores)."""
        lines = [f"# Modelfile generated by tandem run\nFROM {self.backend.name}"]
        for name, value in self.options.items():
            for v in value if isinstance(value, list) else [value]:
                lines.append(f"PARAMETER {name} {_shown(v)}")
        system = self.system or self.backend.system()
        if system:
            lines.append(f'SYSTEM """{system}"""')
        for m in self.messages:
            lines.append(f'MESSAGE {m["role"]} """{m["content"]}"""')
        return "\n".join(lines)

    def _save(self, name: str) -> None:
        from modelfiles.builder import create_model
        from modelfiles.names import ModelName
        from modelfiles.parser import parse_modelfile
        from modelfiles.store import Store

        create_model(Store(), ModelName.parse(name), parse_modelfile(self.modelfile()), Path.cwd())
        print(f"Created new model '{name}'", file=self.out)

    def _load(self, name: str) -> None:
        """Another model for the rest of the session (the conversation is kept)."""
        from runtime.cli.chat_backend import Remote
        from runtime.cli.feedback import spinner

        if isinstance(self.backend, Remote):
            backend = Remote(self.backend.url, name)
            with spinner(f"loading {name}"):
                backend.load()
        else:
            from runtime.llm import LLM

            with spinner(f"loading {name}"):
                llm = LLM(name, options=self.backend.llm.options)
            backend = Local(llm)
        self.backend, self._loaded_counted = backend, False
        print(f"Loading model '{name}'", file=self.out)


def _on_sigint(action):
    """Run `action` on Ctrl-C instead of raising KeyboardInterrupt (main thread only); →
    the function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGINT, lambda signum, frame: action())
    return lambda: signal.signal(signal.SIGINT, previous)


def _shown(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return " ".join(f'"{v}"' for v in value)
    return format_value(value)


def _history_path() -> Path | None:
    """TANDEM_HOME/history (ollama keeps ~/.ollama/history); None if it cannot be written."""
    from loaders.pull import tandem_home

    try:
        home = tandem_home()
        home.mkdir(parents=True, exist_ok=True)
        return home / "history"
    except OSError:
        return None
