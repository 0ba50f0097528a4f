"""Decoding, piece by piece: what `mtp.generate.generate` is made of.

`cache` (static KV caches), `decoder` (the device-side state of B rows and its step functions),
`chain` and `tree` (the two kinds of step: one draft per head, or a tree of candidates),
`sampling` (the acceptance rules), `compile` (compiled step functions, kept per model),
`stacked` and `packed` (faster heads and linear layers on CPU), `stops` (stop strings).
"""
