"""Benchmark and evaluation harness."""
