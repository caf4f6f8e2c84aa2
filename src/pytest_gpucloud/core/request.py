"""The ``gpu`` marker's grammar and :class:`GpuRequest`, the one request every module uses.

::

    @pytest.mark.gpu(spec=None, *, count=1, vram=None, image=None, timeout=None, env=(), data=None,
                     spot=False)

    spec: "A100"            a type; case-insensitive; a family ("A100") matches its variants
          "A100-80GB:2"     type and count
          ["H100", "A100"]  try in this order
          {"H100", "A100"}  the cheapest of these
          "24GB+"           any type with at least 24 GB, the cheapest
          "any" / None      the cheapest available

A request also has a canonical string (:meth:`GpuRequest.canonical`) that
:meth:`GpuRequest.parse` reads back, e.g.
``[H100,A100]:2 vram=80GB image=repo/img:tag timeout=1h30m env=HF_TOKEN data.train=s3://b/k``.
``spot=True`` (canonical ``spot``) asks for interruptible capacity where the provider has it.
"""

from __future__ import annotations

import difflib
import functools
import re
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Literal, cast

from pytest_gpucloud.core.environment import env_name_fault
from pytest_gpucloud.core.errors import MarkerError
from pytest_gpucloud.core.units import hms_seconds

if TYPE_CHECKING:
    import pytest

Mode = Literal["one", "ordered", "cheapest", "any"]

MAX_COUNT = 16
MAX_VRAM_GB = 100_000
MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_IMAGE_LEN = 512
KEYWORDS = ("spec", "count", "vram", "image", "timeout", "env", "data", "spot")

SPEC_FORMS = (
    'a GPU type such as "A100", "A100-80GB:2", "24GB+", "any", '
    "a list (try in order) or a set (cheapest)"
)
COUNT_FORMS = f"a whole number from 1 to {MAX_COUNT}"
VRAM_FORMS = f'a whole number of GB from 1 to {MAX_VRAM_GB} such as 24 or "24GB"'
IMAGE_FORMS = (
    'a container image such as "pytorch/pytorch:2.3.0-cuda12.1" (no whitespace, no leading "-")'
)
TIMEOUT_FORMS = (
    'seconds (a positive number, at most 7 days) or a duration such as "90s", "5m", "1h30m"'
)
ENV_FORMS = 'an environment variable name such as "HF_TOKEN", or a list of names'
DATA_FORMS = 'a dict of name to S3 URL such as {"train": "s3://bucket/key"}'

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_SIZE = re.compile(r"([0-9]{1,9})\s*GB", re.IGNORECASE)
_COUNT = re.compile(r"[0-9]{1,9}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_S3 = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](?:/\S*)?")

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60


@dataclass(frozen=True)
class GpuRequest:
    """What one test asks for. Hashable; equal requests are the same request.

    ``types`` are upper-cased type or family names: one for ``mode="one"``, several in the
    user's order for ``"ordered"``, sorted for ``"cheapest"``, none for ``"any"``.
    ``min_vram_gb`` filters any mode. ``env`` is sorted, ``data`` sorted by name.
    """

    types: tuple[str, ...] = ()
    mode: Mode = "any"
    min_vram_gb: int | None = None
    count: int = 1
    image: str | None = None
    timeout_s: float | None = None
    env: tuple[str, ...] = ()
    data: tuple[tuple[str, str], ...] = ()
    spot: bool = False

    @property
    def pool_key(self) -> GpuRequest:
        """The request without its per-test settings: equal keys can share instances."""
        if self.timeout_s is None and not self.env and not self.data:
            return self
        # Positional: a planner asks this of every test, and keywords cost a third more.
        return GpuRequest(
            self.types, self.mode, self.min_vram_gb, self.count, self.image, None, (), (), self.spot
        )

    @property
    def spec(self) -> str:
        """The part that decides the offer, e.g. ``A100:2``, ``{A100,H100}``, ``24GB+``."""
        if self.mode == "any":
            text = "any" if self.min_vram_gb is None else f"{self.min_vram_gb}GB+"
        elif self.mode == "ordered":
            text = "[" + ",".join(self.types) + "]"
        elif self.mode == "cheapest":
            text = "{" + ",".join(self.types) + "}"
        else:
            text = self.types[0]
        if self.count != 1:
            text += f":{self.count}"
        if self.types and self.min_vram_gb is not None:
            text += f" vram={self.min_vram_gb}GB"
        return text

    def canonical(self) -> str:
        """The whole request as one line that :meth:`parse` reads back to an equal request."""
        parts = [self.spec]
        if self.image is not None:
            parts.append(f"image={self.image}")
        if self.timeout_s is not None:
            parts.append(f"timeout={_duration(self.timeout_s)}")
        if self.env:
            parts.append("env=" + ",".join(self.env))
        parts.extend(f"data.{name}={url}" for name, url in self.data)
        if self.spot:
            parts.append("spot")
        return " ".join(parts)

    @classmethod
    def parse(cls, text: str) -> GpuRequest:
        """Read a :meth:`canonical` string back; raises :class:`MarkerError`."""
        try:
            return _parse(*_canonical_args(text))
        except _Bad as bad:
            raise MarkerError(f"request {_show(text)}: {bad}") from None


