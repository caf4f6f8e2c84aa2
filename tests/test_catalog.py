"""Offer choice: which offers satisfy a request, in which order, and why none does."""

from __future__ import annotations

import dataclasses
import re
from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gpucloud.core.catalog import (
    GpuType,
    Offer,
    check_known,
    explain_infeasible,
    feasible_offers,
)
from pytest_gpucloud.core.errors import MarkerError
from pytest_gpucloud.core.request import GpuRequest, parse_marker

US, EU_W, EU_C = "us-east-1", "eu-west-1", "eu-central-1"

# DESIGN.md's sim catalog, spread over three regions
CATALOG = [
    GpuType("T4", 16, 0.53, True, (US, EU_W)),
    GpuType("L4", 24, 0.70, True, (US, EU_C)),
    GpuType("A10G", 24, 1.01, True, (US,)),
    GpuType("L40S", 48, 1.95, True, (EU_W, US)),
    GpuType("A100-40GB", 40, 1.99, True, (US, EU_W)),
    GpuType("A100-80GB", 80, 2.49, True, (US, EU_C)),
    GpuType("H100", 80, 3.29, True, (US,)),
    GpuType("H200", 141, 3.99, True, (US, EU_W)),
    GpuType("B200", 180, 6.99, True, (US,)),
]
BY_NAME = {gpu.name: gpu for gpu in CATALOG}


def keys(*args: object, regions: tuple[str, ...] = (), **kwargs: object) -> list[tuple[str, str]]:
    request = parse_marker(args, kwargs)
    return [offer.key for offer in feasible_offers(request, CATALOG, regions)]


def first(*args: object, regions: tuple[str, ...] = (), **kwargs: object) -> tuple[str, str]:
    return keys(*args, regions=regions, **kwargs)[0]


@pytest.mark.parametrize(
    ("args", "kwargs", "regions", "expected"),
    [
        ((), {}, (), ("T4", EU_W)),
        (("any",), {}, (EU_C,), ("L4", EU_C)),
        (("A100",), {}, (), ("A100-40GB", EU_W)),
        (("a100",), {"vram": 80}, (), ("A100-80GB", EU_C)),
        (("A100-80GB:2",), {}, ("us-*",), ("A100-80GB", US)),
        (("A100-80GB",), {}, (EU_W,), None),
        (("h100",), {}, (), ("H100", US)),
        ((["H100", "A100"],), {}, (), ("H100", US)),
        ((["H100", "A100"],), {}, ("eu-*",), ("A100-40GB", EU_W)),
        (({"H100", "A100"},), {}, (), ("A100-40GB", EU_W)),
        (({"H200", "L40S"},), {}, (EU_W,), ("L40S", EU_W)),
        (("24GB+",), {}, (), ("L4", EU_C)),
        (("41GB+",), {}, (), ("L40S", EU_W)),
        (("100GB+",), {"count": 2}, (), ("H200", EU_W)),
        ((), {"vram": "48GB"}, ("us-*",), ("L40S", US)),
        (("200GB+",), {}, (), None),
        (("T4",), {}, ("ap-*",), None),
    ],
)
def test_every_form_picks_the_expected_offer(
    args: tuple[object, ...],
    kwargs: dict[str, object],
    regions: tuple[str, ...],
    expected: tuple[str, str] | None,
) -> None:
    offers = keys(*args, regions=regions, **kwargs)
    assert (offers[0] if offers else None) == expected


def test_cheapest_forms_sort_by_total_price_then_name_then_region() -> None:
    assert keys("24GB+", count=2) == [
        ("L4", EU_C),
        ("L4", US),
        ("A10G", US),
        ("L40S", EU_W),
        ("L40S", US),
        ("A100-40GB", EU_W),
        ("A100-40GB", US),
        ("A100-80GB", EU_C),
        ("A100-80GB", US),
        ("H100", US),
        ("H200", EU_W),
        ("H200", US),
        ("B200", US),
    ]
    tied = [GpuType("ZETA", 24, 1.0, True, (US, EU_W)), GpuType("ALPHA", 24, 1.0, True, (US,))]
    assert [o.key for o in feasible_offers(GpuRequest(), tied)] == [
        ("ALPHA", US),
        ("ZETA", EU_W),
        ("ZETA", US),
    ]


