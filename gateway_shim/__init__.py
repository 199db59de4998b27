"""The gateway shim: authenticates, admits or refuses, forwards, meters, emits.

Imports the event schema and configuration from ``quotameter``; never imports
``pipeline``.
"""
