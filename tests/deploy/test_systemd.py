"""deploy/systemd: the units pass `systemd-analyze verify`, and every flag their ExecStart
lines give (with the variables of the example environment files) is one p3's parsers take."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from p3.cli import build_parser
from p3.nodes.edge import edge

pytestmark = pytest.mark.timeout(60)
UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
SERVICES = {"p3-coordinator.service": "coordinator", "p3-node@.service": "node",
            "p3-edge@.service": "edge"}  # fmt: skip
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> its values in order (a unit repeats keys: Environment=, EnvironmentFile=)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def environment(settings: dict[str, list[str]], env_file: Path) -> dict[str, str]:
    """The unit's Environment= defaults, overridden by the example file (as systemd does)."""
    env = dict(item.split("=", 1) for line in settings["Environment"] for item in line.split())
    for line in env_file.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def exec_argv(unit: str, instance: str) -> list[str]:
    """ExecStart as systemd runs it: %i the instance, ${X} one word, $X split on spaces."""
    settings = unit_settings(UNITS / unit)
    (line,) = settings["ExecStart"]
    env = environment(settings, UNITS / f"{SERVICES[unit]}.env")
    argv = []
    for word in shlex.split(line.replace("%i", instance)):
        match = VARIABLE.fullmatch(word)
        if match is None:
            argv.append(word)
        elif match.group(1):
            argv.append(env[match.group(1)])
        else:
            argv += env[match.group(2)].split()
    return argv


def parse(argv: list[str]) -> argparse.Namespace:
    """argv after the binary, parsed by p3's own parsers; SystemExit names a refused flag."""
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "edge":
        parser = argparse.ArgumentParser(prog="p3 edge")
        edge.add_arguments(parser)
        return parser.parse_args(rest)
    assert rest == [], f"flags p3 {args.command} does not take: {rest}"
    return args


@pytest.mark.parametrize("unit", sorted(SERVICES))
def test_every_flag_of_a_unit_is_one_p3_takes(unit, capsys):
    argv = exec_argv(unit, "node-0" if "node" in unit else "edge-0")
    assert argv[0].endswith("/p3")
    try:
        args = parse(argv[1:])
    except SystemExit:
        pytest.fail(f"{unit}: p3 refuses {argv[1:]}: {capsys.readouterr().err}")
    assert args.keys == "/etc/p3/keys"
    if "node" in unit:
        assert args.node_id == "node-0" and args.drain_timeout == 30
    if "edge" in unit:
        assert args.edge_id == "edge-0" and args.port == 8000


@pytest.mark.parametrize("unit", sorted(SERVICES))
def test_a_unit_stops_by_draining_within_its_stop_timeout(unit):
    settings = unit_settings(UNITS / unit)
    assert settings["KillSignal"] == ["SIGTERM"] and settings["Restart"] == ["on-failure"]
    assert settings["User"] == ["p3"] and settings["NoNewPrivileges"] == ["yes"]
    drain_s = 30.0  # NodeConfig.drain_timeout_s and EdgeConfig.drain_timeout_s
    if "node" in unit:
        drain_s = parse(exec_argv(unit, "node-0")[1:]).drain_timeout
    assert float(settings["TimeoutStopSec"][0]) >= drain_s


def test_systemd_analyze_verifies_the_units(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze on this machine")
    # verify wants ExecStart's binary to exist: the one this venv installed stands in for
    # /opt/p3/bin/p3, and the example files for /etc/p3/*.env
    p3 = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "p3"
    for unit in (*SERVICES, "p3.target"):
        text = (UNITS / unit).read_text().replace("/opt/p3/bin/p3", str(p3))
        (tmp_path / unit).write_text(text.replace("/etc/p3/", f"{UNITS}/"))
    units = [str(tmp_path / u) for u in (*SERVICES, "p3.target")]
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "p3" not in done.stderr, done.stderr  # verify warns on stderr without failing
