"""Every Modelfile PARAMETER of the option table (modelfiles/parameters.py) either changes
what the model does — the resolved RunOptions differ and the change reaches the component
that acts on it (sampler, engine, planner, threads) — or is refused with a message saying it
is not supported. A parameter added to the table without a check here fails
test_every_parameter_is_checked."""

from __future__ import annotations

import pytest
import torch
from test_store import write_tiny_llama

from modelfiles.parameters import OPTIONS, PARAMETERS, UNSUPPORTED, format_value
from modelfiles.parser import parse_modelfile
from modelfiles.resolver import ModelSpec
from quant.errors import ModelfileError, PlanError
from runtime.engine.llm_engine import LLMEngine
from runtime.engine.sampler import Sampler
from runtime.execution import model_runner
from runtime.llm import LLM
from runtime.loaded_model import LoadedModel
from runtime.placement.devices import Calibration, Devices, Gpu
from runtime.placement.model_sizes import ModelSizes
from runtime.placement.plan_cost import CPU, GPU
from runtime.placement.planner import plan
from runtime.run_options import RunOptions
from runtime.sampling_params import SamplingParams

# a non-default Modelfile value for each implemented parameter
CHANGED = {
    "temperature": "0",
    "top_k": "1",
    "top_p": "0.3",
    "min_p": "0.5",
    "repeat_penalty": "1.8",
    "repeat_last_n": "0",
    "presence_penalty": "1.5",
    "frequency_penalty": "1.5",
    "seed": "7",
    "stop": "END",
    "num_predict": "3",
    "num_ctx": "128",
    "num_gpu": "0",
    "num_cpu_moe": "2",
    "num_thread": "1",
    "num_batch": "32",
    "gpu_memory": "1000",
    "pin": r"blk\.0\.ffn_up=cpu",
}
UNSUPPORTED_NAMES = sorted(n for n, o in PARAMETERS.items() if o.effect == UNSUPPORTED)


def modelfile_options(name: str, text: str) -> RunOptions:
    mf = parse_modelfile(f'FROM x\nPARAMETER {name} "{text}"\n')
    return RunOptions.resolve(mf.parameters)


def test_every_parameter_is_checked():
    assert set(PARAMETERS) == set(CHANGED) | set(UNSUPPORTED_NAMES)
    assert not set(CHANGED) & set(UNSUPPORTED_NAMES)


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_implemented_parameter_changes_the_resolved_options(name):
    assert modelfile_options(name, CHANGED[name]) != RunOptions.resolve({})


# ---- sampling: the change reaches the sampler --------------------------------------------

LOGITS = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
HISTORY = [0, 0, 0, 1, 2]


def draws(params: SamplingParams, n: int = 300) -> list[int]:
    sampler = Sampler(params)
    return [sampler.sample(LOGITS, HISTORY).token_id for _ in range(n)]


SAMPLER_OPTIONS = [
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
]


@pytest.mark.parametrize("name", SAMPLER_OPTIONS)
def test_sampling_parameter_changes_the_draws(name):
    seed = "FROM x\nPARAMETER seed 1\n"  # the same random stream on both sides
    default = RunOptions.resolve(parse_modelfile(seed).parameters).sampling
    mf = parse_modelfile(f"{seed}PARAMETER {name} {CHANGED[name]}\n")
    changed = RunOptions.resolve(mf.parameters).sampling
    assert getattr(changed, OPTIONS[name].field) != getattr(default, OPTIONS[name].field)
    assert draws(changed) != draws(default)


def test_seed_makes_the_draws_repeat():
    seeded = modelfile_options("seed", CHANGED["seed"]).sampling
    assert seeded.seed == 7 and draws(seeded) == draws(seeded)
    unseeded = RunOptions.resolve({}).sampling
    assert unseeded.seed is None and draws(unseeded) != draws(unseeded)


# ---- a tiny model: the change reaches the engine, the planner, the threads ------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("effect") / "tiny.gguf"
    write_tiny_llama(path)
    return path


def load(tiny, parameters: dict) -> LoadedModel:
    return LoadedModel.load(ModelSpec("tiny", tiny, parameters=parameters))


def parsed(name: str) -> dict:
    return parse_modelfile(f'FROM x\nPARAMETER {name} "{CHANGED[name]}"\n').parameters


