"""The gpu marker's grammar: accepted forms, messages for bad ones, canonical round trip."""

from __future__ import annotations

import re
import textwrap
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gpucloud.core.errors import MarkerError
from pytest_gpucloud.core.request import KEYWORDS, GpuRequest, parse_marker, request_for_item

if TYPE_CHECKING:
    from collections.abc import Mapping


def parse(*args: object, **kwargs: object) -> GpuRequest:
    return parse_marker(args, kwargs)


def error(*args: object, **kwargs: object) -> str:
    with pytest.raises(MarkerError) as info:
        parse_marker(args, kwargs)
    return str(info.value)


R = GpuRequest


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((), {}, R()),
        ((None,), {}, R()),
        (("any",), {}, R()),
        (("ANY",), {}, R()),
        (("any:2",), {}, R(count=2)),
        ((), {"spec": "A100"}, R(types=("A100",), mode="one")),
        (("A100",), {}, R(types=("A100",), mode="one")),
        (("a100-80gb",), {}, R(types=("A100-80GB",), mode="one")),
        ((" A100 ",), {}, R(types=("A100",), mode="one")),
        (("A100-80GB:2",), {}, R(types=("A100-80GB",), mode="one", count=2)),
        (("A100-80GB:2",), {"count": 2}, R(types=("A100-80GB",), mode="one", count=2)),
        (("A100",), {"count": 4}, R(types=("A100",), mode="one", count=4)),
        ((["H100", "A100"],), {}, R(types=("H100", "A100"), mode="ordered")),
        ((("h100", "A100", "H100"),), {}, R(types=("H100", "A100"), mode="ordered")),
        ((["H100"],), {}, R(types=("H100",), mode="one")),
        (({"H100", "A100"},), {}, R(types=("A100", "H100"), mode="cheapest")),
        ((frozenset({"L4", "t4"}),), {}, R(types=("L4", "T4"), mode="cheapest")),
        (({"H100", "h100"},), {}, R(types=("H100",), mode="one")),
        (("24GB+",), {}, R(min_vram_gb=24)),
        (("24gb+:2",), {}, R(min_vram_gb=24, count=2)),
        (("24 GB+",), {}, R(min_vram_gb=24)),
        ((), {"vram": 24}, R(min_vram_gb=24)),
        ((), {"vram": "24GB"}, R(min_vram_gb=24)),
        ((), {"vram": "24GB+"}, R(min_vram_gb=24)),
        (("24GB+",), {"vram": 24}, R(min_vram_gb=24)),
        (("A100",), {"vram": 80}, R(types=("A100",), mode="one", min_vram_gb=80)),
        ((), {"vram": None, "image": None, "timeout": None, "data": None}, R()),
        ((), {"image": "pytorch/pytorch:2.3.0"}, R(image="pytorch/pytorch:2.3.0")),
        ((), {"timeout": 90}, R(timeout_s=90.0)),
        ((), {"timeout": 2.5}, R(timeout_s=2.5)),
        ((), {"timeout": "90s"}, R(timeout_s=90.0)),
        ((), {"timeout": "5m"}, R(timeout_s=300.0)),
        ((), {"timeout": "1h30m"}, R(timeout_s=5400.0)),
        ((), {"timeout": "1h2m3s"}, R(timeout_s=3723.0)),
        ((), {"timeout": "0.5s"}, R(timeout_s=0.5)),
        ((), {"timeout": "168h"}, R(timeout_s=604800.0)),
        ((), {"env": "HF_TOKEN"}, R(env=("HF_TOKEN",))),
        ((), {"env": ["WANDB_KEY", "HF_TOKEN", "HF_TOKEN"]}, R(env=("HF_TOKEN", "WANDB_KEY"))),
        ((), {"env": ()}, R()),
        ((), {"data": {}}, R()),
        (
            (),
            {"data": {"train": "s3://my-bucket/a/b.parquet", "eval": "s3://my-bucket"}},
            R(data=(("eval", "s3://my-bucket"), ("train", "s3://my-bucket/a/b.parquet"))),
        ),
    ],
)
def test_accepted_forms(
    args: tuple[object, ...], kwargs: dict[str, object], expected: GpuRequest
) -> None:
    request = parse_marker(args, kwargs)
    assert request == expected
    assert GpuRequest.parse(request.canonical()) == request


