"""The container image, without a Docker engine: lint the Dockerfile, check its facts against
the chart and the operator, and run its build steps for real.

What this protects: hadolint finds nothing; the image's user (10001), ports (SMTP 2525,
HTTP 8080), entrypoint (``mailbridge``) and spool directory are what the operator's
rendered pods and the chart expect, and ``mailbridge-operator`` exists as a command;
the final stage installs nothing (no compilers) and runs as non-root. The build
stage's own ``RUN`` commands are executed (offline, from the wheelhouse
scripts/setup fills): the wheel builds, installs into a fresh virtual environment,
both entrypoints answer ``--help``, and the installed bridge starts, answers
``/healthz``, takes a test mail, writes only to its working directory (the spool
volume) and stops cleanly on SIGTERM, leaving the installed files untouched
(a read-only root filesystem would hold).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.request
from typing import Any

import pytest
import yaml
from chart_tools import CHART, ROOT, Helm, one

from mailbridge import config
from mailbridge_operator import model, render
from tests.conftest import require_tool

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
WHEELHOUSE = ROOT / ".tools" / "wheelhouse"
# Absolute paths of the image, mapped into a temporary directory for the build test.
IMAGE_PATHS = ("/opt/mailbridge", "/wheels", "/src", "/var/spool/mailbridge")


@dataclasses.dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.base}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """ENV instructions (``KEY=value`` pairs, continuation lines joined)."""
        result: dict[str, str] = {}
        for args in self.all("ENV"):
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
                result[key] = value.strip('"')
        return result

    def labels(self) -> dict[str, str]:
        result: dict[str, str] = {}
        for args in self.all("LABEL"):
            result.update(re.findall(r'([\w.-]+)="([^"]*)"', args))
        return result


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, ARG defaults substituted."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        logical.append(current + line)
        current = ""
    arguments: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            arguments[name] = default
        elif keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], args)
            base, _, name = image.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip() or None))
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def venv_tool(name: str) -> str:
    """A tool installed by the test extras into this virtual environment."""
    candidate = pathlib.Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else require_tool(name)


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [venv_tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (0, "") == (result.returncode, result.stdout + result.stderr)


def test_the_image_matches_the_operators_pods_and_the_chart(
    stages: list[Stage], helm: Helm
) -> None:
    build, final = stages
    uid = str(render.UID)
    assert f"{uid}:{uid}" == final.last("USER")
    assert '["mailbridge"]' == final.last("ENTRYPOINT")
    assert {"2525", "8080"} == set(final.last("EXPOSE").split())
    assert "SIGTERM" == final.last("STOPSIGNAL")
    assert render.SPOOL_DIR == config.DEFAULT_SPOOL_DIRECTORY == final.last("WORKDIR")
    assert f'["{render.SPOOL_DIR}"]' == final.last("VOLUME")
    assert (2525, render.HTTP_PORT) == (
        config.SmtpSettings.model_fields["port"].default,
        config.HttpSettings.model_fields["port"].default,
    )

    # The operator's bridge pods run the image's entrypoint as the image's user.
    spec = model.parse(
        {
            "routes": [
                {
                    "name": "a",
                    "recipients": ["a@example.com"],
                    "webhook": {"url": "https://hooks.example.com/"},
                }
            ]
        }
    )
    workload = next(m for m in render.render("x", "ns", spec, {}) if m["kind"] == "Deployment")
    pod = workload["spec"]["template"]["spec"]
    assert ["mailbridge"] == pod["containers"][0]["command"]
    assert render.UID == pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"]
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert {"smtp": 2525, "http": 8080} == ports

    # The chart's operator runs the image's other program as the same user.
    deployment = one(helm.template(), "Deployment")
    chart_pod = deployment["spec"]["template"]["spec"]
    assert ["mailbridge-operator"] == chart_pod["containers"][0]["command"]
    assert render.UID == chart_pod["securityContext"]["runAsUser"]
    assert render.UID == chart_pod["containers"][0]["securityContext"]["runAsUser"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"mailbridge", "mailbridge-operator"} <= set(scripts)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"] == model.DEFAULT_IMAGE.rpartition(":")[0]
    assert build.base == final.base  # the venv's interpreter path exists in the final stage


def test_the_final_stage_installs_nothing_and_is_labelled(stages: list[Stage]) -> None:
    build, final = stages
    assert build.name == "build"
    assert re.fullmatch(r"python:3\.(1[1-9])-slim(-\w+)?", final.base), final.base
    commands = " ".join(final.all("RUN"))
    for forbidden in ("apt-get", "apk", "pip ", "gcc", "build-essential", "curl", "wget"):
        assert forbidden not in commands
    assert ["--from=build /opt/mailbridge /opt/mailbridge"] == final.all("COPY")
    assert "/opt/mailbridge/bin:$PATH" == final.env()["PATH"]
    assert "1" == final.env()["PYTHONDONTWRITEBYTECODE"]  # nothing written on a read-only root
    labels = final.labels()
    for key in (
        "title",
        "description",
        "source",
        "url",
        "licenses",
        "version",
        "revision",
        "created",
        "documentation",
    ):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == labels["org.opencontainers.image.licenses"]
    assert f"VERSION={project['version']}" in final.all("ARG")


def test_the_build_context_is_an_allowlist_of_what_copy_needs(stages: list[Stage]) -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert "*" == patterns[0]
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for args in stages[0].all("COPY"):
        *sources, _ = args.split()
        copied.update(source.rstrip("/") for source in sources)
    assert copied == allowed


def _context_files() -> list[pathlib.Path]:
    """The files of the build context: what .dockerignore lets through."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    files = []
    for path in sorted(ROOT.rglob("*")):
        if not path.is_file() or ".git" in path.parts:
            continue
        relative = path.relative_to(ROOT).as_posix()
        included = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            body = pattern[1:] if negate else pattern
            body = body.removeprefix("**/")
            hit = (
                any(fnmatch.fnmatch(part, body.rstrip("/")) for part in relative.split("/"))
                if pattern.startswith(("**/", "!**/"))
                else (
                    fnmatch.fnmatch(relative, body) or relative.startswith(body.rstrip("/") + "/")
                )
            )
            if hit:
                included = negate
        if included:
            files.append(path)
    return files


