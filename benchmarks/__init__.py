"""Throughput and memory of each lit_rlhf stage beside a plain-PyTorch floor doing the same work.

Run ``python -m benchmarks`` (or ``make bench``); see ``benchmarks/README.md``.
"""
