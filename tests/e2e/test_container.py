"""The container image for real: `scripts/container` builds the Containerfile with podman and
starts it on loopback, as the README's Container section says; the dashscope SDK embeds through
it, a managed key and its ledger on the /data volume outlive the container, SIGTERM drains, and
the compose file's settings keep the accounts in a real PostgreSQL.

Needs root (rootful podman; `scripts/container` installs it with apt). Without root the test is
skipped, except in CI, where it fails.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.accounts.conftest import new_pg_database, pg_server  # noqa: F401 (a fixture)
from tests.e2e.conftest import EMBED_PATH, free_port
from tests.media_util import image_bytes

pytestmark = [pytest.mark.slow, pytest.mark.network]
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "container"
GOLDEN = ROOT / "tests" / "data" / "golden_offline.json"
MODEL = "tongyi-embedding-vision-plus"


def container(*args: str, timeout: float = 120, check: bool = True) -> str:
    """``scripts/container ARGS``; its stdout."""
    out = subprocess.run(
        [str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert out.returncode == 0, f"scripts/container {shlex.join(args)}:\n{out.stderr[-4000:]}"
    return out.stdout


def podman(*args: str, **kw) -> str:
    return container("podman", *args, **kw)


def readme_commands() -> list[list[str]]:
    """The README's scripts/container block, one argv per command (comments dropped)."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    block = next((b for b in blocks if "scripts/container build" in b), None)
    assert block, "the README has no scripts/container block"
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def readme_command(verb: str) -> list[str]:
    """The README's ``scripts/container VERB ...`` line (VERB: build, run, podman-exec...)."""
    for argv in readme_commands():
        if argv[:1] == ["scripts/container"] and "-".join(argv[1:3]).startswith(verb):
            return argv[1:]
    raise AssertionError(f"the README's container block has no 'scripts/container {verb}'")


def as_in_readme(argv: list[str], name: str, volume: str) -> list[str]:
    """The README's command for this test's own container name and volume."""
    out, prev = [], ""
    for word in argv:
        if word == "mmembed" and prev in ("--name", "exec", "stop", "start", "rm", "logs"):
            word = name
        elif word.startswith("mmembed-data:"):
            word = volume + word.removeprefix("mmembed-data")
        out.append(word)
        prev = word
    return out


