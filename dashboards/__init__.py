"""Dashboard panel definitions, defined once (``billing``, ``quotas``,
``operations``; listed in ``catalog``) and rendered two ways: Grafana JSON
(``grafana``, pushed by ``push``) and the built-in page (``server``)."""
