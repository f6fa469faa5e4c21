"""State (de)serialisation: JSON only, never pickle.

A state is encoded once, at the storage boundary. Dicts, lists and scalars go through
the standard ``json`` module; pydantic models, dataclasses and anything else pydantic's
``TypeAdapter`` understands go through pydantic (imported only when such a state is
seen). Large encodings are compressed with zlib; the stored value is ``str`` for plain
JSON and ``bytes`` (``b"z"`` + zlib data) for compressed JSON.
"""

from __future__ import annotations

import importlib
import json
import zlib
from typing import Any

from loomc._errors import StateError

__all__ = ["COMPRESS_AT", "TypeRef", "decode", "encode", "encode_json", "resolve_type", "type_ref"]

#: Encodings at least this long are compressed.
COMPRESS_AT = 2048
_JSON_TYPES = (dict, list, str, int, float, bool, type(None))

TypeRef = str  # "json" or "module:qualname"

# Types seen in this process, so a state class defined inside a function still
# round-trips when resumed in the same process.
_seen_types: dict[str, type] = {}
_adapters: dict[type, Any] = {}


def type_ref(state: Any) -> TypeRef:
    """Name the type a state must be restored to."""
    cls = type(state)
    if cls in _JSON_TYPES or cls is tuple:
        return "json"
    ref = f"{cls.__module__}:{cls.__qualname__}"
    _seen_types[ref] = cls
    return ref


def resolve_type(ref: TypeRef | None) -> type | None:
    """The class named by ``ref``, or ``None`` for plain JSON (or an unimportable class)."""
    if ref is None or ref == "json":
        return None
    if ref in _seen_types:
        return _seen_types[ref]
    module, _, qualname = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, type):
        _seen_types[ref] = obj
        return obj
    return None


def _adapter(cls: type) -> Any:
    adapter = _adapters.get(cls)
    if adapter is None:
        from pydantic import TypeAdapter

        adapter = _adapters[cls] = TypeAdapter(cls)
    return adapter


def _find_bad_field(value: Any, path: str, depth: int = 0) -> str | None:
    """Path of the first value that cannot be serialised, for the error message."""
    if depth > 50:
        return path
    if isinstance(value, (str, int, float, bool, type(None))):
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)):
                return f"{path}[{k!r}] (key)"
            bad = _find_bad_field(v, f"{path}[{k!r}]", depth + 1)
            if bad:
                return bad
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = _find_bad_field(v, f"{path}[{i}]", depth + 1)
            if bad:
                return bad
        return None
    fields = getattr(type(value), "model_fields", None)
    if fields is not None:
        for name in fields:
            bad = _find_bad_field(getattr(value, name, None), f"{path}.{name}", depth + 1)
            if bad:
                return bad
        return None
    try:
        _adapter(type(value)).dump_json(value)
    except Exception:  # noqa: BLE001 - any failure marks this value as the culprit
        return path
    return None


def encode_json(state: Any) -> str:
    """Serialise a state to JSON text.

    Raises:
        StateError: naming the field that cannot be serialised.
    """
    return _json_bytes(state).decode()


def _json_bytes(state: Any) -> bytes:
    """The state's JSON as UTF-8 bytes (compact, non-ASCII kept)."""
    cls = type(state)
    try:
        if cls in _JSON_TYPES or cls is tuple:
            try:
                # pydantic_core's encoder is several times faster than json.dumps (100 KB: 60 us
                # vs 400 us) and writes the same compact text; json.dumps stays the fallback.
                return _to_json(state)
            except Exception:  # noqa: BLE001 - whatever it refuses, the standard encoder may take
                return json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode()
        return _adapter(cls).dump_json(state)  # type: ignore[no-any-return]
    except StateError:
        raise
    except Exception as exc:
        where = _find_bad_field(state, "state") or "state"
        raise StateError(
            f"cannot serialise the state: {where} is a {type(_lookup(state, where)).__name__}, "
            f"which has no JSON form ({type(exc).__name__}: {exc}). Keep only JSON-serialisable "
            "values (or pydantic models) in the state; nothing was written for this step"
        ) from exc


_encoder: Any = None


def _to_json(state: Any) -> bytes:
    global _encoder
    if _encoder is None:
        from pydantic_core import to_json

        _encoder = to_json
    return _encoder(state)  # type: ignore[no-any-return]


def _lookup(state: Any, path: str) -> Any:
    # Best effort: re-walk the path produced by _find_bad_field to name the type.
    import ast
    import re

    value = state
    for token in re.findall(r"\[([^\]]+)\]|\.(\w+)", path.removeprefix("state").removesuffix(" (key)")):
        key, attr = token
        try:
            value = value[ast.literal_eval(key)] if key else getattr(value, attr)
        except Exception:  # noqa: BLE001
            return value
    return value


def encode(state: Any, compress_at: int = COMPRESS_AT) -> str | bytes:
    """Serialise a state for storage (``str`` JSON, or ``bytes`` when compressed)."""
    raw = _json_bytes(state)
    if len(raw) >= compress_at:
        return b"z" + zlib.compress(raw, 1)
    return raw.decode()


def decode(blob: str | bytes | None, ref: TypeRef | None = "json") -> Any:
    """Rebuild a state from its stored form, as the type named by ``ref``."""
    if blob is None:
        return None
    if isinstance(blob, (bytes, bytearray, memoryview)):
        raw = bytes(blob)
        text = zlib.decompress(raw[1:]).decode() if raw[:1] == b"z" else raw.decode()
    else:
        text = blob
    cls = resolve_type(ref)
    if cls is None:
        return json.loads(text)
    return _adapter(cls).validate_json(text)
