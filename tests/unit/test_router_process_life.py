"""A router's life in its host process: exit without `shutdown()`, pre-fork servers, two
routers side by side. Each scenario runs in a fresh interpreter, as a host would."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]

ROUTER = """
import asyncio, os, sys
import httpx
from pathlib import Path
from router import BackendConfig, BackendKind, ProductionFeatureFlags
from router import ProductionIntelligentQueryRouter

DATA = Path(sys.argv[1])
BACKENDS = [BackendConfig(name="lr", kind=BackendKind.LIGHTRAG, base_url="http://lr.test")]

def build():
    return ProductionIntelligentQueryRouter(
        backends=BACKENDS,
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"response": "a"})),
        health_checks=False,
        flags=ProductionFeatureFlags(enabled=True, data_dir=DATA),
        control_store=None,
    )

async def serve(router, n):
    for i in range(n):
        await router.route_query("What is glycine?", {"user_id": f"u{i}"})
"""


def run(tmp_path: Path, body: str) -> str:
    script = tmp_path / "host.py"
    script.write_text(ROUTER + textwrap.dedent(body))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def rows_by_instance(tmp_path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for segment in (tmp_path / "data" / "segments").glob("*/requests-*.parquet"):
        instance = segment.parent.name
        counts[instance] = counts.get(instance, 0) + pq.read_metadata(segment).num_rows
    return counts


def test_rows_of_a_router_never_shut_down_land_at_exit(tmp_path: Path) -> None:
    """The legacy router never needed `shutdown()`: after the swap, the rows of the last
    second before exit were lost without a word."""
    output = run(tmp_path, "router = build()\nasyncio.run(serve(router, 25))\n")
    assert sum(rows_by_instance(tmp_path).values()) == 25
    assert "was never closed: closed at interpreter exit" in output


def test_forked_workers_each_write_their_rows_under_their_own_id(tmp_path: Path) -> None:
    """gunicorn --preload builds the router before forking: the workers had no flusher
    thread (rows piled up, then were dropped) and all shared the parent's id."""
    run(
        tmp_path,
        """
        router = build()
        children = []
        for n in (7, 11):
            pid = os.fork()
            if pid == 0:
                asyncio.run(serve(router, n))
                sys.exit(0)  # a normal exit, as a worker's: no shutdown() either
            children.append(pid)
        assert all(os.waitpid(pid, 0)[1] == 0 for pid in children)
        asyncio.run(router.shutdown())
        """,
    )
    counts = rows_by_instance(tmp_path)
    assert sorted(counts.values()) == [7, 11] and len(counts) == 2
    # and their request ids differ: a shared id prefix failed the gate's unique-id check
    ids = [
        request_id
        for segment in (tmp_path / "data" / "segments").glob("*/requests-*.parquet")
        for request_id in pq.read_table(segment, columns=["request_id"])["request_id"].to_pylist()
    ]
    assert len(set(ids)) == 18


def test_two_routers_in_one_process_get_their_own_ids(tmp_path: Path) -> None:
    output = run(
        tmp_path,
        """
        async def main():
            first, second = build(), build()
            await serve(first, 3)
            await serve(second, 5)
            print("ids", first.instance_id, second.instance_id)
            await second.shutdown()
            third = build()  # the second's id is free again
            print("third", third.instance_id == second.instance_id)
            await third.shutdown()
            await first.shutdown()
        asyncio.run(main())
        """,
    )
    first, second = output.split("ids ", 1)[1].split()[:2]
    assert second == f"{first}-2"
    assert "third True" in output
    assert rows_by_instance(tmp_path) == {first: 3, second: 5}


def test_a_stopped_loop_keeps_no_router_work_and_probes_keep_their_interval(
    tmp_path: Path,
) -> None:
    """A loop that was stopped but not closed (run_until_complete, some test runners)
    ran the router's old control loop again after the router moved on and shut down:
    heartbeats for a stopped instance. And each new loop probed every backend at once,
    whatever the interval: one loop per request probed on every request."""
    output = run(
        tmp_path,
        """
        from router import FileControlStore, RouterConfig
        from router.production_config import HealthCheckSettings, ProductionLoadBalancingConfig
        probes = []

        def answer(request):
            if request.url.path == "/health":
                probes.append(request.url.host)
            return httpx.Response(200, json={"response": "a"})

        FileControlStore(DATA / "control").publish(RouterConfig(version=1))
        router = ProductionIntelligentQueryRouter(
            backends=BACKENDS,
            transport=httpx.MockTransport(answer),
            health_checks=True,
            flags=ProductionFeatureFlags(
                enabled=True, data_dir=DATA, instance_id="loops", control_poll_s=0.05
            ),
            production_config=ProductionLoadBalancingConfig(
                backends=tuple(BACKENDS), health_check=HealthCheckSettings(interval_s=60)
            ),
        )
        first = asyncio.new_event_loop()
        first.run_until_complete(serve(router, 2))  # stopped, not closed
        for _ in range(3):
            asyncio.run(serve(router, 2))
        asyncio.run(router.shutdown())
        ack = DATA / "control" / "acks" / "loops.json"
        stamp = ack.stat().st_mtime_ns
        first.run_until_complete(asyncio.sleep(0.3))
        alive = [t.get_name() for t in asyncio.all_tasks(first) if not t.done()]
        print("alive", alive, "rewritten", ack.stat().st_mtime_ns != stamp, "probes", len(probes))
        """,
    )
    assert "alive [] rewritten False probes 1" in output, output
