"""The budgeted Jinja sandbox every chat template renders in (Jinja and translated Go alike).

jinja2's ImmutableSandboxedEnvironment stops a template from reaching Python internals, but
not from running forever or building gigabyte strings: nested loops, `ljust`/`center`
widths, `%`/`format` widths, `~` doubling, `*` repetition, `lipsum(200000)` and the like.
Here every render carries a `_Meter` (a ContextVar, so concurrent renders of one template
are independent) that

- counts steps: every loop iteration (each `{% for %}` iterable is wrapped at parse time),
  call, operator, attribute/item access, filter, test and output chunk, and checks a
  wall-clock deadline at each one, so no path runs long without passing a checkpoint;
- checks sizes before anything that can grow a string or list beyond its inputs (widths,
  repetition, formatting, joining, concatenation, printing a container) and charges every
  new value to a cumulative allocation budget, so memory stays bounded;
- caps the rendered output.

The limits grow with the size of the input (messages, tools), so that a long conversation
still renders; exceeding any of them raises `BudgetExceeded` (a BaseException, so template
helpers that catch Exception cannot swallow it), which chat_template.py turns into
quant.errors.TemplateBudgetError.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from string import Formatter
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.runtime import LoopContext, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, generate_lorem_ipsum


@dataclass(frozen=True)
class RenderBudget:
    """Limits of one render; the size limits grow by `per_input_*` for each unit of input."""

    seconds: float = 1.0
    steps: int = 1_000_000
    steps_per_input_item: int = 200  # per message / list item / dict entry of the input
    value_units: int = 4 << 20  # largest string (characters) or list (8 units an item)
    value_per_input_unit: int = 2
    alloc_units: int = 64 << 20  # everything created during the render, summed
    alloc_per_input_unit: int = 16


DEFAULT_BUDGET = RenderBudget()
_ITEM_UNITS = 8  # a list/tuple/dict entry counts as 8 units (a pointer)
_MAX_POW_BITS = 1 << 16
_MAX_REGEX_FILTER_INPUT = 100_000  # striptags/urlize/wordwrap are superlinear on hostile text


class BudgetExceeded(BaseException):
    """A render went over its budget (steps, time, a value's size, or total allocation)."""


class _Meter:
    __slots__ = ("deadline", "steps_left", "max_value", "alloc_left", "seconds")

    def __init__(self, budget: RenderBudget, input_units: int, input_items: int) -> None:
        self.seconds = budget.seconds
        self.deadline = time.monotonic() + budget.seconds
        self.steps_left = budget.steps + budget.steps_per_input_item * input_items
        self.max_value = budget.value_units + budget.value_per_input_unit * input_units
        self.alloc_left = budget.alloc_units + budget.alloc_per_input_unit * input_units

    def step(self, n: int = 1) -> None:
        self.steps_left -= n
        if self.steps_left < 0:
            raise BudgetExceeded("it took too many steps (loop iterations, calls, operations)")
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"it ran longer than {self.seconds:g} s")

    def allow(self, units: int, what: str = "a value") -> None:
        """Refuse, before making it, a value of `units` size."""
        if units > self.max_value:
            raise BudgetExceeded(
                f"{what} is too large (about {units} characters or 8-unit list items, "
                f"over the limit of {self.max_value})"
            )

    def charge(self, value: Any) -> Any:
        """Account for a new value; returns it."""
        units = _units(value)
        if units:
            self.allow(units)
            self.alloc_left -= units
            if self.alloc_left < 0:
                raise BudgetExceeded("it built more strings and lists in total than allowed")
        return value

    def text_size(self, value: Any) -> int:
        """An estimate of len(str(value)), refused once over the value limit (bounded walk)."""
        if isinstance(value, str):
            return len(value)
        total, stack, seen = 0, [value], 0
        limit = self.max_value
        while stack:
            item = stack.pop()
            seen += 1
            if seen & 1023 == 0:
                self.step()
            if isinstance(item, str):
                total += len(item) + 4
            elif isinstance(item, (list, tuple, set, frozenset)):
                total += 2 + 2 * len(item)
                stack.extend(item)
            elif isinstance(item, dict):
                total += 2 + 4 * len(item)
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, Namespace):
                total += 16
                stack.append(dict(item.__dict__.get("_Namespace__attrs", {})))
            elif isinstance(item, int) and not isinstance(item, bool):
                total += item.bit_length() // 3 + 2
            else:
                total += 64
            if total > limit:
                self.allow(total, "printing a value")
        return total

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.step()
            yield item


