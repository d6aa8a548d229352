"""Fixtures shared by every test module.

Area-specific helpers live in `tests/support_*.py` modules so that the agent, broker, NBD and PKI
suites can grow side by side without editing one file.
"""
