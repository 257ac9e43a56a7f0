"""Reading models: GGUF files, model configs, tokenizers, chat templates, pulling."""
