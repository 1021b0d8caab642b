"""Benchmarks: capability matrix, speed/memory/FLOPs, quality tasks, report."""
