"""Modelfile: what one Modelfile says, as data, and back as text.

Instructions (ollama's): FROM (a stored or pullable model name, or a .gguf path), PARAMETER
(typed, see parameters.py), TEMPLATE (Go-template form, see go_template.py), SYSTEM, ADAPTER
(LoRA GGUF path), LICENSE, MESSAGE (system|user|assistant). Repeated instructions, as in
ollama: the last TEMPLATE and SYSTEM win; each ADAPTER, LICENSE and MESSAGE line adds one;
`stop` and `pin` accumulate, other PARAMETERs take their last value. A second FROM is an
error (ollama reads several as the shards of one model; tandem takes one file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelfiles.parameters import PARAMETERS, format_value
from modelfiles.values import quote

ROLES = ("system", "user", "assistant")


@dataclass
class Modelfile:
    from_: str
    parameters: dict[str, Any] = field(default_factory=dict)  # typed; stop/pin are lists
    template: str | None = None
    system: str | None = None
    adapters: list[str] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)  # {"role", "content"}
    warnings: list[str] = field(default_factory=list, compare=False)
    from_line: int = field(default=0, compare=False)

    def to_text(self, header: str = "") -> str:
        """The Modelfile as text that parses back to an equal Modelfile."""
        lines = [f"# {line}" if line else "#" for line in header.splitlines()]
        lines.append(f"FROM {quote(self.from_)}")
        lines += [f"ADAPTER {quote(a)}" for a in self.adapters]
        if self.template is not None:
            lines.append(f"TEMPLATE {quote(self.template)}")
        if self.system is not None:
            lines.append(f"SYSTEM {quote(self.system)}")
        lines += parameter_lines(self.parameters)
        lines += [f"LICENSE {quote(text)}" for text in self.license]
        lines += [f"MESSAGE {m['role']} {quote(m['content'])}" for m in self.messages]
        return "\n".join(lines) + "\n"


def parameter_lines(parameters: dict[str, Any]) -> list[str]:
    """`PARAMETER name value` lines, one per value of a repeated parameter."""
    lines = []
    for name, value in parameters.items():
        values = value if PARAMETERS[name].repeated else [value]
        lines += [f"PARAMETER {name} {quote(format_value(v))}" for v in values]
    return lines
