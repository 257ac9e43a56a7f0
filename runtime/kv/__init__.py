"""The paged KV cache as the model sees it: kv_pool.py (each device's pages, BLOCK_SIZE, the
KV formats and their bytes per token), forward_batch.py (one step's rows, positions, block
tables and slots), attention_backends.py (CPU and Triton paged attention, chosen per layer)."""
