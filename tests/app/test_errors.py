"""app/errors.py: the one client error and the one formatter of pydantic validation errors, as
each caller words it (request parameters, the admin body, v2 infer, a manifest, the settings)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, ValidationError, model_validator

from app.errors import APIError, location, validation_message


class Inner(BaseModel):
    n: int = Field(ge=1)


class Outer(BaseModel):
    name: str
    inner: list[Inner]

    @model_validator(mode="after")
    def _check(self) -> Outer:
        if self.name == "bad":
            raise ValueError("name must not be 'bad'")
        return self


def _errors(data: object) -> list:
    with pytest.raises(ValidationError) as ei:
        Outer.model_validate(data)
    return ei.value.errors()


def test_each_error_located_by_its_dotted_loc_joined_by_semicolons() -> None:
    errors = _errors({"inner": [{"n": 1}, {"n": 0}]})
    assert validation_message(errors) == (
        "name: Field required; inner.1.n: Input should be greater than or equal to 1"
    )
    assert validation_message(errors[:1], lambda e: location(e, ("body",))) == "body.name: Field required"


def test_an_error_of_the_object_itself_is_at_the_root() -> None:
    assert validation_message(_errors({"name": "bad", "inner": []})) == (
        "(root): Value error, name must not be 'bad'"
    )
    assert validation_message(_errors([])) == "(root): Input should be a valid dictionary or instance of Outer"
    assert location({"loc": ()}, ("body",)) == "body"


def test_api_error_within_prefixes_the_reason_and_keeps_status_and_headers() -> None:
    exc = APIError(503, "busy", {"Retry-After": "1"}).within("files[2]")
    assert (exc.status_code, exc.detail, str(exc), exc.headers) == (503, "files[2]: busy", "files[2]: busy",
                                                                   {"Retry-After": "1"})
