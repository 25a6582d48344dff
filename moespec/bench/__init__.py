"""Measuring moespec: evaluation on held-out text, routing traces, benchmarks, the cost model."""
