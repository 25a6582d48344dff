"""Turning logits into text: sampling, batched generation, stop conditions."""