@pytest.mark.parametrize(
    ("args", "kwargs", "culprit", "hint"),
    [
        ((42,), {}, "got int 42", 'spec must be a GPU type such as "A100"'),
        ((4.5,), {}, "got float 4.5", "spec must be"),
        ((True,), {}, "got bool True", "spec must be"),
        ((b"A100",), {}, "got bytes b'A100'", "spec must be"),
        (({"A100": 1},), {}, "got dict", "spec must be"),
        (("",), {}, "got str ''", "a type name has"),
        (("A 100",), {}, "got str 'A 100'", "a type name has"),
        (("24XB+",), {}, "'24XB+'", 'write a memory size like "24GB+"'),
        (("0GB+",), {}, "got int 0", "vram must be"),
        (("24GB",), {}, "'24GB'", 'write "24GB+"'),
        (("A100:0",), {}, "'A100:0'", "the count after ':'"),
        (("A100:17",), {}, "'A100:17'", "the count after ':'"),
        (("A100:x",), {}, "'A100:x'", "the count after ':'"),
        (("A100:2:2",), {}, "'A100:2:2'", "the count after ':'"),
        (([],), {}, "got an empty list", "spec must be"),
        ((set(),), {}, "got an empty set", "spec must be"),
        (([["A100"]],), {}, "got list entry list ['A100']", "spec must be"),
        ((["A100", 3],), {}, "got list entry int 3", "spec must be"),
        ((["H100:2"],), {}, "'H100:2'", "give the count once"),
        ((["any"],), {}, "list entry 'any'", "list entries must be GPU type names"),
        (({"24GB+"},), {}, "set entry '24GB+'", "set entries must be GPU type names"),
        ((("A100", "B 2"),), {}, "tuple entry 'B 2'", "a type name has"),
        (("A100", "H100"), {}, "got 2", "takes one positional argument"),
        (("A100",), {"spec": "H100"}, "spec is given twice", "spec="),
        (("A100",), {"count": 0}, "got int 0", "count must be a whole number from 1 to 16"),
        (("A100",), {"count": -1}, "got int -1", "count must be"),
        (("A100",), {"count": 17}, "got int 17", "count must be"),
        (("A100",), {"count": True}, "got bool True", "count must be"),
        (("A100",), {"count": 2.0}, "got float 2.0", "count must be"),
        (("A100",), {"count": "2"}, "got str '2'", "count must be"),
        (("A100",), {"count": None}, "got NoneType None", "count must be"),
        (("A100:2",), {"count": 3}, "count=3 contradicts 'A100:2'", "give the count once"),
        (("A100:2",), {"count": 1}, "count=1 contradicts 'A100:2'", "give the count once"),
        (("24GB+",), {"vram": 48}, "vram=48 contradicts '24GB+'", "give the vram once"),
        ((), {"vram": "24XB"}, "got str '24XB'", "vram must be a whole number of GB from 1 to"),
        ((), {"vram": 0}, "got int 0", "vram must be"),
        ((), {"vram": False}, "got bool False", "vram must be"),
        ((), {"vram": 24.0}, "got float 24.0", "vram must be"),
        ((), {"image": ""}, "got str ''", "image must be a container image"),
        ((), {"image": "a b"}, "got str 'a b'", "image must be"),
        ((), {"image": "a\nb"}, "got str 'a\\nb'", "image must be"),
        ((), {"image": 3}, "got int 3", "image must be"),
        ((), {"timeout": 0}, "got int 0", "timeout must be seconds (a positive number"),
        ((), {"timeout": -5}, "got int -5", '"1h30m"'),
        ((), {"timeout": True}, "got bool True", "timeout must be"),
        ((), {"timeout": float("nan")}, "got float nan", "timeout must be"),
        ((), {"timeout": float("inf")}, "got float inf", "timeout must be"),
        ((), {"timeout": 10**400}, "got int 1000", "timeout must be"),
        ((), {"timeout": 604801}, "got int 604801", "at most 7 days"),
        ((), {"timeout": "5x"}, "got str '5x'", "timeout must be"),
        ((), {"timeout": "m"}, "got str 'm'", "timeout must be"),
        ((), {"timeout": "0s"}, "got str '0s'", "timeout must be"),
        ((), {"timeout": "5m1h"}, "got str '5m1h'", "timeout must be"),
        ((), {"env": "A-B"}, "got str 'A-B'", "env must be an environment variable name"),
        ((), {"env": "A,B"}, "got str 'A,B'", "not a variable name"),
        ((), {"env": ""}, "got str ''", "env must be"),
        ((), {"env": [1]}, "got list entry int 1", "env must be"),
        ((), {"env": 5}, "got int 5", "env must be"),
        ((), {"env": None}, "got NoneType None", "env must be"),
        ((), {"data": ["s3://b"]}, "got list", "data must be a dict of name to S3 URL"),
        ((), {"data": {"train": "http://x/y"}}, "train: str 'http://x/y'", "s3://bucket/key"),
        ((), {"data": {"train": "s3://"}}, "train: str 's3://'", "s3://bucket/key"),
        ((), {"data": {"train": "s3:/bucket/k"}}, "'s3:/bucket/k'", "s3://bucket/key"),
        ((), {"data": {"train": 5}}, "train: int 5", "s3://bucket/key"),
        ((), {"data": {"my-set": "s3://bkt/k"}}, "got name str 'my-set'", "not an identifier"),
        ((), {"data": {1: "s3://bkt/k"}}, "got name int 1", "not an identifier"),
        (("A100",), {"cuont": 2}, "unknown keyword 'cuont' (did you mean count=?)", "accepted"),
        (("A100",), {"gpus": 2}, "unknown keyword 'gpus'", "accepted: " + ", ".join(KEYWORDS)),
    ],
)
def test_bad_input_names_the_culprit(
    args: tuple[object, ...], kwargs: dict[str, object], culprit: str, hint: str
) -> None:
    message = error(*args, **kwargs)
    assert message.startswith("gpu-cloud: gpu(")
    assert culprit in message
    assert hint in message
    assert "\n" not in message


