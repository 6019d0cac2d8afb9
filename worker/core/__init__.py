"""The shared core every product builds on: configuration, the error tree, logs
and metrics, AWS clients, the backoff policy and timestamp rules.

The core imports no product; see ARCHITECTURE.md for the layout.
"""
