"""State (de)serialisation: JSON only, never pickle.

A state is encoded once, at the storage boundary. Dicts, lists and scalars go through
the standard ``json`` module; pydantic models, dataclasses and anything else pydantic's
``TypeAdapter`` understands go through pydantic (imported only when such a state is
seen). The stored value is ``str`` for plain JSON and ``bytes`` for larger states:

- ``b"Z"`` + a zstd frame: the whole state, compressed (a *keyframe*);
- ``b"D"`` + the keyframe's step number (8 bytes) + a zstd frame compressed with the
  keyframe's JSON as its dictionary: a *delta*, a few hundred bytes when a large state
  changes a little per step. A run's :class:`StateEncoder` picks between the two;
- ``b"z"`` + zlib data: the compressed form of loomc 0.4.0, still read.

A delta names its keyframe by step number within the same run; stores turn it back into
JSON with :func:`delta_base` and :func:`expand`.
"""

from __future__ import annotations

import importlib
import json
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from loomc._core.errors import StateError

__all__ = [
    "COMPRESS_AT", "StateEncoder", "TypeRef", "decode", "delta_base", "encode", "encode_json", "expand",
    "resolve_type", "type_ref",
]

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
    found = _import_type(ref)
    return found if isinstance(found, type) else None


def _import_type(ref: TypeRef | None) -> type | str | None:
    """The class named by ``ref``, ``None`` for plain JSON, or why it cannot be imported."""
    if ref is None or ref == "json":
        return None
    if ref in _seen_types:
        return _seen_types[ref]
    module, _, qualname = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        return f"its module {module} cannot be imported ({exc})"
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            return f"module {module} has no {qualname}"
    if not isinstance(obj, type):
        return f"{ref} is no longer a class"
    _seen_types[ref] = obj
    return obj


def require_type(ref: TypeRef | None, run_id: str) -> type | None:
    """The class a resumed run's state must be rebuilt as (``None``: plain JSON).

    Raises:
        StateError: the class the run stored its state as cannot be imported any more
            (renamed, moved or deleted), so the state would silently come back as a dict.
    """
    found = _import_type(ref)
    if isinstance(found, str):
        module, _, qualname = str(ref).partition(":")
        raise StateError(
            f"run {run_id} stored its state as {ref}, but {found}: the class was renamed, moved or deleted "
            f"since. Make it importable under that name again (e.g. `{qualname.rsplit('.', 1)[-1]} = NewName` "
            f"in {module}), then resume; or start a new run from its last state (`loomc export {run_id} --json` "
            "prints it)"
        )
    return found


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
    """The state's JSON as UTF-8 bytes (compact, non-ASCII kept).

    A plain-JSON state (dict, list, scalar) must come back from its JSON exactly as it
    was; one that would not (a tuple, a set, a datetime, a non-string key...) is refused.
    Both encoders turn a tuple into a list and ``{1: "a"}`` into ``{"1": "a"}`` without a
    word (pydantic's also sets, datetimes, bytes, UUIDs...), so a resumed run would see
    other types than the uninterrupted one. Parsing the JSON back and comparing is done in
    C (a 100-byte state: ~0.4 us); only when they differ is the state walked in Python
    (:func:`_refuse_changed`) to name the field.

    Raises:
        StateError: naming the field that cannot be serialised or would not come back as it is.
    """
    cls = type(state)
    try:
        if cls in _JSON_TYPES or cls is tuple:
            # Called on every step: pydantic_core's functions are bound once, with no call
            # around them (imported at the first state, not with loomc).
            to_json, from_json = _pydantic_json or _load_pydantic_json()
            try:
                # pydantic_core's encoder is several times faster than json.dumps (100 KB: 60 us
                # vs 400 us) and writes the same compact text; json.dumps stays the fallback.
                raw: bytes = to_json(state)
            except Exception:  # noqa: BLE001 - whatever it refuses, the standard encoder may take
                raw = json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode()
            try:
                same = from_json(raw) == state
            except ValueError:  # e.g. a NaN key: not JSON pydantic reads back
                same = False
            if not same:
                _refuse_changed(state)
            return raw
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


_pydantic_json: tuple[Callable[[Any], bytes], Callable[[bytes], Any]] | None = None


def _load_pydantic_json() -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    """pydantic_core's ``to_json`` and ``from_json``, imported on first use."""
    global _pydantic_json
    from pydantic_core import from_json, to_json

    _pydantic_json = (to_json, from_json)
    return _pydantic_json


def _refuse_changed(state: Any) -> None:
    """Name the first field of ``state`` that its JSON would not give back as it is.

    Called only when the parsed JSON differs from the state (a NaN, never equal to
    itself, is then found harmless and nothing is raised).

    Raises:
        StateError: naming the field and what JSON does to it.
    """
    found = _json_change(state, "state", 0)
    if found is not None:
        where, problem = found
        raise StateError(
            f"{where}: {problem}. A dict or list state must come back exactly as it was after a resume "
            "(a pydantic model state keeps the types it declares); nothing was written"
        )