def test_message_format() -> None:
    assert error(42) == (
        'gpu-cloud: gpu(42): spec must be a GPU type such as "A100", "A100-80GB:2", "24GB+", '
        '"any", a list (try in order) or a set (cheapest); got int 42'
    )
    assert error("A100", count=0, image="x") == (
        "gpu-cloud: gpu('A100', count=0, image='x'): count must be a whole number from 1 to 16;"
        " got int 0"
    )


def test_non_string_keyword_name() -> None:
    with pytest.raises(MarkerError, match=re.escape("gpu(1=2): keyword names must be strings")):
        parse_marker((), {1: 2})  # type: ignore[dict-item]


class Hostile:
    """An object whose every method raises."""

    def __repr__(self) -> str:
        raise RuntimeError("repr")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")

    def __hash__(self) -> int:
        raise RuntimeError("hash")

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        raise RuntimeError("class")


class HostileStr(str):
    def strip(self, chars: str | None = None) -> str:
        raise RuntimeError("strip")

    def __str__(self) -> str:
        raise RuntimeError("str")


class HostileList(list[object]):
    def __iter__(self) -> object:  # type: ignore[override]
        raise RuntimeError("iter")

    def __len__(self) -> int:
        raise RuntimeError("len")


def test_hostile_objects_give_marker_errors() -> None:
    # not parametrized: pytest itself cannot look at these objects
    for value in [Hostile(), [Hostile()], HostileList(["A100"]), {"x": Hostile()}]:
        for key in KEYWORDS:
            _never_crashes((), {key: value})


def test_str_and_list_subclasses_are_read_as_such() -> None:
    assert parse(HostileStr("a100")) == R(types=("A100",), mode="one")
    assert parse(HostileList(["H100", "A100"])).types == ("H100", "A100")
    assert "<Hostile object>" in error(Hostile())


@pytest.mark.parametrize(
    ("request_", "text"),
    [
        (R(), "any"),
        (R(count=2), "any:2"),
        (R(min_vram_gb=24, count=2), "24GB+:2"),
        (R(types=("A100-80GB",), mode="one", count=2), "A100-80GB:2"),
        (R(types=("H100", "A100"), mode="ordered"), "[H100,A100]"),
        (R(types=("A100", "H100"), mode="cheapest", count=4), "{A100,H100}:4"),
        (R(types=("A100",), mode="one", min_vram_gb=80), "A100 vram=80GB"),
        (
            parse(
                ["H100", "A100"],
                count=2,
                image="ghcr.io/org/img:1",
                timeout="1h30m",
                env=["WANDB", "HF_TOKEN"],
                data={"train": "s3://bkt/t", "eval": "s3://bkt/e"},
            ),
            "[H100,A100]:2 image=ghcr.io/org/img:1 timeout=1h30m env=HF_TOKEN,WANDB"
            " data.eval=s3://bkt/e data.train=s3://bkt/t",
        ),
        (R(timeout_s=0.25), "any timeout=0.25s"),
        (R(timeout_s=1e-5), "any timeout=0.00001s"),
        (R(timeout_s=61.0), "any timeout=1m1s"),
    ],
)
def test_canonical(request_: GpuRequest, text: str) -> None:
    assert request_.canonical() == text
    assert GpuRequest.parse(text) == request_


