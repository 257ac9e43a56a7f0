"""The typed error hierarchy: every error a user can cause says what to change.

All derive from TandemError (a ValueError), so callers may catch one type; the server maps
them to OpenAI-style error objects with a 4xx status (InternalError: 500). The module sits in
the lowest package (quant) so that every package can raise these without importing upward.
"""


class TandemError(ValueError):
    """Base of every error tandem raises for bad input or an unusable model."""


class GGUFError(TandemError):
    """The file is not a valid GGUF (corrupt, truncated, hostile or unsupported version)."""


class UnsupportedError(TandemError):
    """The model uses an architecture, tensor type or tokenizer tandem does not support."""


class TokenizerError(TandemError):
    """Tokenizer metadata is missing or inconsistent."""


class TemplateError(TandemError):
    """A chat template failed to render or tried something the sandbox forbids."""


class InvalidParameterError(TandemError):
    """A sampling or runtime parameter has a bad name or value."""


class ContextLengthError(TandemError):
    """The prompt (plus max_tokens) does not fit the model's context window."""


class ModelNotFoundError(TandemError):
    """No model of that name is known, stored or present at that path."""


class ModelfileError(TandemError):
    """A Modelfile does not parse or says something tandem cannot do; `line` is where (1-based),
    or None when the problem is the file as a whole (e.g. no FROM)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"Modelfile line {line}: {message}" if line else f"Modelfile: {message}")
        self.line = line


class PullError(TandemError):
    """Fetching a model (package registry, Hugging Face, an ollama registry) failed or gave
    the wrong bytes."""


class RegistryUnreachableError(PullError):
    """No registry answered at the address a pull was pointed to (network down, wrong
    TANDEM_OLLAMA_REGISTRY)."""


class DigestMismatchError(PullError):
    """Downloaded bytes do not hash to the digest the registry named; they were deleted."""


class QueueFullError(TandemError):
    """The engine's waiting queue is full; the client should retry later (HTTP 503)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosedError(TandemError):
    """The engine was shut down; no new requests are taken."""


class ServerUnreachableError(TandemError):
    """No tandem server answers at the given address (`tandem ps` and other clients)."""


class PlanError(TandemError):
    """The model does not fit the devices as asked: the message gives the numbers and what to
    lower (num_ctx, num_parallel, num_gpu)."""


class InternalError(TandemError):
    """A bug or an unexpected failure inside tandem (HTTP 500)."""


class NonFiniteLogitsError(InternalError):
    """The model produced NaN or +inf logits for a sequence: its numerics broke down, so that
    request fails (HTTP 500) and the others in the same step go on."""


class TooManyStopsError(InvalidParameterError):
    """A request gave more stop strings, or longer ones, than the engine accepts."""


class TemplateBudgetError(TemplateError):
    """A chat template went over its render budget (steps, time, or the size of what it
    builds); the template, not the request, has to change (or the request is far too big)."""
