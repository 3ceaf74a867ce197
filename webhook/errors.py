"""The one error type the injection core raises: a message a user can act on, returned to the API server verbatim."""
from __future__ import annotations


class InjectionError(ValueError):
    """Bad input (pod, annotation, config): the message names what and where; nothing is half-applied."""


class ConfigError(ValueError):
    """A configuration file (values, mesh config, injector config) that cannot be used, with its path and field."""
