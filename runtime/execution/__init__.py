"""Running a loaded model: model_runner.py (ModelRunner: the KV pools per device, CUDA graphs,
input preparation, `run(batch) -> logits`) and decode_graph.py (the captured decode step)."""
