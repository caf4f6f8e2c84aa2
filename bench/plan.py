"""Planning cost: 10,000 gpu-marked tests with mixed markers over a 20-type catalog.

The tests draw their specs from 200 distinct ones of every form, and their timeout, env,
image and data from small pools.

Planning = parse every marker, then choose the offers of each distinct request, cached by
the request's pool key (what decides the offers). The baseline, measured in the same run,
is the same work without the cache: check_known and feasible_offers for every test.
ratio = planning time / baseline time (below 1: the cache pays). Target: < 100 ms.

Run: ``python bench/plan.py``.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from pytest_gpucloud.core.catalog import GpuType, Offer, check_known, feasible_offers
from pytest_gpucloud.core.request import GpuRequest, parse_marker

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

TESTS = 10_000
DISTINCT_SPECS = 200
TARGET_MS = 100.0
REPEATS = 5
REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-northeast-1")
ALLOWED = ("us-*", "eu-*")

Marker = tuple[tuple[object, ...], dict[str, object]]

# DESIGN.md's sim catalog plus eleven more, to 20 types
CATALOG_SEED = [
    ("T4", 16, 0.53), ("L4", 24, 0.70), ("A10G", 24, 1.01), ("L40S", 48, 1.95),
    ("A100-40GB", 40, 1.99), ("A100-80GB", 80, 2.49), ("H100", 80, 3.29), ("H200", 141, 3.99),
    ("B200", 180, 6.99), ("K80", 12, 0.20), ("P100", 16, 0.45), ("V100", 16, 0.90),
    ("RTX4090", 24, 0.74), ("A6000", 48, 0.99), ("RTX6000-ADA", 48, 1.15), ("A40", 48, 1.28),
    ("L40", 48, 1.49), ("MI250", 128, 2.10), ("H100-NVL", 94, 3.59), ("MI300X", 192, 4.89),
]  # fmt: skip


def make_catalog(rng: random.Random) -> list[GpuType]:
    return [
        GpuType(
            name, vram, price, rng.random() > 0.1, tuple(rng.sample(REGIONS, rng.randint(1, 4)))
        )
        for name, vram, price in CATALOG_SEED
    ]


def make_markers(rng: random.Random, count: int) -> list[Marker]:
    """``count`` tests whose specs come from a pool of distinct specs, as in a real suite."""
    names = [name for name, _, _ in CATALOG_SEED] + ["A100", "h100", "rtx6000-ada"]
    forms: list[Callable[[], object]] = [
        lambda: None,
        lambda: "any",
        lambda: rng.choice(names),
        lambda: f"{rng.choice(names)}:{rng.choice((1, 2, 4, 8))}",
        lambda: rng.sample(names, rng.randint(2, 3)),
        lambda: set(rng.sample(names, rng.randint(2, 3))),
        lambda: f"{rng.choice((16, 24, 40, 48, 80))}GB+",
    ]
    specs = [rng.choice(forms)() for _ in range(DISTINCT_SPECS)]
    markers: list[Marker] = []
    for _ in range(count):
        kwargs: dict[str, object] = {}
        if rng.random() < 0.5:
            kwargs["timeout"] = rng.choice((60, 300, "5m", "1h30m", 12.5))
        if rng.random() < 0.3:
            kwargs["env"] = rng.sample(("HF_TOKEN", "WANDB_API_KEY", "CUDA_LAUNCH_BLOCKING"), 2)
        if rng.random() < 0.2:
            kwargs["image"] = rng.choice(("pytorch/pytorch:2.3.0-cuda12.1", "jax:0.4"))
        if rng.random() < 0.1:
            kwargs["data"] = {"train": "s3://datasets/train.parquet"}
        markers.append(((rng.choice(specs),), kwargs))
    return markers


def plan(
    markers: Sequence[Marker], catalog: Sequence[GpuType]
) -> list[tuple[GpuRequest, Offer | None]]:
    """Each test's request and its best offer; offers are chosen once per pool key."""
    cache: dict[GpuRequest, list[Offer]] = {}
    planned = []
    for args, kwargs in markers:
        request = parse_marker(args, kwargs)
        key = request.pool_key
        offers = cache.get(key)
        if offers is None:
            check_known(key, catalog)
            offers = cache[key] = feasible_offers(key, catalog, ALLOWED)
        planned.append((request, offers[0] if offers else None))
    return planned


def plan_without_cache(
    markers: Sequence[Marker], catalog: Sequence[GpuType]
) -> list[tuple[GpuRequest, Offer | None]]:
    """The baseline: the same choice, made again for every test."""
    planned = []
    for args, kwargs in markers:
        request = parse_marker(args, kwargs)
        check_known(request, catalog)
        offers = feasible_offers(request, catalog, ALLOWED)
        planned.append((request, offers[0] if offers else None))
    return planned


def best_ms(
    run: Callable[[Sequence[Marker], Sequence[GpuType]], object],
    markers: Sequence[Marker],
    catalog: Sequence[GpuType],
) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run(markers, catalog)
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> dict[str, object]:
    rng = random.Random(20260101)
    catalog = make_catalog(rng)
    markers = make_markers(rng, TESTS)
    assert plan(markers, catalog) == plan_without_cache(markers, catalog)
    value = best_ms(plan, markers, catalog)
    baseline = best_ms(plan_without_cache, markers, catalog)
    ratio = value / baseline
    print(
        f"plan: {TESTS:,} tests, {value:.1f} ms (baseline {baseline:.1f} ms, ratio {ratio:.2f},"
        f" target < {TARGET_MS:.0f} ms)"
    )
    return {
        "name": f"plan {TESTS:,} tests, ms (baseline: the same without the per-request cache)",
        "value": round(value, 2),
        "baseline": round(baseline, 2),
        "ratio": round(ratio, 3),
        "target": TARGET_MS,
    }


if __name__ == "__main__":
    main()
