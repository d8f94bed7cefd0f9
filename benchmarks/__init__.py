"""The benchmark suite: ``python -m benchmarks.run [--quick] [--json PATH]`` (see README.md)."""
