"""The threat model, as tests: each file is one class of attack and what must hold."""