def test_spec_is_the_offer_deciding_part() -> None:
    request = parse("A100", vram=80, count=2, timeout=5, env="X")
    assert request.spec == "A100:2 vram=80GB"


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("", "request ''"),
        ("[A100", "unbalanced []"),
        ("{A100]", "unbalanced {}"),
        ("[A100]x", "unbalanced []"),
        ("[A100]:0", "the count after ':'"),
        ("A100 bogus", "unknown part 'bogus'"),
        ("A100 color=red", "unknown part 'color=red'"),
        ("A100 timeout=soon", "timeout must be"),
        ("[A100,,B]", "list entry ''"),
    ],
)
def test_parse_rejects_bad_strings(text: str, culprit: str) -> None:
    with pytest.raises(MarkerError, match=re.escape(culprit)):
        GpuRequest.parse(text)


def test_pool_key_ignores_per_test_settings() -> None:
    a = parse("A100:2", image="img", timeout=60, env="A", data={"d": "s3://bkt/k"})
    b = parse("a100", count=2, image="img")
    assert a != b
    assert a.pool_key == b.pool_key == R(types=("A100",), mode="one", count=2, image="img")
    assert parse("A100:2", image="other").pool_key != a.pool_key
    assert parse(["A100", "H100"]).pool_key != parse({"A100", "H100"}).pool_key
    assert len({a, b, a.pool_key}) == 2  # b has no per-test settings: b == its pool key


# --- properties -------------------------------------------------------------------------

_RESERVED = re.compile(r"any|[0-9]+GB", re.IGNORECASE)
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True).filter(
    lambda name: _RESERVED.fullmatch(name) is None
)
counts = st.integers(1, 16)
specs = st.one_of(
    st.none(),
    st.just("any"),
    names,
    st.builds(lambda name, count: f"{name}:{count}", names, counts),
    st.builds(lambda vram, count: f"{vram}GB+:{count}", st.integers(1, 100_000), counts),
    st.builds(lambda vram: f"{vram}GB+", st.integers(1, 100_000)),
    st.lists(names, min_size=1, max_size=4),
    st.lists(names, min_size=1, max_size=4).map(tuple),
    st.sets(names, min_size=1, max_size=4),
    st.frozensets(names, min_size=1, max_size=4),
)
identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
urls = st.from_regex(r"s3://[a-z0-9][a-z0-9.-]{1,10}[a-z0-9](/[!-~]{0,20})?", fullmatch=True)
durations = st.builds(
    lambda h, m, s: f"{h}h{m}m{s}s", st.integers(0, 100), st.integers(0, 59), st.integers(1, 59)
)
keyword_values: Mapping[str, st.SearchStrategy[object]] = {
    "count": counts,
    "vram": st.one_of(st.integers(1, 100_000), st.integers(1, 999).map(lambda v: f"{v}GB")),
    "image": st.from_regex(r"[!-~]{1,40}", fullmatch=True),
    "timeout": st.one_of(
        st.integers(1, 604_800),
        st.floats(min_value=1e-9, max_value=604_800, allow_nan=False),
        durations,
    ),
    "env": st.one_of(identifiers, st.lists(identifiers, max_size=4)),
    "data": st.dictionaries(identifiers, urls, max_size=3),
    "spot": st.booleans(),
}
valid_kwargs = st.fixed_dictionaries(
    {}, optional={key: value for key, value in keyword_values.items() if key != "count"}
)


@settings(max_examples=300, deadline=None)
@given(spec=specs, kwargs=valid_kwargs, count=st.one_of(st.none(), counts))
def test_accepted_specs_round_trip(
    spec: object, kwargs: dict[str, object], count: int | None
) -> None:
    if count is not None and not (isinstance(spec, str) and ":" in spec):
        kwargs["count"] = count
    if isinstance(spec, str) and "GB+" in spec:
        kwargs.pop("vram", None)
    request = parse_marker((spec,), kwargs)
    assert GpuRequest.parse(request.canonical()) == request
    assert hash(GpuRequest.parse(request.canonical())) == hash(request)


anything = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=10),
        st.complex_numbers(),
        st.sampled_from(["A100", "24GB+", "any", "1h", "s3://bkt/k", "HF_TOKEN", "A100:2"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.frozensets(st.one_of(st.integers(), st.text(max_size=8)), max_size=4),
        st.sets(st.text(max_size=8), max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3),
    ),
    max_leaves=8,
)


