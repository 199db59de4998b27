"""What an operator sees of a running shim or worker: OpenTelemetry metrics
(served as Prometheus text on ``/metrics``, exported over OTLP when an
endpoint is set), traces over OTLP, and logs (JSON lines or the console).

Shared by the shim (gateway_shim/telemetry.py) and the worker
(pipeline/telemetry.py), which define their own instruments through the
OpenTelemetry API; this package only sets up where the data goes. It imports
nothing of the product but the config.

    setup.start(service, config.telemetry)   # once per process
    logs.configure(config.telemetry, service)
    app.router.add_get("/metrics", prometheus.metrics_handler)
"""