def _units(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return _ITEM_UNITS * len(value)
    return 0


_METER: contextvars.ContextVar[_Meter | None] = contextvars.ContextVar("tandem_meter", default=None)


def meter() -> _Meter:
    """The active render's meter; outside a render (e.g. Jinja's compile-time constant
    folding) nothing may run unmetered, so this refuses."""
    m = _METER.get()
    if m is None:
        raise RuntimeError("template code runs only inside a budgeted render")
    return m


def check_text(*values: Any) -> int:
    """Helpers (e.g. the Go-template functions) call this before stringifying values."""
    m = meter()
    m.step()
    total = sum(m.text_size(v) for v in values)
    m.allow(total, "printing values")
    return total


def input_size(*values: Any) -> tuple[int, int]:
    """(units, items) of the render's input: characters of strings, entries of containers."""
    units = items = 0
    stack = list(values)
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            units += len(item)
        elif isinstance(item, dict):
            items += len(item)
            units += _ITEM_UNITS * len(item)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            items += len(item)
            units += _ITEM_UNITS * len(item)
            stack.extend(item)
    return units, items


class metered:
    """`with metered(budget, *inputs):` runs a render under a fresh meter."""

    def __init__(self, budget: RenderBudget, *inputs: Any) -> None:
        units, items = input_size(*inputs)
        self.meter = _Meter(budget, units, items)

    def __enter__(self) -> _Meter:
        self._token = _METER.set(self.meter)
        return self.meter

    def __exit__(self, *exc: Any) -> None:
        _METER.reset(self._token)


# ---- size estimates of the operations that can amplify -----------------------------------

_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)
_SPEC_NUMBERS = re.compile(r"(\d+)")


def _percent_size(m: _Meter, fmt: str, args: Any) -> int:
    """Upper estimate of len(fmt % args)."""
    if isinstance(args, tuple):
        values = list(args)
    elif isinstance(args, dict):
        values = list(args.values())
    else:
        values = [args]
    arg_size = max((m.text_size(v) for v in values), default=0)
    total, count = len(fmt), 0
    for spec in _PERCENT.finditer(fmt):
        width, precision, _ = spec.groups()
        if "*" in (width, precision):
            raise BudgetExceeded("'*' widths in %-formatting are not allowed in chat templates")
        count += 1
        total += max(arg_size, int(width or 0), int(precision or 0)) + 2
    m.allow(total, "a %-formatted string")
    return total


def _format_size(m: _Meter, fmt: str, args: tuple, kwargs: dict) -> int:
    """Upper estimate of len(fmt.format(*args, **kwargs))."""
    arg_size = max((m.text_size(v) for v in (*args, *kwargs.values())), default=0)
    total = len(fmt)
    try:
        fields = list(Formatter().parse(fmt))
    except ValueError:
        return total  # format() raises the same error
    for _, name, spec, _ in fields:
        if name is None:
            continue
        if spec and "{" in spec:
            raise BudgetExceeded("nested fields in format specs are not allowed in chat templates")
        widths = [int(n) for n in _SPEC_NUMBERS.findall(spec or "") if len(n) < 12] or [0]
        if spec and any(len(n) >= 12 for n in _SPEC_NUMBERS.findall(spec)):
            raise BudgetExceeded("a format width is too large")
        total += max(arg_size, *widths) + 2
    m.allow(total, "a formatted string")
    return total


def _replace_size(text: str, old: Any, new: Any, count: Any = -1) -> int:
    if not isinstance(old, str) or not isinstance(new, str):
        return len(text)
    hits = (len(text) + 1) if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(len(new) - len(old), 0)


def _int_arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _check_str_method(m: _Meter, text: str, name: str, args: tuple, kwargs: dict) -> None:
    size: Any = 0
    if name in ("ljust", "rjust", "center", "zfill"):
        size = _int_arg(args, kwargs, 0, "width", 0)
    elif name == "expandtabs":
        tab = _int_arg(args, kwargs, 0, "tabsize", 8)
        size = len(text) * max(tab, 1) if isinstance(tab, int) else 0
    elif name == "replace":
        size = _replace_size(text, *args[:3], *([kwargs["count"]] if "count" in kwargs else []))
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        size = len(text) * max(longest, 1)
    if isinstance(size, int) and not isinstance(size, bool):
        m.allow(size, f"str.{name}")


def _join_items(m: _Meter, sep: str, items: Any) -> list:
    items = list(m.iterate(items)) if not isinstance(items, (list, tuple, str)) else items
    total = sum(m.text_size(v) for v in items) + len(sep) * max(len(items) - 1, 0)
    m.allow(total, "a joined string")
    return list(items)


