"""`rollout sim serve|set`: simulated LightRAG and Perplexity servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import DEFAULT_DATA_DIR, DataDir, console, fail, paths

app = typer.Typer(help="Simulated answer backends for demos and tests.", no_args_is_help=True)


class FleetName(StrEnum):
    demo = "demo"
    bench = "bench"


@app.command("serve")
def serve(
    fleet: Annotated[FleetName, typer.Option(help="Which fleet to start.")] = FleetName.demo,
    fleet_file: Annotated[
        Path | None,
        typer.Option(help="Where to write the servers' URLs (default DATA_DIR/runs/fleet.json)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulated randomness.")] = 7,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Start the fleet on 127.0.0.1 (free ports) and serve until Ctrl-C or SIGTERM."""
    from flows.demo.processes import stop_when_orphaned
    from flows.sim.fleet import FLEETS, SIM_API_KEY_ENV, Fleet

    target = fleet_file or paths(data_dir).runs / "fleet.json"

    async def main() -> None:
        running = Fleet(FLEETS[fleet.value](api_key=os.environ.get(SIM_API_KEY_ENV)), seed=seed)
        info = await running.start()
        info.write(target)
        for member in info.members:
            console.print(
                f"{member.spec.name:14} {member.spec.kind.value:11} {member.url}",
                markup=False,
                highlight=False,
            )
        console.print(f"fleet file: {target}", markup=False, highlight=False)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        watchdog = asyncio.create_task(stop_when_orphaned(stop))
        await stop.wait()
        watchdog.cancel()
        await running.stop()
        target.unlink(missing_ok=True)

    asyncio.run(main())


@app.command("set")
def set_profile_cmd(
    backend: Annotated[str, typer.Argument(help="Backend name from the fleet file.")],
    patch: Annotated[str, typer.Argument(help="JSON, e.g. '{\"error_rate\": 0.3}'.")],
    arm: Annotated[str | None, typer.Option(help="Apply only to requests of this arm.")] = None,
    fleet_file: Annotated[Path | None, typer.Option()] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Change a running simulated backend's profile (inject or clear a fault)."""
    from flows.sim.fleet import FleetInfo, set_profile

    target = fleet_file or paths(data_dir).runs / "fleet.json"
    try:
        info = FleetInfo.read(target)
        member = info.member(backend)
        body = json.loads(patch)
    except FileNotFoundError:
        fail(f"no fleet file at {target}: is `rollout sim serve` running?")
    except KeyError as exc:
        fail(str(exc.args[0]))
    except json.JSONDecodeError as exc:
        fail(f"patch is not JSON: {exc}")
    console.print_json(json.dumps(set_profile(member.admin_url, body, arm)))
