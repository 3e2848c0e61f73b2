"""The one error for "the client gets status S with reason R", and the one way a pydantic
validation error is put into words.

A leaf (pydantic's error dicts only, no other app module): image decoding, body reading, the
routes and the model store raise or format with it; app/error_handlers.py turns it, and every
other error, into JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

ValidationErrorDetails = Mapping[str, Any]  # one item of pydantic's `ValidationError.errors()`


class APIError(Exception):
    """The client gets HTTP `status_code` with reason `detail` (str(exc)), and `headers`."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers

    def within(self, where: str) -> APIError:
        """The same error, its reason prefixed by the part of the request it is about ("files[2]")."""
        return APIError(self.status_code, f"{where}: {self.detail}", self.headers)


def model_not_found(name: str) -> APIError:
    """404 for a model name that a route does not know (GET /models/{name}, POST /explain?model=,
    the /v2/models/{name} routes)."""
    return APIError(404, f"model '{name}' not found")


def location(error: ValidationErrorDetails, prefix: tuple[str, ...] = ()) -> str:
    """Where a pydantic error is: its `loc` after `prefix`, dotted ("inputs.0.shape"); "(root)" for
    the validated object itself."""
    return ".".join(str(x) for x in (*prefix, *error["loc"])) or "(root)"


def validation_message(
    errors: Iterable[ValidationErrorDetails], where: Callable[[ValidationErrorDetails], str] = location
) -> str:
    """Each error as "<where>: <msg>", joined by "; " (e.g. "body.version: String should match ...")."""
    return "; ".join(f"{where(e)}: {e['msg']}" for e in errors)
