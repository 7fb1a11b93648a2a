"""`pushgw bench --profile`: py-spy raw stacks are billed to the component of their innermost known frame."""

from __future__ import annotations

from pushgw.bench.profile import classify, package_root, table

ROOT = package_root()
SITE = "/venv/lib/python3.11/site-packages/"
LOOP = "run (/usr/lib/python3.11/asyncio/runners.py:118)"


def _line(*frames: str, count: int = 1) -> str:
    return ";".join((LOOP, *frames)) + f" {count}"


def test_a_sample_is_billed_to_its_innermost_project_frame_and_shared_helpers_to_their_caller() -> None:
    lines = [
        # the schema's validation helpers are billed to the decode that called them
        _line(f"Worker.run ({ROOT}gateway/worker.py:118)", f"loads_message ({ROOT}core/schema.py:1369)",
              f"_str ({ROOT}core/schema.py:216)", count=3),
        _line(f"Lanes._deliver ({ROOT}gateway/lanes.py:304)", f"WebPushProvider.send ({ROOT}providers/webpush.py:374)",
              f"encrypt ({ROOT}providers/webpush.py:133)", count=2),
        # a library frame decides when it is the innermost known one
        _line(f"Settler.flush ({ROOT}gateway/settle.py:240)",
              f"Pipeline.execute ({SITE}redis/asyncio/client.py:1500)", count=5),
        _line(count=4),  # nothing of ours on the stack: the event loop itself
    ]
    samples = classify(lines, ROOT)
    assert samples == {"read and decode": 3, "Web Push encryption (RFC 8291)": 2, "Redis client": 5,
                       "event loop (native)": 4}


def test_a_comprehension_is_billed_with_its_function_and_command_packing_to_the_redis_client() -> None:
    lines = [
        # a device key computed in `_plan`'s dict comprehension: planning, not the decode the run loop stands for
        _line(f"Worker.run ({ROOT}gateway/worker.py:127)", f"Worker._plan ({ROOT}gateway/worker.py:268)",
              f"<dictcomp> ({ROOT}gateway/worker.py:269)", f"Device.key ({ROOT}core/schema.py:86)", count=2),
        _line(f"Worker.run ({ROOT}gateway/worker.py:127)", f"<listcomp> ({ROOT}gateway/worker.py:130)", count=1),
        # the hiredis packing of a command issued by the read: the Redis client
        _line(f"StreamQueue.read_new ({ROOT}queue/streams.py:341)",
              f"_HiredisPacking.pack_command ({ROOT}queue/connection.py:62)", count=3),
    ]
    assert classify(lines, ROOT) == {"planning (devices, jobs)": 2, "read and decode": 1, "Redis client": 3}


def test_the_table_splits_the_measured_cpu_per_delivery_by_sample_share() -> None:
    rows = table(classify([_line(f"Lanes.start ({ROOT}gateway/lanes.py:200)", count=1),
                           _line(f"Settler.settle ({ROOT}gateway/settle.py:90)", count=3)], ROOT), 80.0)
    assert [(r["component"], r["us_per_delivery"], r["share"]) for r in rows] == [
        ("lanes and senders", 20.0, 0.25), ("settle and flush", 60.0, 0.75)]
