"""The serving engine: requests in, tokens out. llm_engine.py (LLMEngine: one step =
schedule, run, sample), engine.py (a thread around it for the server), scheduler.py and
block_manager.py (continuous batching over paged KV blocks, prefix cache), sequence.py,
sampler.py, stop.py. The model itself runs in runtime.execution; SamplingParams is
runtime/sampling_params.py."""
