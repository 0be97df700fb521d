"""Mora GraphQL: programming-tutorial videos to runnable code, streamed live."""

__version__ = "0.1.0"
