"""The embedded stack: real services started as child processes on one machine.

Used by ``make run`` (``quotameter up``) and by the integration-test fixtures,
so the tests exercise exactly what an operator runs.
"""
