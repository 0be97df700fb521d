"""`mora run`: follow a session from the terminal.

This package is a client of the public GraphQL API only (HTTP and `graphql-transport-ws`);
it imports nothing from the server side, so it works the same against a remote server and
against the embedded one it starts as a subprocess (`embedded.py`).
"""
