"""Benchmarks and the chaos report: commands that print numbers, not tests (see each module's docstring)."""
