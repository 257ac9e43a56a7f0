"""GGML block formats: reference dequantization, quantizers, format table."""
