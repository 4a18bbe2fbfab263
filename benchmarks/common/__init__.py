"""What the benchmark scripts share: see benchmarks/__init__.py."""