def _never_crashes(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    try:
        request = parse_marker(args, kwargs)
    except MarkerError as exc:
        message = str(exc)
        assert message.startswith("gpu-cloud: gpu(")
        assert "\n" not in message
    else:
        assert GpuRequest.parse(request.canonical()) == request


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_arbitrary_spec_strings_never_crash(text: str) -> None:
    _never_crashes((text,), {})


@settings(max_examples=200, deadline=None)
@given(st.one_of(anything, st.from_type(object)))
def test_arbitrary_spec_objects_never_crash(value: object) -> None:
    _never_crashes((value,), {})


@settings(max_examples=60, deadline=None)
@pytest.mark.parametrize("keyword", KEYWORDS)
@given(value=st.one_of(anything, st.from_type(object), st.text(max_size=30)))
def test_arbitrary_keyword_values_never_crash(keyword: str, value: object) -> None:
    _never_crashes(("A100",) if keyword != "spec" else (), {keyword: value})


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_canonical_strings_never_crash(text: str) -> None:
    try:
        request = GpuRequest.parse(text)
    except MarkerError:
        return
    assert GpuRequest.parse(request.canonical()) == request


# --- markers on items -------------------------------------------------------------------

CONFTEST = """
from pytest_gpucloud.core.errors import MarkerError
from pytest_gpucloud.core.request import request_for_item

def pytest_configure(config):
    config.addinivalue_line("markers", "gpu(spec, **kw): run on a cloud GPU")

def pytest_report_collectionfinish(config, items):
    lines = []
    for item in items:
        try:
            request = request_for_item(item)
        except MarkerError as exc:
            lines.append(f"REQUEST {exc}")
        else:
            lines.append(f"REQUEST {item.nodeid} -> {request and request.canonical()}")
    return lines
"""


def test_request_for_item_finds_closest_marker(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_x=textwrap.dedent(
            """
            import pytest

            pytestmark = pytest.mark.gpu("T4")

            def test_module():
                pass

            @pytest.mark.gpu("H100:2", timeout="5m")
            def test_function():
                pass

            @pytest.mark.gpu(["L4", "A10G"])
            class TestClass:
                def test_class(self):
                    pass

                @pytest.mark.gpu("24GB+")
                def test_method(self):
                    pass

            @pytest.mark.gpu(42)
            def test_bad():
                pass
            """
        ),
        test_plain="def test_plain():\n    pass\n",
    )
    # without this plugin's own hooks: only request_for_item is under test
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:gpucloud")
    result.stdout.fnmatch_lines(
        [
            "REQUEST test_plain.py::test_plain -> None",
            "REQUEST test_x.py::test_module -> T4",
            "REQUEST test_x.py::test_function -> H100:2 timeout=5m",
            "REQUEST test_x.py::TestClass::test_class -> [L4,A10G]",
            "REQUEST test_x.py::TestClass::test_method -> 24GB+",
            "REQUEST gpu-cloud: test_x.py::test_bad: gpu(42): spec must be *; got int 42",
        ],
        consecutive=False,
    )


def test_request_for_item_in_process(pytester: pytest.Pytester) -> None:
    items = pytester.getitems(
        """
        import pytest

        @pytest.mark.gpu("A100", count=2)
        class TestX:
            def test_a(self):
                pass

            @pytest.mark.gpu(count=0)
            def test_b(self):
                pass
        """
    )
    first, second = items
    assert request_for_item(first) == R(types=("A100",), mode="one", count=2)
    with pytest.raises(MarkerError) as info:
        request_for_item(second)
    assert str(info.value) == (
        f"gpu-cloud: {second.nodeid}: gpu(count=0): count must be a whole number from 1 to 16;"
        " got int 0"
    )


def test_items_of_one_parametrized_test_share_one_request(pytester: pytest.Pytester) -> None:
    items = pytester.getitems(
        """
        import pytest

        @pytest.mark.gpu("T4")
        @pytest.mark.parametrize("i", range(3))
        def test_a(i):
            pass

        @pytest.mark.gpu("T4")
        def test_b():
            pass
        """
    )
    known: dict[int, tuple[pytest.Mark, R]] = {}
    a0, a1, a2, b = (request_for_item(item, known) for item in items)
    assert a0 is a1 is a2
    assert b == a0
    assert b is not a0  # another marker, parsed on its own
