"""Bench: prompt-processing and generation speed of one model, measured as llama-bench does.

    tandem bench MODEL|FILE.gguf [-p 512] [-n 128] [-d 0] [-t THREADS] [-r 5] [--num-gpu N]
                 [--json]

pp (prompt processing): one forward of an `n_prompt`-token prompt (BOS, then random token
ids) into an empty cache; tokens/s = n_prompt / its time. tg (text generation): `n_gen`
forwards of one token each into an empty cache, the first being BOS at position 0 and each
next token the argmax of the previous logits; tokens/s = n_gen / their time. Both follow
llama-bench's tests pp<N> and tg<N>, so the two tools' figures compare directly. With a
depth (-d, llama-bench's -d) both tests start from a cache already holding that many tokens
(BOS, then random ids, prefilled untimed in chunks of 512), at positions depth, depth + 1, …:
"pp512 @ d1024", "tg128 @ d1024".

Both run the serving engine's path, a ModelRunner (runtime/execution/model_runner.py): the sequence's KV
in a paged pool on each layer's device, and on a model entirely on a CUDA GPU the decode step
replayed as a CUDA graph. --num-gpu N (llama-bench's -ngl) places N layers on the GPU
through the planner (0: none; -1: the planner's choice); by default the model is placed as
`tandem run` places it.

weights_gb_s is, for tg, the bytes of packed matmul weights one token reads (every layer's
q, k, v, o, gate, up and down, the output head, and one row of token_embd unless the head is
the embedding itself) times tokens/s: the rate at which decoding streams weights from RAM
and VRAM, the figure bounded by memory bandwidth. Norms and the KV cache are left out (they
are small at these lengths).

Every figure is a mean ± sample standard deviation over `repetitions` runs after one
warm-up run of each test (which also builds the native kernel and faults the mmapped
weights in). Threads are the forward's (kernels/thread_policy.py): the native kernel's pool,
or torch's intra-op pool where there is no native kernel.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from kernels import native_loader
from kernels.linear import PackedLinear
from kernels.lora_linear import LoraLinear
from kernels.thread_policy import default_threads
from kernels.triton_linear import TritonLinear
from quant.errors import InvalidParameterError
from runtime.execution.model_runner import ModelRunner
from runtime.kv.forward_batch import ForwardBatch
from runtime.kv.kv_pool import BLOCK_SIZE
from runtime.loaded_model import LoadedModel
from runtime.placement.auto_placement import auto_placement


@dataclass(frozen=True)
class BenchSpec:
    """What to measure: tests pp<n_prompt> and tg<n_gen> (0 skips one), `repetitions` each."""

    model: str
    n_prompt: int = 512
    n_gen: int = 128
    threads: int | None = None  # None: torch's current setting
    repetitions: int = 5
    seed: int = 0
    n_depth: int = 0  # tokens already in the cache when each test starts
    num_gpu: int | None = None  # layers on the GPU (0: none, -1: the planner's choice);
    # None: as `tandem run` places the model (its Modelfile's num_gpu, else the planner)

    def validate(self) -> None:
        if self.n_prompt < 0 or self.n_gen < 0 or self.n_depth < 0:
            raise InvalidParameterError("-p, -n and -d are token counts: give 0 or more")
        if self.n_prompt == 0 and self.n_gen == 0:
            raise InvalidParameterError(
                "-p 0 and -n 0 leave nothing to measure; give either "
                "a prompt length or a number of tokens to generate"
            )
        if self.threads is not None and self.threads < 1:
            raise InvalidParameterError(f"--threads must be at least 1, not {self.threads}")
        if self.num_gpu is not None and self.num_gpu < -1:
            raise InvalidParameterError(
                f"--num-gpu must be -1 (auto), 0 or a layer count, not {self.num_gpu}"
            )
        if self.repetitions < 1:
            raise InvalidParameterError(f"--repetitions must be at least 1, not {self.repetitions}")


@dataclass
class BenchResult:
    """Measured figures; a skipped test leaves its fields None. *_samples: one per run."""

    model: str
    path: str
    file_bytes: int
    kernel: str
    threads: int
    n_prompt: int
    n_gen: int
    repetitions: int
    weight_bytes_per_token: int
    pp_tok_s: float | None = None
    pp_tok_s_std: float | None = None
    tg_tok_s: float | None = None
    tg_tok_s_std: float | None = None
    weights_gb_s: float | None = None
    weights_gb_s_std: float | None = None
    pp_samples: list[float] = field(default_factory=list)
    tg_samples: list[float] = field(default_factory=list)
    n_depth: int = 0
    placement: str = "100% CPU"  # ollama's PROCESSOR: layers on the CPU / GPU
    gpu_layers: int = 0
    cuda_graphs: bool = False  # decode steps replayed as CUDA graphs

    def to_dict(self) -> dict:
        return asdict(self)


def weight_bytes_per_token(lm: LoadedModel) -> int:
    """Packed bytes of the matmul weights one decoded token reads: all blocks' linears, the
    active experts' share of each routed expert tensor (experts_used / experts of it: the
    active weights), the head, and one embedding row (none extra when the head is the tied
    embedding)."""
    model = lm.model
    linears = [lin for layer in model.layers for lin in _linears(layer)]
    head = model.head.base if isinstance(model.head, LoraLinear) else model.head  # its base's rows
    total = sum(lin.weight.numel() for lin in linears) + head.weight.numel()
    for layer in model.layers:
        moe = getattr(layer, "moe", None)
        if moe is not None:
            for experts in (moe.gate, moe.up, moe.down):
                total += experts.weight.numel() * moe.n_used // experts.weight.shape[0]
    if not lm.config.tied_head:
        total += model.embed.weight[0].numel()  # the one row looked up
    return total


def _linears(part: object, depth: int = 2) -> list[PackedLinear | TritonLinear]:
    """The packed linears of a layer, and of the parts it holds (a DeltaNet, a MoE's router)."""
    found = []
    for v in vars(part).values():
        if isinstance(v, PackedLinear | TritonLinear):
            found.append(v)
        elif depth and dataclasses.is_dataclass(v) and not isinstance(v, type):
            found += _linears(v, depth - 1)
    return found


def kernel_name() -> str:
    """Which matmul path the model's PackedLinears take: "native-avx2", "native-scalar" or
    "torch" (the dequantize-and-matmul fallback)."""
    module = native_loader.load() if native_loader.enabled() else None  # as available()
    if module is not None:
        return f"native-{module.ISA}"
    return "torch"


def mean_std(samples: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single sample), as llama-bench reports."""
    std = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return statistics.fmean(samples), std


class Bench:
    """Runs the tests of a BenchSpec on one loaded model through a ModelRunner, as the
    serving engine runs it (one sequence, its blocks in order)."""

    def __init__(self, lm: LoadedModel, spec: BenchSpec) -> None:
        self.lm, self.spec = lm, spec
        self.model = lm.model
        self.n_ctx = bench_context(spec)
        self.table = list(range(self.n_ctx // BLOCK_SIZE))  # one sequence's blocks, in order
        self.runner = ModelRunner(self.model, len(self.table), "f16", self.n_ctx, max_batch=1)
        self.bos = lm.tokenizer.bos_id if lm.tokenizer.bos_id is not None else 0
        self.generator = torch.Generator().manual_seed(spec.seed)

    def prompt_tokens(self, n: int) -> torch.Tensor:
        """BOS then n-1 random ids, as llama-bench's prompt test feeds: (n,) int64."""
        ids = torch.randint(0, self.lm.config.vocab_size, (n,), generator=self.generator)
        ids[0] = self.bos
        return ids

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        """tokens at positions start … into the pool → the last one's logits (1, V)."""
        return self.runner.run(ForwardBatch.build([(tokens, start, self.table, True)]))

    def fill_to_depth(self) -> None:
        """Positions 0 … n_depth-1 of the pool filled (BOS, then random ids), untimed."""
        depth = self.spec.n_depth
        tokens = self.prompt_tokens(depth).tolist() if depth else []
        with torch.inference_mode():
            for start in range(0, depth, 512):
                self.forward(tokens[start : start + 512], start)

    def time_prompt(self, n: int) -> float:
        """Seconds for one forward of an n-token prompt at the depth (BOS first when the
        depth is 0)."""
        depth = self.spec.n_depth
        self.fill_to_depth()
        tokens = self.prompt_tokens(n)
        if depth:
            tokens[0] = int(
                torch.randint(0, self.lm.config.vocab_size, (1,), generator=self.generator)
            )
        with torch.inference_mode():
            start = time.perf_counter()
            self.forward(tokens.tolist(), depth)
            _sync()
            return time.perf_counter() - start

    def time_generation(self, n: int) -> float:
        """Seconds for n one-token forwards from the depth (greedy: argmax feeds the next;
        the first token is BOS)."""
        self.fill_to_depth()
        token, depth = self.bos, self.spec.n_depth
        with torch.inference_mode():
            start = time.perf_counter()
            for pos in range(depth, depth + n):
                token = int(self.forward([token], pos)[-1].argmax())
            return time.perf_counter() - start

    def run(self) -> BenchResult:
        spec = self.spec
        result = BenchResult(
            self.lm.name,
            str(self.lm.path),
            self.lm.path.stat().st_size,
            kernel_name(),
            self.lm.model.num_threads or default_threads(),
            spec.n_prompt,
            spec.n_gen,
            spec.repetitions,
            weight_bytes_per_token(self.lm),
            n_depth=spec.n_depth,
            placement=self.model.devices.describe(),
            gpu_layers=sum(b.triton for b in self.model.layers),
            cuda_graphs=self.runner.cuda_graphs,
        )
        if spec.n_prompt:
            self.time_prompt(spec.n_prompt)  # warm-up
            result.pp_samples = [
                spec.n_prompt / self.time_prompt(spec.n_prompt) for _ in range(spec.repetitions)
            ]
            result.pp_tok_s, result.pp_tok_s_std = mean_std(result.pp_samples)
        if spec.n_gen:
            self.time_generation(min(spec.n_gen, 2))  # warm-up (captures the decode graph)
            result.tg_samples = [
                spec.n_gen / self.time_generation(spec.n_gen) for _ in range(spec.repetitions)
            ]
            result.tg_tok_s, result.tg_tok_s_std = mean_std(result.tg_samples)
            gb = [result.weight_bytes_per_token * s / 1e9 for s in result.tg_samples]
            result.weights_gb_s, result.weights_gb_s_std = mean_std(gb)
        return result


def bench_context(spec: BenchSpec) -> int:
    """Tokens of context the tests need, in whole 16-token pages."""
    return -(-(max(spec.n_prompt, spec.n_gen, 1) + spec.n_depth) // BLOCK_SIZE) * BLOCK_SIZE


def _sync() -> None:
    """Wait for queued GPU work, so that a timing covers it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_bench(spec: BenchSpec) -> BenchResult:
    """Validate, set the threads, load the model (placed as num_gpu says, else as the
    Modelfile and the planner say) and measure."""
    spec.validate()
    base = {"num_thread": spec.threads} if spec.threads else None
    placement = None
    if spec.num_gpu is not None:
        placement = auto_placement(num_ctx=bench_context(spec), num_gpu=spec.num_gpu)
    return Bench(LoadedModel.load(spec.model, placement, base=base), spec).run()


def format_table(r: BenchResult) -> str:
    """llama-bench's markdown table: one row per test, t/s as mean ± std."""
    head = "| model | size | kernel | threads | ngl | test | t/s | weights GB/s |"
    rows = [head, "|" + "|".join("---" for _ in range(8)) + "|"]
    size = f"{r.file_bytes / 2**20:.2f} MiB"
    graphs = " (graphs)" if r.cuda_graphs else ""
    lead = f"| {r.model} | {size} | {r.kernel} | {r.threads} | {r.gpu_layers}{graphs} "
    at = f" @ d{r.n_depth}" if r.n_depth else ""
    if r.pp_tok_s is not None:
        rows.append(lead + f"| pp{r.n_prompt}{at} | {r.pp_tok_s:.2f} ± {r.pp_tok_s_std:.2f} | |")
    if r.tg_tok_s is not None:
        rows.append(
            lead + f"| tg{r.n_gen}{at} | {r.tg_tok_s:.2f} ± {r.tg_tok_s_std:.2f} "
            f"| {r.weights_gb_s:.2f} ± {r.weights_gb_s_std:.2f} |"
        )
    return "\n".join(rows)
