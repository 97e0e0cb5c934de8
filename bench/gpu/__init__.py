"""The prepared GPU session (``python -m bench.gpu --out DIR``; ``--dry-run`` on CPU).

One command that, on a CUDA machine, checks every kernel against the reference at real sizes, runs
the GPU tests, reports what the kernels compiled to, sweeps the launch table and measures the figures,
writing one JSON line per case to ``DIR/gpu.jsonl`` as it goes. See ``session.py`` for the stages and
``bench/results/README.md`` for how to run it on the device machine. Nothing is imported here, so
that ``__main__`` can set TRITON_INTERPRET before Triton is loaded.
"""
