"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Counters and latency histograms are measured here, in the server (time to first token from
the request's arrival, inter-token latency between successive tokens of one sample); the
engine's own figures (running, waiting, KV blocks, token totals) are read from
`Engine.stats()` at scrape time and labelled by model.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)

# EngineStats field -> (metric name, type, help)
ENGINE_GAUGES = (
    ("running", "tandem_running_sequences", "gauge", "sequences being decoded"),
    ("waiting", "tandem_queue_depth", "gauge", "requests waiting for admission"),
    ("kv_blocks_used", "tandem_kv_blocks_used", "gauge", "KV cache blocks in use"),
    ("kv_blocks_free", "tandem_kv_blocks_free", "gauge", "KV cache blocks free"),
    ("kv_bytes", "tandem_kv_cache_bytes", "gauge", "bytes the KV pool spans"),
    (
        "kv_bytes_saved",
        "tandem_kv_cache_bytes_saved",
        "gauge",
        "bytes the KV cache type saves against f16",
    ),
    ("prompt_tokens_total", "tandem_prompt_tokens_total", "counter", "prompt tokens processed"),
    ("generation_tokens_total", "tandem_generation_tokens_total", "counter", "tokens generated"),
    ("preemptions_total", "tandem_preemptions_total", "counter", "sequences preempted"),
)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class Histogram:
    """Cumulative-bucket histogram; `observe` is thread-safe."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum, self.count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            self.count += 1
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
                    break

    def render(self) -> list[str]:
        with self._lock:
            lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
            total = 0
            for bound, n in zip(self.buckets, self.counts, strict=True):
                total += n
                lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
            lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
            lines.append(f"{self.name}_sum {self.sum!r}")
            lines.append(f"{self.name}_count {self.count}")
            return lines


class ServerMetrics:
    """What the server measures itself; `render` adds the engines' figures."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, status) -> count
        self.aborted = 0
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds",
            "time from request arrival to its first token",
            TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "tandem_inter_token_latency_seconds",
            "time between successive tokens of one sample",
            ITL_BUCKETS,
        )
        self._lock = threading.Lock()

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def count_abort(self) -> None:
        with self._lock:
            self.aborted += 1

    def render(self, engines: Iterable[tuple[str, object]]) -> str:
        """The exposition text; `engines` yields (model name, EngineStats)."""
        lines = [
            "# HELP tandem_requests_total HTTP requests answered, by endpoint and status",
            "# TYPE tandem_requests_total counter",
        ]
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(
                    f"tandem_requests_total{_labels({'endpoint': endpoint, 'status': status})} {n}"
                )
            lines += [
                "# HELP tandem_requests_aborted_total requests cancelled by their client",
                "# TYPE tandem_requests_aborted_total counter",
                f"tandem_requests_aborted_total {self.aborted}",
            ]
        lines += self._engine_lines(list(engines))
        lines += self.ttft.render() + self.itl.render()
        return "\n".join(lines) + "\n"

    @staticmethod
    def _engine_lines(engines: list[tuple[str, object]]) -> list[str]:
        lines: list[str] = []
        for field, name, kind, help_text in ENGINE_GAUGES:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for model, stats in engines:
                lines.append(f"{name}{_labels({'model': model})} {_num(getattr(stats, field))}")
        return lines
