"""Decoding: the pieces a decode step is made of (so far: token-tree verification, `tree`)."""
