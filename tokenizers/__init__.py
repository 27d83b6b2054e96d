"""Tokenizers: one module per modality, raw tensors -> `Tokens`."""
