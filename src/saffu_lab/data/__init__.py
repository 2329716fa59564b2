"""Corpora, the synthetic grammar and the data module."""