def _key_change(key: Any, owner: dict[Any, Any]) -> str:
    """What JSON does to a dict key that is not a string."""
    try:
        text = next(iter(json.loads(json.dumps({key: 0}))))
    except (TypeError, ValueError):
        return f"a {type(key).__name__} key is not JSON; use string keys"
    clash = f", overwriting the value of the key {text!r}" if text in owner else ""
    return f"the {type(key).__name__} key {key!r} would come back as the string {text!r}{clash}; use string keys"


_HINTS: dict[str, str] = {
    "tuple": "would come back as a list; use a list",
    "set": "would come back as a list; use a (sorted) list",
    "frozenset": "would come back as a list; use a (sorted) list",
    "datetime": "would come back as a string; store value.isoformat() and parse it where you read it",
    "date": "would come back as a string; store value.isoformat() and parse it where you read it",
    "time": "would come back as a string; store value.isoformat() and parse it where you read it",
    "timedelta": "would come back as a string; store value.total_seconds()",
    "bytes": "would come back as a string; store text (e.g. base64)",
    "bytearray": "would come back as a string; store text (e.g. base64)",
    "Decimal": "would come back as a string; store str(value) (or a float)",
    "UUID": "would come back as a string; store str(value)",
}


def _json_change(value: Any, path: str, depth: int) -> tuple[str, str] | None:
    """The first field of a plain-JSON state whose JSON would not give it back, and why."""
    if isinstance(value, (str, int, float, type(None))):  # bool is an int
        return None
    if depth > 200:
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{path}[{k!r}]", _key_change(k, value)
            found = _json_change(v, f"{path}[{k!r}]", depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _json_change(v, f"{path}[{i}]", depth + 1)
            if found is not None:
                return found
        return None
    name = type(value).__name__
    hint = _HINTS.get(name)
    if hint is None:
        hint = "would come back as plain JSON (a dict, list or string), not as this type"
    return path, f"{name} is not JSON and {hint}"


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
    """Serialise a state for storage on its own (``str`` JSON, or a ``bytes`` keyframe)."""
    raw = _json_bytes(state)
    if len(raw) >= compress_at:
        frame: bytes = _zstd_compressor().compress(raw)
        return b"Z" + frame
    return raw.decode()


# ---------------------------------------------------------------------------------- deltas

_zstd: Any = None
_DCTX_KEEP = 4


class _PerThread(threading.local):
    """zstd (de)compressors may not be used by two threads at once: one set per thread."""

    def __init__(self) -> None:
        self.cctx: Any = None
        #: Keyframes whose decompression dictionaries are ready, by their stored bytes.
        self.dctx_cache: OrderedDict[bytes, tuple[bytes, Any]] = OrderedDict()


_local = _PerThread()
_LEVEL = 3  # keyframes
#: Deltas: zstd's fast levels keep one candidate per hash and miss long matches in repetitive
#: text; level 9 searches chains (~90 us for 100 KB here, against 60 us at level 3).
_DELTA_LEVEL = 9


def _zstd_module() -> Any:
    global _zstd
    if _zstd is None:
        import zstandard

        _zstd = zstandard
    return _zstd


def _zstd_compressor() -> Any:
    cctx = _local.cctx
    if cctx is None:
        cctx = _local.cctx = _zstd_module().ZstdCompressor(level=_LEVEL, write_checksum=True)
    return cctx


class StateEncoder:
    """Encodes one run's successive states, storing most large ones as deltas.

    The first large state is a keyframe. Later states are compressed with the keyframe's
    JSON as a zstd dictionary, so what did not change costs almost nothing; once a delta
    grows past the average bytes per step since the keyframe (the state has drifted; for
    the first delta, past half the keyframe), that state becomes the new keyframe. States
    that share nothing with their keyframe back off from trying deltas. Every delta refers to its keyframe directly, so reading any
    state takes at most two blobs.

    The encoder assumes every state it returns is committed, in order, before the next
    one is encoded (a run stops on a failed commit, and a new attempt starts a new encoder),
    and is used by one thread at a time (its run's driver).
    """

    __slots__ = ("_backoff", "_cctx", "_cycle_bytes", "_cycle_steps", "_key_raw", "_key_step", "_skip", "compress_at")

    def __init__(self, compress_at: int = COMPRESS_AT) -> None:
        self.compress_at = compress_at
        self._key_step = -1
        self._key_raw: bytes | None = None
        self._cctx: Any = None
        self._cycle_bytes = 0  # bytes stored since (and including) the keyframe
        self._cycle_steps = 0
        self._skip = 0  # steps left before deltas are tried again
        self._backoff = 1

    def encode(self, state: Any, step_n: int) -> str | bytes:
        """The stored form of ``state``, committed as step ``step_n``."""
        raw = _json_bytes(state)
        if len(raw) < self.compress_at:
            return raw.decode()
        if self._key_raw is not None and self._skip == 0:
            if self._cctx is None:
                zstd = _zstd_module()
                zdict = zstd.ZstdCompressionDict(self._key_raw, dict_type=zstd.DICT_TYPE_RAWCONTENT)
                self._cctx = zstd.ZstdCompressor(dict_data=zdict, level=_DELTA_LEVEL, write_checksum=True, write_dict_id=False)
            out: bytes = self._cctx.compress(raw)
            size = len(out) + 9
            # no bigger than the average bytes per step since the keyframe (half of it, at first)
            if size * max(self._cycle_steps, 2) <= self._cycle_bytes:
                self._cycle_bytes += size
                self._cycle_steps += 1
                self._backoff = 1
                return b"D" + self._key_step.to_bytes(8, "little") + out
            if self._cycle_steps == 1:  # not even the first delta paid: this state does not repeat itself
                self._skip = self._backoff
                self._backoff = min(self._backoff * 2, 64)
        elif self._skip:
            self._skip -= 1
        frame: bytes = _zstd_compressor().compress(raw)
        blob = b"Z" + frame
        self._key_step, self._key_raw, self._cctx = step_n, raw, None
        self._cycle_bytes, self._cycle_steps = len(blob), 1
        return blob


def delta_base(blob: Any) -> int | None:
    """The keyframe step a stored delta needs, or ``None`` when ``blob`` stands alone."""
    if isinstance(blob, (bytes, bytearray, memoryview)) and blob[:1] == b"D":
        return int.from_bytes(blob[1:9], "little")
    return None


def expand(blob: bytes, base: str | bytes | None) -> bytes:
    """A delta's state as ``b"J"`` + its JSON, given the stored form of its keyframe."""
    if base is None:
        raise StateError("a stored state refers to a keyframe that is missing; the database is damaged")
    base = bytes(base) if not isinstance(base, str) else base.encode()
    cache = _local.dctx_cache
    hit = cache.get(base)
    if hit is None:
        zstd = _zstd_module()
        key_raw = _raw_json(base)
        dctx = zstd.ZstdDecompressor(dict_data=zstd.ZstdCompressionDict(key_raw, dict_type=zstd.DICT_TYPE_RAWCONTENT))
        hit = cache[base] = (key_raw, dctx)
        if len(cache) > _DCTX_KEEP:
            cache.popitem(last=False)
    else:
        cache.move_to_end(base)
    try:
        whole: bytes = hit[1].decompress(bytes(blob[9:]))
    except Exception as exc:
        raise StateError(f"a stored state does not match its keyframe ({exc}); the database is damaged") from exc
    return b"J" + whole


def _raw_json(blob: bytes) -> bytes:
    """The JSON bytes of a stand-alone stored form."""
    tag = blob[:1]
    if tag == b"Z":
        return _zstd_module().ZstdDecompressor().decompress(blob[1:])  # type: ignore[no-any-return]
    if tag == b"z":
        return zlib.decompress(blob[1:])
    if tag == b"J":
        return blob[1:]
    return blob


def decode(blob: str | bytes | None, ref: TypeRef | None = "json") -> Any:
    """Rebuild a state from its stored form, as the type named by ``ref``."""
    if blob is None:
        return None
    if isinstance(blob, (bytes, bytearray, memoryview)):
        raw = bytes(blob)
        if raw[:1] == b"D":
            raise StateError("a delta state was decoded without its keyframe (call expand first)")
        text = _raw_json(raw).decode()
    else:
        text = blob
    cls = resolve_type(ref)
    if cls is None:
        return json.loads(text)
    try:
        return _adapter(cls).validate_json(text)
    except ValueError as exc:  # pydantic's ValidationError: the class changed since the state was stored
        raise StateError(_changed_class(ref, exc)) from exc


def _changed_class(ref: TypeRef | None, exc: ValueError) -> str:
    """Why a stored state no longer fits its class, and what to do."""
    errors = getattr(exc, "errors", None)
    problems: list[str] = []
    missing: list[str] = []
    for err in errors() if callable(errors) else []:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(the state itself)"
        if err.get("type") == "missing":
            missing.append(loc)
        else:
            problems.append(f"{loc}: {err.get('msg', '')}")
    what = []
    if missing:
        what.append(f"the class now requires {', '.join(missing)}, which the stored state lacks")
    if problems:
        what.append("stored fields no longer fit it (" + "; ".join(problems[:5]) + ")")
    changed = "; ".join(what) or str(exc)
    fix = "give the new field a default (or make it optional)" if missing else "make the class accept the stored value again"
    return (
        f"the stored state no longer fits its class {ref}: {changed}. The class changed since the run "
        f"stored it: {fix}, then resume; nothing was changed in the database"
    )