def test_num_predict_and_stop_reach_the_engine(tiny):
    greedy = {"temperature": 0.0}
    llm = LLM(ModelSpec("tiny", tiny, parameters=greedy))
    free = llm.generate(["ab"], llm.options.sampling)[0].outputs[0]
    assert len(free.token_ids) > 3  # n_ctx_train 256 ends it, or the model's own EOS
    short = LLM(ModelSpec("tiny", tiny, parameters={**greedy, **parsed("num_predict")}))
    out = short.generate(["ab"], short.options.sampling)[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    stop_at = free.text[1:4]
    stopped = LLM(ModelSpec("tiny", tiny, parameters={**greedy, "stop": [stop_at]}))
    out = stopped.generate(["ab"], stopped.options.sampling)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == free.text[: free.text.find(stop_at)]


def test_num_ctx_reaches_the_engine_and_the_planned_kv(tiny):
    lm = load(tiny, parsed("num_ctx"))
    assert lm.options.num_ctx == 128 and LLMEngine(lm, lm.options.engine_options()).num_ctx == 128
    default = load(tiny, {})
    assert default.options.num_ctx == 256  # the table's 4096, clamped to n_ctx_train
    sizes = ModelSizes.from_tensors(lm.config, lm.gguf.tensors)
    kv = [
        plan(sizes, cpu_machine(), x.options.plan_request()).memory[CPU].kv for x in (lm, default)
    ]
    assert kv[0] * 2 == kv[1]


def test_num_batch_reaches_the_scheduler_and_the_planner(tiny):
    lm = load(tiny, parsed("num_batch"))
    engine = LLMEngine(lm, lm.options.engine_options())
    assert engine.scheduler.max_step_tokens == 32
    assert lm.options.plan_request().num_batch == 32


def test_num_thread_reaches_every_forward(tiny, monkeypatch):
    seen = []
    real = model_runner.forward_threads

    def spy(threads=0):
        seen.append(threads)
        return real(threads)

    monkeypatch.setattr(model_runner, "forward_threads", spy)
    llm = LLM(ModelSpec("tiny", tiny, parameters=parsed("num_thread")))
    assert llm.lm.model.num_threads == 1
    llm.generate(["ab"], SamplingParams(max_tokens=2, temperature=0))
    assert seen and set(seen) == {1}


def test_forward_threads_hands_the_count_to_the_kernel(monkeypatch):
    from kernels import native_loader, thread_policy

    calls = []

    class Kernel:
        def set_num_threads(self, n):
            calls.append(n)

    monkeypatch.setattr(native_loader, "enabled", lambda: True)
    monkeypatch.setattr(native_loader, "load", lambda *a: Kernel())
    with thread_policy.forward_threads(3):
        assert calls == [3] and torch.get_num_threads() == 1
    assert calls == [3] and torch.get_num_threads() == 1  # left so: the sampler's ops too
    monkeypatch.setattr(native_loader, "load", lambda *a: None)  # torch does the matmuls
    with thread_policy.forward_threads(2):
        assert torch.get_num_threads() == 2


# ---- placement: num_gpu, gpu_memory and pins reach the planner --------------------------------

NO_SPEEDS = Calibration()  # the assumed figures: no measuring in a test


def cpu_machine() -> Devices:
    return Devices((), 64 << 30, 64 << 30, 4, NO_SPEEDS)


def gpu_machine() -> Devices:
    return Devices((Gpu(0, "test GPU", 8 << 30, 8 << 30),), 64 << 30, 64 << 30, 4, NO_SPEEDS)


def planned(tiny, parameters: dict, machine: Devices | None = None):
    """The plan for the Modelfile's parameters, on a machine with an 8 GiB GPU."""
    lm = load(tiny, {})
    sizes = ModelSizes.from_tensors(lm.config, lm.gguf.tensors)
    options = RunOptions.resolve(parameters).for_model(lm.config.n_ctx_train)
    return plan(sizes, machine or gpu_machine(), options.plan_request())


def test_num_gpu_gpu_memory_and_pins_reach_the_plan(tiny):
    default = planned(tiny, {})
    assert default.candidate.n_gpu == 1
    assert default.placement.tensors["blk.0.ffn_up.weight"] == GPU
    assert planned(tiny, parsed("num_gpu")).candidate.n_gpu == 0
    capped = planned(tiny, parsed("gpu_memory"))
    assert capped.budgets.gpu == 1000 and capped.candidate.n_gpu == 0
    pinned = planned(tiny, {**parsed("pin"), "num_gpu": 1})
    assert pinned.placement.tensors["blk.0.ffn_up.weight"] == CPU
    assert pinned.placement.tensors["blk.0.ffn_down.weight"] == GPU


def test_pin_to_gpu_is_honoured_in_the_plan_or_refused_without_a_gpu(tiny):
    rule = {"pin": [r"blk\.0\.ffn_.*=gpu"], "num_gpu": 0}
    p = planned(tiny, rule)
    assert p.candidate.n_gpu == 0 and p.placement.kv == (CPU,)
    assert {n for n, d in p.placement.tensors.items() if d == GPU} == {
        "blk.0.ffn_norm.weight",
        "blk.0.ffn_gate.weight",
        "blk.0.ffn_up.weight",
        "blk.0.ffn_down.weight",
    }
    assert p.memory[GPU].weights > 0
    with pytest.raises(PlanError, match="pin .*=gpu asks for the GPU but no GPU found"):
        planned(tiny, rule, cpu_machine())
    if not torch.cuda.is_available():  # loading with a GPU pin says there is no GPU
        with pytest.raises(PlanError, match="no CUDA device"):
            load(tiny, rule)


# ---- unsupported: refused with a message, accepted only at the value tandem implements ----


def _other(option):
    if option.off is None:
        return {"int": "8", "float": "0.5", "bool": "true"}[option.kind]
    if option.kind == "bool":
        return format_value(not option.off)
    return format_value(option.off + (1 if option.kind == "int" else 0.5))


@pytest.mark.parametrize("name", UNSUPPORTED_NAMES)
def test_unsupported_parameter_is_refused_with_a_message(name):
    option = PARAMETERS[name]
    with pytest.raises(ModelfileError, match=f"{name} .* is not supported") as err:
        parse_modelfile(f"FROM x\nPARAMETER {name} {_other(option)}\n")
    assert err.value.line == 2 and "remove it" in str(err.value)
    if option.off is not None:  # the value that means what tandem does anyway: no change
        mf = parse_modelfile(f"FROM x\nPARAMETER {name} {format_value(option.off)}\n")
        assert RunOptions.resolve(mf.parameters) == RunOptions.resolve({})
