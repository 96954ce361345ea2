"""Model weights: where they come from and their configs (files, torch-free), reading their
tensors (read), one-time conversions of GGUF and .bin checkpoints (convert) and `p3 quantize`
(quantize)."""
