"""Speculative decoding: proposers guess several tokens cheaply, the target verifies them all in one forward pass.

config.py (what the user asks for) -> proposer.py (the interface), ngram.py / suffix.py / draft_model.py (the
proposers) -> rejection.py (exact verification) -> adaptive.py (how many tokens to propose, from measured step times) ->
metrics.py (counters) -> speculator.py (what the engine step calls).
"""
