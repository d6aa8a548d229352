"""The `replikant` command: a root group whose sub-commands come from entry points.

`common` may not import `agents`, `broker` or `certs` (the dependency direction is one way), so
each package registers its commands under the ``replikant.commands`` entry-point group and the root
group loads them on demand.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import click

from common.errors import ReplikantError
from common.logs import configure_logging


class _EntryPointGroup(click.Group):
    def _entry_points(self) -> dict[str, object]:
        return {ep.name: ep for ep in entry_points(group="replikant.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._entry_points()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is not None:
            return found
        ep = self._entry_points().get(cmd_name)
        if ep is None:
            return None
        command = ep.load()  # type: ignore[attr-defined]
        if not isinstance(command, click.Command):
            raise click.ClickException(f"entry point {cmd_name!r} is not a click command")
        return command


@click.group(cls=_EntryPointGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="REPLIKANT_CONFIG",
    help="Admin CLI config (brokers, agents, admin certificate). Env: REPLIKANT_CONFIG.",
)
@click.option("--log-level", default="info", show_default=True, help="debug, info, warning, error")
@click.option("--log-json/--log-console", default=None, help="Force JSON or console log output.")
@click.pass_context
def cli(
    ctx: click.Context, config_path: Path | None, log_level: str, log_json: bool | None
) -> None:
    """Replikant: disaster recovery for virtual machines on Linux hosts."""
    configure_logging(level=log_level, json=log_json)
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


def main() -> None:
    """Console-script entry point: operator errors print one clear message, never a traceback."""
    try:
        rc = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ReplikantError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if isinstance(rc, int) and rc:
        sys.exit(rc)
