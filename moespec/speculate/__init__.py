"""Guessing which experts later layers will need: router lookahead, default vectors, learned
estimators, and the policy that turns guesses into prefetches (or into speculative execution)."""
