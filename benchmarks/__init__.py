"""Benchmark scripts (see BENCHMARKS.md); ``benchmarks.gpu`` is the staged GPU run."""