# Every item of a session in run order, with its request (None: a local test).
Tests = Sequence[tuple[str, "GpuRequest | None"]]


def parse_marker(args: Sequence[object], kwargs: Mapping[str, object]) -> GpuRequest:
    """The request of ``gpu(*args, **kwargs)``; anything else raises :class:`MarkerError`."""
    try:
        return _parse(args, kwargs)
    except _Bad as bad:
        raise MarkerError(f"{_call(args, kwargs)}: {bad}") from None


def request_for_item(
    item: pytest.Item, known: dict[int, tuple[pytest.Mark, GpuRequest]] | None = None
) -> GpuRequest | None:
    """The request of the closest ``gpu`` marker (function, class, then module), if any.

    ``known``: requests already parsed, by marker; items of one parametrized test carry the
    same marker, and then share one request (20,000 items, one object).
    """
    marker = item.get_closest_marker("gpu")
    if marker is None:
        return None
    if known is not None and id(marker) in known:
        return known[id(marker)][1]
    try:
        request = parse_marker(marker.args, marker.kwargs)
    except MarkerError as exc:
        raise MarkerError(f"{item.nodeid}: {exc.args[0]}") from None
    if known is not None:
        known[id(marker)] = (marker, request)  # the marker kept alive: its id stays unique
    return request


class _Bad(Exception):
    """A bad argument; the message is completed with the call by the caller."""


def _parse(args: Sequence[object], kwargs: Mapping[str, object]) -> GpuRequest:
    if len(args) > 1:
        raise _Bad(
            f"takes one positional argument, the spec; got {len(args)}"
            " (pass the others by keyword: " + ", ".join(f"{k}=" for k in KEYWORDS[1:]) + ")"
        )
    if args and "spec" in kwargs:
        raise _Bad("spec is given twice, positionally and as spec=")
    spec = args[0] if args else kwargs.get("spec")
    types, mode, vram, count = _spec(spec)
    image: str | None = None
    timeout: float | None = None
    env: tuple[str, ...] = ()
    data: tuple[tuple[str, str], ...] = ()
    spot = False
    for key, value in kwargs.items():
        name = _keyword(key)
        if name == "count":
            count = _agree(name, _count(value), count, spec)
        elif name == "vram" and value is not None:
            vram = _agree(name, _vram(value), vram, spec)
        elif name == "image":
            image = _image(value)
        elif name == "timeout":
            timeout = _timeout(value)
        elif name == "env":
            env = _env(value)
        elif name == "data":
            data = _data(value)
        elif name == "spot":
            spot = _spot(value)
    count = 1 if count is None else count
    return GpuRequest(types, mode, vram, count, image, timeout, env, data, spot)


def _spot(value: object) -> bool:
    if value is not True and value is not False:  # no isinstance: it asks the object
        raise _Bad(f"spot must be True or False; got {_got(value)}")
    return value is True


def _keyword(key: object) -> str:
    name = _str(key)
    if name is None:
        raise _Bad(f"keyword names must be strings; got {_got(key)}")
    if name not in KEYWORDS:
        close = difflib.get_close_matches(name, KEYWORDS, n=1)
        hint = f" (did you mean {close[0]}=?)" if close else ""
        raise _Bad(f"unknown keyword {_show(name)}{hint}; accepted: {', '.join(KEYWORDS)}")
    return name


def _agree(name: str, given: int, in_spec: int | None, spec: object) -> int:
    if in_spec is not None and given != in_spec:
        raise _Bad(
            f"{name}={given} contradicts {_show(spec)}, which says {in_spec}; give the {name} once"
        )
    return given


