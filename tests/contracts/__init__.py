"""Dataset modules the tests pass to the pipelines as files (--transforms tests/contracts/X.py)."""
