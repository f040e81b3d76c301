"""Benchmarks of phasewatch against external yardsticks (not part of the installed package)."""