def _spec(spec: object) -> tuple[tuple[str, ...], Mode, int | None, int | None]:
    """(types, mode, min_vram_gb, count) of a spec; vram and count are None when not given."""
    if spec is None:
        return (), "any", None, None
    text = _str(spec)
    if text is not None:
        return _spec_text(text)
    kind = type(spec).__name__
    names = [_type_name(entry, kind) for entry in _entries(spec, "spec", SPEC_FORMS)]
    if not names:
        raise _Bad(f"spec must be {SPEC_FORMS}; got an empty {kind}")
    mode: Mode = "cheapest" if issubclass(type(spec), (set, frozenset)) else "ordered"
    names = sorted(set(names)) if mode == "cheapest" else list(dict.fromkeys(names))
    return tuple(names), mode if len(names) > 1 else "one", None, None


@functools.lru_cache(maxsize=1024)  # a suite repeats the same few specs
def _spec_text(text: str) -> tuple[tuple[str, ...], Mode, int | None, int | None]:
    base, colon, digits = text.partition(":")
    base = base.strip()
    count = _spec_count(digits.strip(), text) if colon else None
    if base.lower() == "any":
        return (), "any", None, count
    if base.endswith("+"):
        size = _SIZE.fullmatch(base[:-1].rstrip())
        if size is None:
            raise _bad_spec(text, 'write a memory size like "24GB+"')
        return (), "any", _vram(int(size.group(1))), count
    if _SIZE.fullmatch(base):
        raise _bad_spec(text, f'for at least that much memory write "{base}+"')
    if _NAME.fullmatch(base) is None:
        raise _bad_spec(text, "a type name has letters, digits, '.', '_', '-', at most 32")
    return (base.upper(),), "one", None, count


@functools.lru_cache(maxsize=1024)
def _type_name(text: str, kind: str) -> str:
    name = text.strip()
    if ":" in name:
        raise _bad_spec(text, "give the count once, as count=", kind)
    if name.endswith("+") or name.lower() == "any" or _SIZE.fullmatch(name):
        raise _bad_spec(text, f"{kind} entries must be GPU type names", kind)
    if _NAME.fullmatch(name) is None:
        raise _bad_spec(text, "a type name has letters, digits, '.', '_', '-', at most 32", kind)
    return name.upper()


def _bad_spec(text: str, hint: str, kind: str = "") -> _Bad:
    what = f"{kind} entry" if kind else "str"
    return _Bad(f"spec must be {SPEC_FORMS}; got {what} {_show(text)} ({hint})")


def _spec_count(digits: str, text: str) -> int:
    if _COUNT.fullmatch(digits) is None or not 1 <= int(digits) <= MAX_COUNT:
        raise _bad_spec(text, f"the count after ':' must be {COUNT_FORMS}")
    return int(digits)


def _count(value: object) -> int:
    number = _int(value)
    if number is None or not 1 <= number <= MAX_COUNT:
        raise _Bad(f"count must be {COUNT_FORMS}; got {_got(value)}")
    return number


def _vram(value: object) -> int:
    number = _int(value)
    text = _str(value)
    if text is not None:
        size = _SIZE.fullmatch(text.strip().removesuffix("+").rstrip())
        number = int(size.group(1)) if size else None
    if number is None or not 1 <= number <= MAX_VRAM_GB:
        raise _Bad(f"vram must be {VRAM_FORMS}; got {_got(value)}")
    return number


def _image(value: object) -> str | None:
    if value is None:
        return None
    text = _str(value)
    if (
        not text
        or len(text) > MAX_IMAGE_LEN
        or not text.isprintable()
        or " " in text
        or text.startswith("-")  # it would reach `docker pull` as an option
    ):
        raise _Bad(f"image must be {IMAGE_FORMS}; got {_got(value)}")
    return text


def _timeout(value: object) -> float | None:
    if value is None:
        return None
    seconds: float | None = _int(value)
    if seconds is None and issubclass(type(value), float):
        seconds = float.__float__(cast(float, value))
    text = _str(value)
    if text is not None:
        seconds = hms_seconds(text)
    # compared before float(): a huge int does not fit a float; NaN and inf fail too
    if seconds is None or not 0 < seconds <= MAX_TIMEOUT_S:
        raise _Bad(f"timeout must be {TIMEOUT_FORMS}; got {_got(value)}")
    return float(seconds)


