"""The one error table: every domain error has its status code; anything else is INTERNAL
with a fixed message that never carries the exception's text."""

import grpc
import pytest

from service import errors
from service.server import INTERNAL_MESSAGE, STATUS_BY_ERROR, status_of


@pytest.mark.parametrize("kind,code", sorted(STATUS_BY_ERROR.items(), key=lambda kv: kv[0].__name__))
def test_domain_errors_map_to_their_code_with_their_message(kind, code) -> None:
    assert status_of(kind("what the caller should know")) == (code, "what the caller should know")


def test_every_domain_error_is_in_the_table() -> None:
    kinds = {v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, errors.GatewayError)}
    assert kinds - {errors.GatewayError} == set(STATUS_BY_ERROR)


@pytest.mark.parametrize("exc", [KeyError("secret_key_name"), ValueError("/etc/passwd: bad"), RuntimeError("boom"),
                                 ZeroDivisionError("x"), errors.GatewayError("not a specific kind")])
def test_anything_else_is_internal_with_a_fixed_message(exc) -> None:
    code, message = status_of(exc)
    assert code == grpc.StatusCode.INTERNAL and message == INTERNAL_MESSAGE == "internal error"
