"""Domain errors of the gate.

Every error the gate raises derives from :class:`GateError` (itself a ``ValueError``). The
gateway checks policies and plans when it starts (PolicyMismatch there), and the request path
turns a :class:`ScoreInputError` from the backend's answers into the backend's fault
(:func:`service.backend.unusable`); one that reaches the transport otherwise is a bug,
answered INTERNAL with a fixed message and its traceback logged. A verdict is never an error:
REJECT and FLAG are data in a :class:`~service.gate.report.GateReport`.
"""

from __future__ import annotations


class GateError(ValueError):
    """Base class: the gate was given inputs that break its contract."""


class PlanError(GateError):
    """A probe plan is malformed (unknown field, value out of range, bad version)."""


class PolicyError(GateError):
    """A policy file or object is malformed, inconsistent, or made for another model."""


class CalibrationError(GateError):
    """Calibration inputs are unusable (empty, non-finite, mismatched shapes)."""


class ScoreInputError(GateError):
    """Logits or features do not match the plan (wrong shape, non-finite values)."""
