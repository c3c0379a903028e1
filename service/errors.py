"""Domain errors. They never import grpc: the transport maps them to status codes by one table
(:data:`service.server.STATUS_BY_ERROR`). Their message is written for the caller and is safe
to send; anything that is not a :class:`GatewayError` answers INTERNAL with a fixed message.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of the errors whose message the caller may see."""


class InvalidInput(GatewayError):
    """The request is malformed: bad image, bad tensor, bad field."""


class ModelNotFound(GatewayError):
    """No such model or version is served."""


class Overloaded(GatewayError):
    """Too many requests in flight: try again later."""


class BackendUnavailable(GatewayError):
    """TorchServe cannot be reached or its worker failed."""


class ModelNotLoaded(BackendUnavailable):
    """TorchServe answers but has not loaded a model the gateway serves (restarted without
    it, or unregistered): the server's fault and worth a retry (UNAVAILABLE), not the
    caller's (NOT_FOUND is for names the gateway does not serve)."""


class DeadlineExceeded(GatewayError):
    """The request's deadline ran out."""


class Unauthenticated(GatewayError):
    """Missing or wrong credentials."""


class BackendRefused(GatewayError):
    """The model server refused a call the gateway built and checked (its probe plan, the
    tensor it decoded and validated, or a coalesced batch, whose requests the coalescer then
    sends one by one): the gateway and the served archives disagree (a deployment fault,
    never the caller's)."""


class NotOffered(GatewayError):
    """The request asks for what this gateway was set not to do: a certificate where
    ``allow_certify`` is false (and the policy does not certify every request anyway). The
    same request will be refused again: ask without it."""


class PolicyMismatch(GatewayError):
    """A gate policy does not belong to the served model (its model hash differs), its
    probe does not fit the model's input, or the policy or the coalescing settings would ask
    more of one call than the model's archive allows (the handler would refuse it)."""
