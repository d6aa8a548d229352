"""`replikant broker ...`: run a broker."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import click

from common.config import BrokerConfig, load_config
from common.heap import settle_heap
from common.logs import configure_logging
from common.stacks import dump_on_sigusr1


@click.group()
def broker() -> None:
    """The recovery-site broker: ingest, journal, apply, recovery points."""


@broker.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="broker.toml",
)
@click.option("--log-level", default=None, help="Override the root command's log level.")
@click.option(
    "--uvloop/--no-uvloop",
    "use_uvloop",
    default=True,
    show_default=True,
    help="Run on uvloop (the default) or on the standard library's event loop.",
)
def run(config_path: Path, log_level: str | None, use_uvloop: bool) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully."""
    # Copies of disks are as secret as the disks: nothing the broker creates is for others.
    os.umask(0o077)
    dump_on_sigusr1()
    if log_level is not None:
        configure_logging(level=log_level)
    config = load_config(config_path, BrokerConfig)
    from broker.service import BrokerService, validate  # noqa: PLC0415 - keep `--help` fast

    validate(config, str(config_path))

    async def main() -> None:
        await BrokerService(config).run()

    settle_heap()
    if not use_uvloop:
        asyncio.run(main())
        return
    import uvloop  # noqa: PLC0415 - the event loop is chosen at the entry point only

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
