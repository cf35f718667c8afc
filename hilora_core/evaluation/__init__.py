"""Measuring routers: sequence-level routing metrics and the generation harness of the benchmarks."""
