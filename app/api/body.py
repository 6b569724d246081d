"""Request bodies, decoded once and strictly.

Litestar converts bodies leniently ("10" becomes 10); the API takes JSON types
as they are. `StrictJson[Struct]` is the handler's DTO: Litestar hands it the
raw body and it decodes it straight into the Struct with msgspec in strict mode,
so the body is read and decoded exactly once, and the OpenAPI schema still
comes from the Struct."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec
from litestar.dto import MsgspecDTO
from litestar.typing import FieldDefinition

from app.api.problems import problem

S = TypeVar("S", bound=msgspec.Struct)


class StrictJson(MsgspecDTO[S], Generic[S]):
    @classmethod
    def create_openapi_schema(cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any) -> Any:
        # The Struct's own schema: the body is decoded into it, not into the
        # transfer model Litestar would derive from it.
        return schema_creator.for_field_definition(FieldDefinition.from_annotation(cls.model_type))

    def decode_bytes(self, value: bytes) -> Any:
        # An empty body is an empty object: commit and release need no fields.
        return strict(value or b"{}", self.model_type)


def strict(body: bytes, model: type[S]) -> S:
    """`body` decoded into `model` strictly, or a validation problem."""
    try:
        return msgspec.json.decode(body, type=model, strict=True)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise problem("validation", str(exc)) from exc
    except RecursionError as exc:
        raise problem("validation", "the JSON body is nested too deeply") from exc