# ---- filters -----------------------------------------------------------------------------

# Filters that never stringify their input (the rest do, and get their input size-checked).
_NO_STRINGIFY = frozenset(
    """attr batch count d default dictsort first float groupby int items last length list
    map max min random reject rejectattr reverse select selectattr slice sort sum unique
    abs round bool safe""".split()
)


def _check_filter(m: _Meter, name: str, value: Any, args: tuple, kwargs: dict) -> None:
    text = value if isinstance(value, str) else None
    if name == "center":
        width = _int_arg(args, kwargs, 0, "width", 80)
        if isinstance(width, int):
            m.allow(width, "center")
    elif name == "indent" and text is not None:
        width = _int_arg(args, kwargs, 0, "width", 4)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        m.allow(len(text) + (text.count("\n") + 1) * max(per_line, 0), "indent")
    elif name in ("wordwrap", "striptags", "urlize", "wordcount"):
        size = m.text_size(value)
        if size > _MAX_REGEX_FILTER_INPUT:
            raise BudgetExceeded(f"the {name} filter is limited to {_MAX_REGEX_FILTER_INPUT} chars")
        if name == "wordwrap":
            wrap = _int_arg(args, kwargs, 2, "wrapstring", None)
            m.allow(size * (1 + (len(wrap) if isinstance(wrap, str) else 1)), "wordwrap")
    elif name == "replace" and text is not None:
        m.allow(_replace_size(text, *args[:3]), "replace")
    elif name == "format" and text is not None:
        _percent_size(m, text, kwargs or tuple(args))
    elif name in ("batch", "slice"):
        count = _int_arg(args, kwargs, 0, "linecount" if name == "batch" else "slices", 1)
        if isinstance(count, int):
            m.allow(count * _ITEM_UNITS, name)
    elif name == "tojson":
        indent = _int_arg(args, kwargs, 1, "indent", None)
        if isinstance(indent, int) and indent > 16 or isinstance(indent, str) and len(indent) > 16:
            raise BudgetExceeded("tojson indent is limited to 16")


def _materialize(m: _Meter, value: Any) -> Any:
    if isinstance(value, (types.GeneratorType, map, filter, zip, Iterator)) and not isinstance(
        value, (str, list, tuple, dict)
    ):
        return list(m.iterate(value))
    return value


def _metered_filter(name: str, func: Any) -> Any:
    offset = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
    stringifies = name not in _NO_STRINGIFY

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        m = meter()
        m.step()
        if len(args) > offset:
            value = args[offset]
            # tojson gets a generator as is: json.dumps refuses it, as in transformers
            if (stringifies and name != "tojson") or name == "sum":
                value = _materialize(m, value)
                args = (*args[:offset], value, *args[offset + 1 :])
            if stringifies and not isinstance(value, str):
                m.text_size(value)
            if name == "sum" and isinstance(value, (list, tuple)):
                if any(not isinstance(v, (int, float)) for v in value):
                    size = sum(_units(v) or m.text_size(v) for v in value)
                    m.allow(size, "a sum of sequences")
                    m.step(len(value))
            _check_filter(m, name, value, args[offset + 1 :], kwargs)
        result = func(*args, **kwargs)
        if isinstance(result, types.GeneratorType):
            return m.iterate(result)
        return m.charge(result)

    return run


def _metered_test(func: Any) -> Any:
    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        meter().step()
        return func(*args, **kwargs)

    return run


# ---- globals -----------------------------------------------------------------------------


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    """jinja2's lipsum with at most 20 paragraphs of at most 200 words."""
    if not all(isinstance(v, int) for v in (n, min, max)) or n > 20 or max > 200 or min > max:
        raise BudgetExceeded("lipsum is limited to 20 paragraphs of 200 words in chat templates")
    return generate_lorem_ipsum(n, html, min, max)


# ---- the environment ---------------------------------------------------------------------

_EXT_ID = "loaders.template_sandbox._Loops"


class _Loops(Extension):
    """Holds the loop-iteration counter the parser wires every {% for %} through."""

    identifier = _EXT_ID

    def iterate(self, iterable: Any) -> Iterator[Any]:
        return meter().iterate(iterable)


def _metered_concat(items: Iterable[Any]) -> str:
    m = meter()
    items = list(m.iterate(items)) if not isinstance(items, list) else items
    m.step()
    m.allow(sum(m.text_size(v) for v in items), "a concatenated string")
    return m.charge("".join(items))


