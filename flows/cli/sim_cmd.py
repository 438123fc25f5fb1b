"""`rollout sim serve|set`: simulated LightRAG and Perplexity servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flows.cli.common import DEFAULT_DATA_DIR, DataDir, console, fail, paths

if TYPE_CHECKING:
    from flows.sim.fleet import FleetInfo

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
    if target.is_dir() or (target.exists() and not _is_fleet_file(target)):
        # it is overwritten now and deleted on exit: only ever a fleet file
        fail(
            f"--fleet-file {target} exists and is not a fleet file: give a new path (the "
            "servers' URLs are written there and the file is removed when they stop)"
        )

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


class ArmName(StrEnum):
    legacy = "legacy"
    production = "production"


def read_fleet_file(path: Path) -> FleetInfo:
    """The fleet file `rollout sim serve` wrote at `path`, or a one-line refusal."""
    from flows.sim.fleet import FleetInfo

    try:
        return FleetInfo.read(path)
    except FileNotFoundError:
        fail(f"no fleet file at {path}: is `rollout sim serve` running?")
    except (ValueError, OSError) as exc:  # pydantic's ValidationError is a ValueError
        first = str(exc).splitlines()[0]
        fail(f"{path} is not a fleet file `rollout sim serve` wrote ({first})")


def _is_fleet_file(path: Path) -> bool:
    from flows.sim.fleet import FleetInfo

    try:
        FleetInfo.read(path)
    except (ValueError, OSError):
        return False
    return True


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a backend profile can hold (JSON has no {name})")


@app.command("set")
def set_profile_cmd(
    backend: Annotated[str, typer.Argument(help="Backend name from the fleet file.")],
    patch: Annotated[str, typer.Argument(help="JSON, e.g. '{\"error_rate\": 0.3}'.")],
    arm: Annotated[ArmName | None, typer.Option(help="Apply only to requests of this arm.")] = None,
    fleet_file: Annotated[Path | None, typer.Option()] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Change a running simulated backend's profile (inject or clear a fault)."""
    from flows.sim.fleet import set_profile

    target = fleet_file or paths(data_dir).runs / "fleet.json"
    info = read_fleet_file(target)
    try:
        member = info.member(backend)
        body = json.loads(patch, parse_constant=_refuse_constant)
    except KeyError as exc:
        fail(str(exc.args[0]))
    except json.JSONDecodeError as exc:
        fail(f"patch is not JSON: {exc}")
    except ValueError as exc:
        fail(f"patch {patch[:80]!r}: {exc}")
    console.print_json(json.dumps(set_profile(member.admin_url, body, arm and arm.value)))
