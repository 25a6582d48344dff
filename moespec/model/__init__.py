"""The forward pass: attention, routing, MoE blocks and the transformer that stacks them."""
