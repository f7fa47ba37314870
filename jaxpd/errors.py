"""Typed errors. Library code raises these; entry points (CLI, servers) decide how to report them."""


class JaxpdError(Exception):
    """Base class for errors a user can act on; the message says what to fix."""


class ConfigError(JaxpdError, ValueError):
    """A model or deployment configuration is invalid or unsupported."""


class CheckpointError(JaxpdError):
    """A checkpoint is missing, corrupt, or does not match the model it claims to be."""


class ShardingError(JaxpdError, ValueError):
    """A model cannot be laid out on the requested mesh (e.g. heads not divisible by TP)."""


class CapacityError(JaxpdError):
    """A request cannot be placed even with nothing else running (its KV exceeds a page pool).

    `request_id` names it, so a batch driver can end that one request and carry on.
    """

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id
