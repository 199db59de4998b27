"""The one exception tree of quotameter.

    QuotameterError
    ├── ConfigError         the YAML policy or a setting is invalid
    ├── EventError          a usage event could not be decoded or validated
    ├── KeyFormatError      a presented API key is not shaped like one of ours
    └── ServiceError        an embedded service (broker, redis, worker) failed to start
"""


class QuotameterError(Exception):
    """Root of every error quotameter raises on purpose."""


class ConfigError(QuotameterError):
    """The configuration is invalid. The message names the offending path;
    fix the file (``quotameter check-config FILE`` re-checks it)."""


class EventError(QuotameterError):
    """A usage event is malformed. The message says which field and why; the
    event is not counted (the pipeline routes it aside with the reason)."""


class KeyFormatError(QuotameterError):
    """A presented API key is not a quotameter key. Create one with
    ``quotameter keys create``."""


class ServiceError(QuotameterError):
    """A process of the embedded stack did not start or died. The message
    names the process and the tail of its log."""