def _env(value: object) -> tuple[str, ...]:
    text = _str(value)
    names = [text] if text is not None else _entries(value, "env", ENV_FORMS)
    for name in names:
        fault = env_name_fault(name)
        if fault == "not a name":
            raise _Bad(f"env must be {ENV_FORMS}; got {_got(name)} (not a variable name)")
        if fault == "secret":
            raise _Bad(f"env may not name {name}: it never travels to instances; remove it")
    return tuple(sorted(set(names)))


def _entries(value: object, name: str, forms: str) -> list[str]:
    kind = type(value)
    items: Iterable[object]
    if issubclass(kind, list):
        items = list.__iter__(cast("list[object]", value))
    elif issubclass(kind, tuple):
        items = tuple.__iter__(cast("tuple[object, ...]", value))
    elif issubclass(kind, set):
        items = set.__iter__(cast("set[object]", value))
    elif issubclass(kind, frozenset):
        items = frozenset.__iter__(cast("frozenset[object]", value))
    else:
        raise _Bad(f"{name} must be {forms}; got {_got(value)}")
    texts = []
    for item in items:
        text = _str(item)
        if text is None:
            raise _Bad(f"{name} must be {forms}; got {kind.__name__} entry {_got(item)}")
        texts.append(text)
    return texts


def _data(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not issubclass(type(value), dict):
        raise _Bad(f"data must be {DATA_FORMS}; got {_got(value)}")
    pairs = {}
    for key, url in dict.items(cast("dict[object, object]", value)):
        name, text = _str(key), _str(url)
        if name is None or _IDENT.fullmatch(name) is None:
            raise _Bad(f"data must be {DATA_FORMS}; got name {_got(key)} (not an identifier)")
        if text is None or _S3.fullmatch(text) is None:
            raise _Bad(
                f"data must be {DATA_FORMS}; got {name}: {_got(url)} (not an s3://bucket/key URL)"
            )
        pairs[name] = text
    return tuple(sorted(pairs.items()))


def _canonical_args(text: str) -> tuple[tuple[object], dict[str, object]]:
    """Marker arguments equivalent to a canonical string."""
    head, *rest = text.split() or [""]
    spec: object = head
    kwargs: dict[str, object] = {}
    closer = {"[": "]", "{": "}"}.get(head[:1])
    if closer is not None:
        inner, closed, tail = head[1:].partition(closer)
        if not closed or tail[:1] not in ("", ":"):
            raise _Bad(f"unbalanced {head[:1]}{closer} in {_show(head)}")
        names = inner.split(",")
        spec = names if closer == "]" else set(names)
        if tail:
            kwargs["count"] = _spec_count(tail[1:], head)
    data: dict[str, str] = {}
    for token in rest:
        key, equals, value = token.partition("=")
        if key.startswith("data.") and equals:
            data[key[5:]] = value
        elif key in ("vram", "image", "timeout") and equals:
            kwargs[key] = value
        elif key == "env" and equals:
            kwargs[key] = value.split(",")
        elif token == "spot":
            kwargs["spot"] = True
        else:
            raise _Bad(
                f"unknown part {_show(token)}; expected vram=, image=, timeout=, env=, "
                "data.NAME=, spot"
            )
    if data:
        kwargs["data"] = data
    return (spec,), kwargs


def _duration(seconds: float) -> str:
    if not seconds.is_integer():
        # fixed-point digits of the shortest repr: parses back to the same float
        return format(Decimal(repr(seconds)), "f") + "s"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)


# The readers below look at the type and use the builtin's own methods, never the object's:
# a marker argument can be any object, and its methods may raise.
def _str(value: object) -> str | None:
    if type(value) is str:
        return value
    return str.__str__(cast(str, value)) if issubclass(type(value), str) else None


def _int(value: object) -> int | None:
    kind = type(value)
    if issubclass(kind, int) and not issubclass(kind, bool):
        return int.__int__(cast(int, value))
    return None


def _show(value: object) -> str:
    try:
        return _repr.repr(value)
    except Exception:
        return f"<{type(value).__name__} object>"


def _got(value: object) -> str:
    return f"{type(value).__name__} {_show(value)}"


def _call(args: Sequence[object], kwargs: Mapping[str, object]) -> str:
    shown = [_show(arg) for arg in args]
    shown += [f"{_str(key) or _show(key)}={_show(value)}" for key, value in kwargs.items()]
    return f"gpu({', '.join(shown)})"