def test_ordered_keeps_list_order_cheapest_first_within_an_entry() -> None:
    assert keys(["H100", "A100", "T4"]) == [
        ("H100", US),
        ("A100-40GB", EU_W),
        ("A100-40GB", US),
        ("A100-80GB", EU_C),
        ("A100-80GB", US),
        ("T4", EU_W),
        ("T4", US),
    ]
    # an offer named twice keeps its first place
    assert keys(["A100-80GB", "A100"]) == [
        ("A100-80GB", EU_C),
        ("A100-80GB", US),
        ("A100-40GB", EU_W),
        ("A100-40GB", US),
    ]


def test_ordered_list_never_falls_back_to_an_excluded_region() -> None:
    assert keys(["H100", "B200"], regions=("eu-*",)) == []
    assert keys(["H100", "H200"], regions=("eu-*",)) == [("H200", EU_W)]
    assert keys(["H100", "H200"], regions=(EU_C, "us-*")) == [("H100", US), ("H200", US)]


def test_region_patterns_are_an_allow_list() -> None:
    for regions in [(EU_W,), ("eu-*",), ("EU-*",), ("us-*", "eu-c*"), ("*-1",), ("nowhere",)]:
        offers = feasible_offers(GpuRequest(), CATALOG, regions)
        assert all(any(fnmatchcase(o.region, p.lower()) for p in regions) for o in offers)
    assert {o.region for o in feasible_offers(GpuRequest(), CATALOG, ("eu-*",))} == {EU_W, EU_C}
    assert len(feasible_offers(GpuRequest(), CATALOG)) == sum(len(g.regions) for g in CATALOG)


def test_unavailable_types_are_left_out() -> None:
    catalog = [dataclasses.replace(g, available=g.name != "T4") for g in CATALOG]
    assert feasible_offers(GpuRequest(), catalog)[0].key == ("L4", EU_C)
    assert feasible_offers(GpuRequest(types=("T4",), mode="one"), catalog) == []


def test_family_matching() -> None:
    assert {name for name, _ in keys("A100")} == {"A100-40GB", "A100-80GB"}
    assert {name for name, _ in keys("A100-80gb")} == {"A100-80GB"}
    assert keys("A10") == []  # a prefix is not a family: A10G is its own family
    assert BY_NAME["A100-80GB"].matches("a100")
    assert not BY_NAME["A10G"].matches("A10")


def test_offer_price_is_for_all_gpus() -> None:
    offer = Offer(BY_NAME["H100"], US)
    assert offer.price(4) == pytest.approx(13.16)
    assert offer.key == ("H100", US)


@pytest.mark.parametrize("spec", ["A100", "a100-80gb", "T4", ["H100", "l40s"], {"B200"}, "any"])
def test_known_types_pass(spec: object) -> None:
    check_known(parse_marker((spec,), {}), CATALOG)


def test_unknown_type_lists_close_matches_and_the_catalog() -> None:
    with pytest.raises(MarkerError) as info:
        check_known(parse_marker(("A1000",), {}), CATALOG)
    assert str(info.value) == (
        'gpu-cloud: unknown GPU type "A1000": did you mean A100, A100-40GB, A100-80GB? '
        "(catalog: T4, L4, A10G, L40S, A100-40GB, A100-80GB, H100, H200, B200)"
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("h1000", 'unknown GPU type "H1000": did you mean H100'),
        ("L40", 'unknown GPU type "L40": did you mean L40S, L4'),
        (["H100", "XYZZY"], 'unknown GPU type "XYZZY" (catalog: T4,'),
        ({"Q1", "Q2"}, 'unknown GPU type "Q1"; unknown GPU type "Q2" (catalog:'),
    ],
)
def test_unknown_types(spec: object, expected: str) -> None:
    with pytest.raises(MarkerError, match=re.escape(expected)):
        check_known(parse_marker((spec,), {}), CATALOG)


def test_unknown_type_with_an_empty_catalog() -> None:
    with pytest.raises(MarkerError, match=re.escape('"T4" (catalog: empty)')):
        check_known(parse_marker(("T4",), {}), [])


