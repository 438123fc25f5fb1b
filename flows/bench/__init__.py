"""Benchmarks of the project's hot paths (`rollout bench ...`)."""
