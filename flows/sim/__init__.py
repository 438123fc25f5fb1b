"""Simulated LightRAG and Perplexity servers for the demo, the tests and the benchmarks."""
