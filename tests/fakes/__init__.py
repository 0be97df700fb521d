"""Test doubles that speak the real wire formats over real sockets."""
