"""Quantization in plain torch float ops: per-row symmetric codes,
weight quantization (with an optional clipping search) and the simulation path."""
