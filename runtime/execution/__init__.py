"""Running a loaded model over a paged KV cache: model_runner.py (ModelRunner: the KV pools per
device, CUDA graphs, input preparation, `run(batch) -> logits`), attention_backends.py (CPU and
Triton paged attention, one per layer), kv_pool.py, forward_batch.py, decode_graph.py."""
