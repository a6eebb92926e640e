"""The FrozenTune harness: runtime setup, tiny models, a headless ComfyUI server, the demo.

Used by the tests, the benchmarks and ``make demo``; not part of the shipped pack.
"""
