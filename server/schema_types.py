"""Field types of the API's schemas (server.schemas): the integers, text and JSON values the
databases can store and the API can send back, refused up front (422) otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints

MAX_INT32 = 2**31 - 1  # epochs, counts, offsets: the databases' INTEGER
MAX_INT63 = 2**63 - 1  # ingestion cursors: BIGINT
NO_NUL = "^[^\\u0000]*$"
"""What the databases can store as text: no NUL character (and, unsaid because JSON texts in
UTF-8 cannot carry them, no lone surrogates); as a JSON Schema `pattern`."""


def _unicode(value: str) -> str:
    """Lone surrogates (e.g. a non-UTF-8 file name from `os.fsdecode`) cannot be stored as
    UTF-8 or sent back in a JSON response: refuse them up front."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


def storable_text(value: str) -> str:
    """Refuse (422, before anything is stored) text a text column cannot hold or the API
    cannot send back: NUL characters and lone surrogates."""
    if "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    return _unicode(value)


def unicode_json(value: Any, where: str = "config") -> Any:
    """Every key and string inside a JSON value is valid Unicode (NUL is fine: JSON escapes it)."""
    try:
        if isinstance(value, str):
            _unicode(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                _unicode(str(key))
                unicode_json(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                unicode_json(item, f"{where}[{i}]")
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None
    return value


Text = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200),
    AfterValidator(storable_text),
    Field(json_schema_extra={"pattern": NO_NUL}),
]
TaskName = Text


def _json_integer(value: Any) -> Any:
    """A JSON Schema integer: 3 and 3.0, never true/false or "3" (pydantic's lax int takes
    those; its strict int refuses 3.0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


EpochNumber = Annotated[int, Field(ge=0, le=MAX_INT32), BeforeValidator(_json_integer)]
Metric = float | None
