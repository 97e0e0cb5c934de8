"""Benchmark suite: AGaLiTe against GTrXL and LSTM baselines (``python -m bench``; see bench/results/README.md)."""
