"""Time one qwen35 delta-net layer on the CPU, and its recurrence alone, at a real shape.

    PYTHONPATH=<tree> python scripts/bench_delta_net.py [--threads 2] [--reps 20] [--json]

<tree> is the checkout whose code is timed (a tree from before the native delta rule works:
its recurrence is runtime/models/delta_net's torch forms). Shape (default Qwen3.5-0.8B's
delta nets): E 1024, 16 q/k heads, 16 v heads, head dim 128, conv kernel 4; linears Q4_0
(random, native matmuls). Cases: decode of 1 and of 16 sequences (one token each, states
after a prompt), and a 512-token prefill of one sequence from position 0. Per case the
median over --reps of: the recurrence alone (q, k, v, g, β in; o and the states out) and
the whole layer (its matmuls, conv, norms, recurrence, gating, out projection). Threads as
in a forward pass (kernels/thread_policy.py): native kernels on --threads, torch's ops on one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kernels.layer_ops import CPU_OPS
from kernels.linear import PackedLinear
from kernels.thread_policy import forward_threads
from quant.quantize import quantize
from runtime.kv.recurrent_state import RecurrentStep, Run, SeqState
from runtime.models.delta_net import DeltaNet

Q4_0 = 2
CASES = {"decode x1": (1, 1), "decode x16": (16, 1), "prefill 512": (1, 512)}  # (B, n)


def linear(rows: int, cols: int) -> PackedLinear:
    return PackedLinear(quantize(torch.randn(rows, cols) * cols**-0.5, Q4_0), Q4_0, cols)


def layer(e: int, hk: int, hv: int, d: int, k: int) -> DeltaNet:
    channels = 2 * hk * d + hv * d
    return DeltaNet(
        qkv=linear(channels, e),
        z=linear(hv * d, e),
        beta=linear(hv, e),
        alpha=linear(hv, e),
        **taps(torch.randn(channels, k) * 0.5),
        dt_bias=torch.randn(hv) * 0.1,
        a=-torch.rand(hv) * 2 - 0.05,
        norm=torch.ones(d),
        out=linear(e, hv * d),
        k_heads=hk,
        v_heads=hv,
        head_dim=d,
        eps=1e-6,
    )


def taps(conv: torch.Tensor) -> dict[str, torch.Tensor]:
    """The conv's weights (C, K) as the tree's DeltaNet takes them: taps (K, C), or (before
    the native conv) conv (C, K)."""
    if "taps" in DeltaNet.__dataclass_fields__:
        return {"taps": conv.t().contiguous()}
    return {"conv": conv}


def rule():
    """The code under test's recurrence as f(q, k, v, g, beta, states) → o, q/k untiled."""
    try:
        from kernels.delta_rule import delta_rule_states

        return delta_rule_states
    except ImportError:  # a tree from before: the torch forms, on stacked states
        from runtime.models import delta_net as old

        def before(q, k, v, g, beta, states):
            hv = v.shape[2]
            q, k = (x.repeat(1, 1, hv // x.shape[2], 1) for x in (q, k))
            form = getattr(old, "delta_rule_chunked" if q.shape[1] >= 2 else "delta_rule")
            o, s = form(q, k, v, g, beta, torch.stack(states))
            return o

        return before


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def case(net: DeltaNet, b: int, n: int, reps: int) -> dict[str, float]:
    e, hk, hv, d = net.out.out_features, net.k_heads, net.v_heads, net.head_dim
    seqs = [SeqState() for _ in range(b)]
    if n == 1:  # decode: states from an 8-token prompt each
        net(
            0,
            torch.randn(8 * b, e),
            RecurrentStep(tuple(Run(8 * j, 8, s) for j, s in enumerate(seqs))),
            CPU_OPS,
        )
    h = torch.randn(b * n, e)

    def whole():
        runs = tuple(Run(j * n, n, seqs[j] if n == 1 else SeqState()) for j in range(b))
        net(0, h, RecurrentStep(runs), CPU_OPS)

    q, k = (F.normalize(torch.randn(b, n, hk, d), dim=-1) for _ in range(2))
    v, g, beta = torch.randn(b, n, hv, d), -torch.rand(b, n, hv), torch.rand(b, n, hv)
    states = [torch.zeros(hv, d, d) for _ in range(b)]
    recurrence = rule()
    return {
        "rule_ms": median_ms(lambda: recurrence(q, k, v, g, beta, states), reps),
        "layer_ms": median_ms(whole, reps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k-heads", type=int, default=16)
    ap.add_argument("--v-heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = layer(args.dim, args.k_heads, args.v_heads, args.head_dim, 4)
    results = {}
    with torch.inference_mode(), forward_threads(args.threads):  # as a forward pass runs
        for name, (b, n) in CASES.items():
            results[name] = case(net, b, n, args.reps if n == 1 else max(3, args.reps // 4))
            if not args.json:
                r = results[name]
                print(
                    f"{name:12s} recurrence {r['rule_ms']:8.3f} ms   layer {r['layer_ms']:8.3f} ms"
                )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