def _mapped(text: str, root: pathlib.Path) -> str:
    for path in IMAGE_PATHS:
        text = text.replace(path, str(root / path.strip("/").replace("/", "_")))
    return text


def _snapshot(directory: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file()
    }


@pytest.mark.timeout(180)
def test_the_dockerfiles_build_steps_make_a_working_bridge_and_operator(
    stages: list[Stage], tmp_path: pathlib.Path
) -> None:
    assert list(WHEELHOUSE.glob("*.whl")), f"{WHEELHOUSE} is empty: run scripts/setup"
    build, final = stages
    root = tmp_path / "image"
    # WORKDIR /src + the COPY instructions, from the build context.
    source = pathlib.Path(_mapped(build.last("WORKDIR"), root))
    for path in _context_files():
        target = source / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    assert (source / "pyproject.toml").exists() and (source / "service" / "mailbridge").is_dir()

    # The build stage's RUN commands, as written, offline, with this machine's Python 3.11+.
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env |= build.env() | {
        "PATH": f"{shims}:{os.environ['PATH']}",
        "PIP_CONFIG_FILE": os.devnull,  # this machine's pip settings are not the image's
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(WHEELHOUSE),
    }
    for command in build.all("RUN"):
        result = subprocess.run(
            ["sh", "-ec", _mapped(command, root)],
            cwd=source,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
        assert 0 == result.returncode, f"RUN {command}\n{result.stdout}\n{result.stderr}"
    venv = pathlib.Path(_mapped("/opt/mailbridge", root))
    assert not (venv / "bin" / "pip").exists(), "pip stays in the build stage"

    # The final stage's environment, user's working directory and entrypoint.
    workdir = pathlib.Path(_mapped(final.last("WORKDIR"), root))
    workdir.mkdir(parents=True)
    runtime = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    for key, value in final.env().items():
        runtime[key] = _mapped(value, root).replace("$PATH", "/usr/bin:/bin")
    entrypoint = json.loads(final.last("ENTRYPOINT"))
    installed = _snapshot(venv)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=workdir, env=runtime, capture_output=True, text=True, timeout=60, check=False
        )

    help_text = run(*entrypoint, "--help")
    assert 0 == help_text.returncode and "usage: mailbridge" in help_text.stdout
    version = run(*entrypoint, "--version")
    assert f"mailbridge {model.DEFAULT_IMAGE.rpartition(':')[2]}" == version.stdout.strip()
    operator_help = run("mailbridge-operator", "--help")
    assert 0 == operator_help.returncode and "--health-address" in operator_help.stdout

    bridge = subprocess.Popen(
        entrypoint,
        cwd=workdir,
        env=runtime
        | {
            "MAILBRIDGE_SMTP__PORT": "0",
            "MAILBRIDGE_HTTP__PORT": "0",
            "MAILBRIDGE_LOG__FORMAT": "json",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        listening = _wait_for_event(bridge, "listening")
        smtp_port = int(listening["smtp"].rpartition(":")[2])
        http_port = int(listening["http"].rpartition(":")[2])
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5) as reply:
            assert 200 == reply.status
        sent = run(*entrypoint, "send-test", "--port", str(smtp_port), "--timeout", "30")
        assert 0 == sent.returncode, sent.stdout + sent.stderr
        inbox = workdir / "mailbridge-inbox"
        assert 1 == len(list(inbox.glob("*.json"))), "the demo keeps its mail in the workdir"
    finally:
        bridge.send_signal(signal.SIGTERM)
        output, _ = bridge.communicate(timeout=40)
    assert 0 == bridge.returncode, output
    assert '"stopped"' in output
    assert installed == _snapshot(venv), "the bridge wrote into its installation"


def _wait_for_event(process: subprocess.Popen[str], event: str) -> dict[str, Any]:
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                return record  # type: ignore[no-any-return]
    raise AssertionError(f"the bridge exited without {event!r}:\n{''.join(seen)}")
