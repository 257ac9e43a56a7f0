"""The planner on a mixture-of-experts size table (Qwen3-30B-A3B's shape): the MoE split —
every layer on the GPU but the routed experts of the last layers — priced by the experts a
token reads, chosen over the best layer split when it is faster; num_cpu_moe (llama.cpp's
--n-cpu-moe) and pins combining with the auto-fit."""

from __future__ import annotations

import dataclasses

from test_planner import MB, Q4_0, Sized, config, machine

from runtime.placement.model_sizes import ModelSizes
from runtime.placement.plan_cost import CPU, GPU
from runtime.placement.planner import PlanRequest, plan

N_LAYER, N_EXPERT, N_USED = 48, 128, 8
EXPERTS_MB, ATTN_MB = 330.0, 12.0  # per layer: routed experts (3 tensors), attention


def moe_sizes() -> ModelSizes:
    c = dataclasses.replace(
        config(N_LAYER), arch="qwen3moe", n_expert=N_EXPERT, n_expert_used=N_USED
    )
    table = {
        "token_embd.weight": Sized(160 * MB, Q4_0, int(160 * MB * 1.8)),
        "output.weight": Sized(160 * MB, Q4_0, int(160 * MB * 1.8)),
        "output_norm.weight": Sized(8192, 0, 2048),
    }
    for i in range(N_LAYER):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            table[f"blk.{i}.{name}.weight"] = Sized(
                int(ATTN_MB / 4 * MB), Q4_0, int(ATTN_MB / 4 * MB * 1.8)
            )
        table[f"blk.{i}.ffn_gate_inp.weight"] = Sized(1 * MB, 0, MB // 4)
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            share = int(EXPERTS_MB / 3 * MB)
            table[f"blk.{i}.{name}.weight"] = Sized(share, Q4_0, int(share * 1.8))
        for name in ("attn_norm", "ffn_norm"):
            table[f"blk.{i}.{name}.weight"] = Sized(8192, 0, 2048)
    return ModelSizes.from_tensors(c, table)


def request(**kw) -> PlanRequest:
    return PlanRequest(num_ctx=4096, **kw)


def test_experts_are_priced_by_the_active_share():
    sizes = moe_sizes()
    cpu_only = plan(sizes, machine(None), request(ctx_fill=1))  # KV reads negligible
    (reads,) = [line for line in cpu_only.decode.lines if line.startswith("CPU reads")]
    per_token = cpu_only.decode.seconds["cpu reads"]
    # a token reads attention, router, head, and 8/128 of the experts, not all 16 GB
    active = N_LAYER * (ATTN_MB + 1 + EXPERTS_MB * N_USED / N_EXPERT) * MB + 160 * MB
    total = sum(t.nbytes for t in sizes.tensors)
    assert total > 15e9
    assert "GB" in reads or "MB" in reads
    ram_bw = cpu_only.calibration.ram_bw * cpu_only.calibration.cpu_efficiency
    assert abs(per_token * ram_bw - active) / active < 0.05


def test_small_gpu_chooses_the_moe_split_over_layer_splits():
    best = plan(moe_sizes(), machine(8 << 30), request())
    assert best.candidate.moe_split and best.candidate.cpu_experts[1] == N_LAYER
    assert best.candidate.n_gpu == N_LAYER
    first = best.candidate.cpu_experts[0]
    assert best.placement.tensors["blk.0.attn_q.weight"] == GPU
    assert best.placement.tensors[f"blk.{N_LAYER - 1}.ffn_up_exps.weight"] == CPU
    assert best.placement.tensors[f"blk.{N_LAYER - 1}.ffn_gate_inp.weight"] == GPU
    if first > 0:  # the earliest layers' experts fit on the GPU too
        assert best.placement.tensors["blk.0.ffn_up_exps.weight"] == GPU
    layer = [r for r in best.sweep if r["fits"] and r["cpu_experts_from"] is None]
    best_layer = max(r["decode_tokens_per_s"] for r in layer)
    assert best.decode.tokens_per_s > 1.5 * best_layer


def test_num_cpu_moe_fixes_the_first_layers_experts_on_the_cpu():
    best = plan(moe_sizes(), machine(24 << 30), request(num_cpu_moe=10))
    assert best.candidate.cpu_experts == (0, 10)
    assert best.placement.tensors["blk.9.ffn_down_exps.weight"] == CPU
    assert best.placement.tensors["blk.10.ffn_down_exps.weight"] == GPU


def test_pins_combine_with_the_auto_fit():
    best = plan(moe_sizes(), machine(8 << 30), request(pins=(r"blk\.0\.ffn_.*_exps",)))
    assert best.placement.tensors["blk.0.ffn_gate_exps.weight"] == CPU
    assert best.candidate.moe_split
