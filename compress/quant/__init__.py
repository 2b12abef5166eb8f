"""Numerics: one file per numeric format or method (fp8, int4, fp4 (E2M1, E8M0; MXFP4), nvfp4, awq, gptq,
w4a8, kv), each starting with its pure tensor functions (``quantize(w) -> (q, scale)``,
``dequantize(q, scale) -> w``)."""