@pytest.mark.parametrize(
    ("args", "kwargs", "regions", "catalog", "expected"),
    [
        (
            ("H100:2",),
            {},
            ("eu-*",),
            CATALOG,
            "no offer for H100:2 in regions eu-*: H100 is offered in us-east-1",
        ),
        (
            (["H100", "A100"],),
            {},
            ("ap-*", "sa-*"),
            CATALOG,
            "no offer for [H100,A100] in regions ap-*, sa-*: H100 is offered in us-east-1; "
            "A100-40GB is offered in us-east-1, eu-west-1; "
            "A100-80GB is offered in us-east-1, eu-central-1",
        ),
        (
            ("200GB+",),
            {},
            (),
            CATALOG,
            "no offer for 200GB+: at least 200 GB needed, "
            "the largest available is B200 with 180 GB",
        ),
        (
            ("A100",),
            {"vram": 100},
            (),
            CATALOG,
            "no offer for A100 vram=100GB: at least 100 GB needed, the largest available is "
            "A100-80GB with 80 GB",
        ),
        (("H999",), {}, (), CATALOG, 'no offer for H999: "H999" is not in the catalog'),
        (
            ("H100",),
            {},
            (),
            [dataclasses.replace(g, available=False) for g in CATALOG],
            "no offer for H100: H100 is unavailable",
        ),
        (
            ("any",),
            {},
            (),
            [dataclasses.replace(g, available=False) for g in CATALOG],
            "no offer for any: no GPU type is available",
        ),
        ((), {}, (), [], "no offer for any: no GPU type is available"),
        (
            ("100GB+",),
            {},
            ("eu-c*",),
            CATALOG,
            "no offer for 100GB+ in regions eu-c*: H200 is offered in us-east-1, eu-west-1; "
            "B200 is offered in us-east-1",
        ),
        (
            (),
            {},
            ("ap-*",),
            CATALOG,
            "no offer for any in regions ap-*: T4 is offered in us-east-1, eu-west-1; "
            "L4 is offered in us-east-1, eu-central-1; A10G is offered in us-east-1; "
            "L40S is offered in eu-west-1, us-east-1; A100-40GB is offered in us-east-1, "
            "eu-west-1; 4 more types are offered only in other regions",
        ),
    ],
)
def test_explain_infeasible(
    args: tuple[object, ...],
    kwargs: dict[str, object],
    regions: tuple[str, ...],
    catalog: list[GpuType],
    expected: str,
) -> None:
    request = parse_marker(args, kwargs)
    assert feasible_offers(request, catalog, regions) == []
    assert explain_infeasible(request, catalog, regions) == expected


# --- properties -------------------------------------------------------------------------

type_names = st.sampled_from([*BY_NAME, "A100", "a100", "h100", "b200"])
requests = st.builds(
    lambda spec, count, vram: parse_marker((spec,), {"count": count, "vram": vram}),
    st.one_of(
        st.none(),
        type_names,
        st.lists(type_names, min_size=1, max_size=4),
        st.sets(type_names, min_size=1, max_size=4),
    ),
    st.integers(1, 8),
    st.one_of(st.none(), st.sampled_from([16, 24, 40, 48, 80, 100, 141, 180, 200])),
)
region_patterns = st.lists(
    st.sampled_from([US, EU_W, EU_C, "eu-*", "us-*", "*", "ap-*"]), max_size=3
).map(tuple)


@settings(max_examples=200, deadline=None)
@given(request=requests, regions=region_patterns)
def test_every_offer_satisfies_the_request(request: GpuRequest, regions: tuple[str, ...]) -> None:
    offers = feasible_offers(request, CATALOG, regions)
    for offer in offers:
        gpu = offer.gpu
        assert not request.types or any(gpu.matches(name) for name in request.types)
        assert request.min_vram_gb is None or gpu.vram_gb >= request.min_vram_gb
        assert not regions or any(fnmatchcase(offer.region, p) for p in regions)
    assert len({offer.key for offer in offers}) == len(offers)
    if request.mode != "ordered":
        prices = [offer.price(request.count) for offer in offers]
        assert prices == sorted(prices)
    # nothing that satisfies the request is missing
    everything = feasible_offers(GpuRequest(), CATALOG)
    expected = {
        o.key
        for o in everything
        if (not request.types or any(o.gpu.matches(n) for n in request.types))
        and (request.min_vram_gb is None or o.gpu.vram_gb >= request.min_vram_gb)
        and (not regions or any(fnmatchcase(o.region, p) for p in regions))
    }
    assert {offer.key for offer in offers} == expected
    if not offers:
        assert explain_infeasible(request, CATALOG, regions).startswith("no offer for ")
