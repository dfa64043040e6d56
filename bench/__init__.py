"""Benchmarks (run as scripts; see README.md). A package so `bench.agentic` imports unambiguously."""
