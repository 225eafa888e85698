"""Runnable examples: ``python -m nbbn.examples.NAME``."""