def report(request: pytest.FixtureRequest, line: str) -> None:
    """A timing line on the terminal, also when the test passes."""
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        plugins.get_plugin("terminalreporter").write_line(f"container: {line}")


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> str:
    """``scripts/container build`` as the README says (tools, base image, then the image)."""
    if os.geteuid() != 0:
        reason = "building and running the image needs root (rootful podman)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + "; CI runs as root and must run this test")
        pytest.skip(reason + ": run `scripts/container test` as root")
    argv = readme_command("build")
    started = time.monotonic()
    out = subprocess.run(
        [str(SCRIPT), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=40 * 60,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = re.findall(r"scripts/container: (\w+): (\d+) s", out.stderr)
    report(request, f"built in {time.monotonic() - started:.0f} s ({dict(steps)})")
    return os.environ.get("MMEMBED_IMAGE", "localhost/mmembed:latest")


class Running:
    """A container started by this test, on loopback with host networking."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"

    def logs(self) -> str:
        out = subprocess.run(
            [str(SCRIPT), "podman", "logs", self.name],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
        )
        return out.stdout

    def wait_healthy(self, timeout: float = 180) -> float:
        """Seconds from now until /health answers 200."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            state = podman("inspect", "--format", "{{.State.Status}}", self.name).strip()
            assert state == "running", f"container {state}:\n{self.logs()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not healthy after {timeout} s:\n{self.logs()}")

    def mmembed(self, *args: str) -> str:
        return podman("exec", self.name, "mmembed", *args)

    def wait_key(self, key: str, timeout: float = 10) -> None:
        """Until the server accepts a key the CLI just made (it reloads the key list every
        ``accounts_poll_s``, 0.25 s: a request sent at once may still get 401)."""
        deadline = time.monotonic() + timeout
        while True:
            auth = {"Authorization": f"Bearer {key}"}
            got = httpx.get(self.url + "/v1/models", headers=auth, timeout=10)
            if got.status_code == 200:
                return
            assert got.status_code == 401 and time.monotonic() < deadline, got.text
            time.sleep(0.1)


@pytest.fixture
def names() -> Iterator[tuple[str, str]]:
    """A container name and a volume name of this test's own; removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    name, volume = f"mmembed-test-{tag}", f"mmembed-test-{tag}"
    yield name, volume
    podman("rm", "-f", "-v", name, check=False)
    podman("volume", "rm", "-f", volume, check=False)


def start(argv: list[str], port: int, *env: str) -> None:
    """``scripts/container run ...`` with this test's port and extra settings, detached."""
    assert argv[0] == "run" and "-d" in argv, argv
    extra = [w for kv in (f"MMEMBED_PORT={port}", *env) for w in ("-e", kv)]
    container(*argv[:1], *extra, *argv[1:])


def golden_inputs() -> tuple[list[dict], np.ndarray]:
    """The golden-vector texts and photo (tests/unit/test_models_golden.py) and the cosines
    between their native vectors. The served default width (1152) is an isometric lift of the
    native 384, so the image's vectors must have the same cosines: it serves the offline model."""
    from skimage import data

    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    png = image_bytes(data.coffee(), "PNG")
    items = [{"text": t} for t in golden["texts"].values()]
    items.append({"image": "data:image/png;base64," + base64.b64encode(png).decode()})
    group = golden["vectors"]["384"]
    native = np.array([*(group[n] for n in golden["texts"]), group["image_coffee"]])
    return items, gram(native)


def gram(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit @ unit.T


def sdk_embed(server: Running, key: str, items: list[dict]):
    import dashscope

    resp = dashscope.MultiModalEmbedding.call(
        model=MODEL, input=items, api_key=key, base_address=server.url + "/api/v1"
    )
    assert resp.status_code == HTTPStatus.OK, (resp.code, resp.message)
    return resp


def check_model(resp, cosines: np.ndarray) -> None:
    got = np.array([e["embedding"] for e in resp.output["embeddings"]])
    assert got.shape == (3, 1152)
    assert np.allclose(gram(got), cosines, atol=0.01), (gram(got), cosines)


def test_sdk_keys_and_ledger_survive_a_restart_and_sigterm_drains(image, names, origin, request):
    name, volume = names
    run = as_in_readme(readme_command("run"), name, volume)
    port = free_port()
    settings = (  # a stalled download to be in flight when SIGTERM comes
        "MMEMBED_FETCH_ALLOW_HOSTS=127.0.0.1",
        "MMEMBED_FETCH_READ_TIMEOUT_S=60",
        "MMEMBED_FETCH_TOTAL_TIMEOUT_S=60",
        "MMEMBED_SHUTDOWN_GRACE_S=1",
    )
    started = time.monotonic()
    start(run, port, *settings)
    server = Running(name, port)
    took = server.wait_healthy()
    report(
        request, f"start to healthy {took:.1f} s (run included: {time.monotonic() - started:.1f} s)"
    )
    logs = server.logs()
    # the build did the first start's work: nothing is exported or embedded at start
    assert "ready in" in logs, logs
    assert "exporting" not in logs and "class prompts" not in logs, logs
    podman("healthcheck", "run", name)  # the image's HEALTHCHECK passes (exit status 0)

    # a managed key, made with the README's command inside the container
    create = as_in_readme(readme_command("podman-exec"), name, volume)
    key = container(*create).strip().splitlines()[-1]
    assert key.startswith("mmk-"), key
    created_as = create[create.index("--name", create.index("create")) + 1]
    server.wait_key(key)

    items, cosines = golden_inputs()
    tokens = 0
    for _ in range(3):
        resp = sdk_embed(server, key, items)
        check_model(resp, cosines)
        assert resp.usage["image_count"] == 1 and resp.usage["image_tokens"] == 64
        tokens += resp.usage["input_tokens"]
    (before,) = json.loads(server.mmembed("usage", "--key", created_as, "--json"))
    assert before["requests"] == 3 and before["input_tokens"] == tokens
    assert before["image_count"] == 3

    # SIGTERM through --init: the request in flight is answered, the process exits by itself
    stall = {"model": MODEL, "input": {"contents": [{"image": origin.url("/stall")}]}}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            httpx.post,
            server.url + EMBED_PATH,
            json=stall,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        time.sleep(1.0)  # sequencing only: let the request reach the stalled download
        container(*as_in_readme(readme_command("podman-stop"), name, volume), timeout=90)
        drained = pending.result(timeout=60)
    assert drained.status_code == 503, drained.text
    assert "shutting down" in drained.json()["message"]
    code = podman("inspect", "--format", "{{.State.ExitCode}}", name).strip()
    assert code in ("0", "143"), f"exit code {code} (137: killed, SIGTERM did not stop it)"
    assert "Traceback" not in server.logs(), server.logs()[-3000:]

    # a new container on the same volume: the key and its ledger are there
    podman("rm", name)
    start(run, port)
    report(request, f"restart to healthy {server.wait_healthy():.1f} s")
    (after,) = json.loads(server.mmembed("usage", "--key", created_as, "--json"))
    answered = after["requests"] - after["failed"]  # (whether the drained 503 is recorded
    assert answered == 3 and after["input_tokens"] == tokens  # is the ledger's business)
    assert after["image_count"] == 3
    resp = sdk_embed(server, key, items[:1])
    (final,) = json.loads(server.mmembed("usage", "--key", created_as, "--json"))
    assert final["requests"] - final["failed"] == 4
    assert final["input_tokens"] == tokens + resp.usage["input_tokens"]
    assert "Traceback" not in server.logs(), server.logs()[-3000:]


def compose_environment(variables: dict[str, str]) -> dict[str, str]:
    """compose.yaml's environment of the mmembed service, ${VAR} expanded from ``variables``."""
    import yaml

    spec = yaml.safe_load((ROOT / "compose.yaml").read_text())
    service = spec["services"]["mmembed"]
    assert service["build"]["dockerfile"] == "Containerfile" and service["init"] is True
    assert any(v.endswith(":/data") for v in service["volumes"])

    def expand(value: str) -> str:
        return re.sub(
            r"\$\{(\w+)(?::?[-?][^}]*)?\}", lambda m: variables.get(m.group(1), ""), str(value)
        )

    return {k: expand(v) for k, v in service["environment"].items()}


def test_compose_settings_keep_the_accounts_in_postgresql(image, names, pg_server, request):  # noqa: F811
    import psycopg

    name, _ = names
    password, admin = "pw-" + uuid.uuid4().hex[:8], "admin-" + uuid.uuid4().hex[:8]
    env = compose_environment(
        {"POSTGRES_PASSWORD": password, "MMEMBED_API_KEYS": "", "MMEMBED_ADMIN_KEYS": admin}
    )
    # compose's database at the test server's address: a database of its own, owned by the
    # role and password compose names
    url = env["MMEMBED_DATABASE_URL"]
    assert url == f"postgresql://mmembed:{password}@db:5432/mmembed", url
    database = new_pg_database(pg_server)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(
            "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mmembed') THEN "
            "CREATE ROLE mmembed LOGIN; END IF; END$$"
        )
        conn.execute(f"ALTER ROLE mmembed PASSWORD '{password}'")
        conn.execute(f"ALTER DATABASE {database.rsplit('/', 1)[1]} OWNER TO mmembed")
    address = database.split("@", 1)[1]  # 127.0.0.1:PORT/NAME
    env["MMEMBED_DATABASE_URL"] = url.replace("db:5432/mmembed", address)
    port = free_port()  # loopback here (scripts/container run: host networking)
    settings = [w for k, v in env.items() if v for w in ("-e", f"{k}={v}")]
    container("run", "-d", "--name", name, *settings, "-e", f"MMEMBED_PORT={port}")
    server = Running(name, port)
    report(request, f"PostgreSQL: start to healthy {server.wait_healthy():.1f} s")
    made = httpx.post(
        server.url + "/admin/keys",
        json={"name": "compose-app"},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    items, cosines = golden_inputs()
    resp = sdk_embed(server, key, items)
    check_model(resp, cosines)
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT count(*), sum(input_tokens) FROM usage_ledger WHERE key_name = 'compose-app'"
        ).fetchone()
    assert rows == (1, resp.usage["input_tokens"])
    listed = podman("exec", name, "ls", "/data")
    assert "accounts.db" not in listed, listed  # the accounts are in PostgreSQL only
