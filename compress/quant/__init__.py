"""Numerics: one file per numeric format or method (fp8, int4, awq, gptq, w4a8, kv), each starting
with its pure tensor functions (``quantize(w) -> (q, scale)``, ``dequantize(q, scale) -> w``)."""