def _metered_join(join: Any) -> Any:
    def run(seq: Iterable[Any]) -> str:
        m = meter()
        items = list(seq)
        m.step()
        m.allow(sum(m.text_size(v) for v in items), "a concatenated (~) string")
        return m.charge(join(items))

    return run


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every operation metered (see the module docstring). It
    also fails on any unsafe attribute at once, even one only printed."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"+", "-"})

    def __init__(self, **options: Any) -> None:
        extensions = [*options.pop("extensions", []), _Loops]
        super().__init__(extensions=extensions, optimized=False, **options)
        self.concat = _metered_concat  # block sets, macros, call/filter blocks
        self.finalize = self._finalize
        self.globals["lipsum"] = _lipsum
        self.filters = {k: _metered_filter(k, f) for k, f in self.filters.items()}
        self.tests = {k: _metered_test(f) for k, f in self.tests.items()}

    def add_filter(self, name: str, func: Any) -> None:
        self.filters[name] = _metered_filter(name, func)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(
                nodes.ExtensionAttribute(_EXT_ID, "iterate"), [loop.iter], [], None, None
            )
        return tree

    def from_string(self, source: Any, globals: Any = None, template_class: Any = None) -> Any:
        template = super().from_string(source, globals, template_class)
        namespace = template.root_render_func.__globals__
        namespace["str_join"] = _metered_join(str_join)
        namespace["markup_join"] = _metered_join(markup_join)
        return template

    @staticmethod
    def _finalize(value: Any) -> Any:
        m = meter()
        m.step()
        if not isinstance(value, str):
            m.text_size(value)
        return value

    # -- hooks ---------------------------------------------------------------------------

    def getattr(self, obj: Any, attribute: str) -> Any:
        meter().step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        m = meter()
        m.step()
        value = super().getitem(obj, argument)
        return m.charge(value) if isinstance(argument, slice) else value

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        m = meter()
        m.step()
        if operator == "*":
            _check_repeat(m, left, right)
            _check_repeat(m, right, left)
            if _is_int(left) and _is_int(right):
                if left.bit_length() + right.bit_length() > _MAX_POW_BITS:
                    raise SecurityError(f"{operator} of such large integers is not allowed")
        elif operator == "**" and _is_int(left) and _is_int(right):
            if right > 0 and abs(left) > 1 and abs(left).bit_length() * right > _MAX_POW_BITS:
                raise SecurityError(f"{left} ** {right} is too large for a chat template")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and type(left) is type(right):
                m.allow(_units(left) + _units(right), "a sum")
        elif operator == "%" and isinstance(left, str):
            _percent_size(m, left, right)
        return m.charge(super().call_binop(context, operator, left, right))

    def call_unop(self, context: Any, operator: str, arg: Any) -> Any:
        meter().step()
        return super().call_unop(context, operator, arg)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        m = meter()
        m.step()
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's loop(children)
            args = (m.iterate(args[0]), *args[1:])
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and isinstance(__obj, types.BuiltinMethodType):
            if __obj.__name__ == "join" and args:
                args = (_join_items(m, owner, args[0]), *args[1:])
            else:
                _check_str_method(m, owner, __obj.__name__, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, types.GeneratorType):
            return m.iterate(result)
        return m.charge(result)

    def wrap_str_format(self, value: Any) -> Any:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt: str = value.__self__
        is_map = value.__name__ == "format_map"

        @functools.wraps(wrapper)
        def checked(*args: Any, **kwargs: Any) -> str:
            m = meter()
            m.step()
            if is_map and len(args) == 1 and isinstance(args[0], dict):
                _format_size(m, fmt, (), args[0])
            else:
                _format_size(m, fmt, args, kwargs)
            return m.charge(wrapper(*args, **kwargs))

        return checked

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        """Fail at once (jinja2 would hand back an Undefined that prints as "")."""
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_repeat(m: _Meter, seq: Any, count: Any) -> None:
    if isinstance(seq, (str, list, tuple)) and _is_int(count) and count > 0:
        m.allow(_units(seq) * count, f"repeating a sequence {count} times")


def render_metered(template: Any, budget: RenderBudget, context: dict, inputs: tuple) -> str:
    """Render a compiled template under a fresh meter; output capped by the value limit."""
    with metered(budget, *inputs) as m:
        out: list[str] = []
        size = 0
        for chunk in template.generate(**context):
            size += len(chunk)
            m.step()
            m.allow(size, "the rendered prompt")
            out.append(chunk)
        return "".join(out)
