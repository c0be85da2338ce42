"""Create the tracking server's service users, the job `mlflow-users` in docker-compose.yml runs after each start.

Signs in as MLflow's admin (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) and makes sure that
  trainer  exists with the password in MLFLOW_TRAINER_PASSWORD and the `trainer` role: EDIT on every experiment
           and registered model, so it logs runs, registers versions and moves the champion alias (also of what
           was created before authentication was on), but manages no users;
  serving  exists with the password in MLFLOW_SERVING_PASSWORD and no role: it has the server's
           default_permission (READ, deploy/mlflow_auth.ini), so it loads the champion and cannot move it.
Running it again sets the passwords from the variables again (that is how they are rotated) and changes nothing
else. Passwords come from the environment only, never the command line, which `ps` shows to every local user.
"""

from __future__ import annotations

import os
import sys

# MLflow's single workspace when workspaces are off (mlflow server --enable-workspaces is not used).
WORKSPACE = "default"
TRAINER_ROLE = "trainer"
TRAINER_GRANTS = {("experiment", "*", "EDIT"), ("registered_model", "*", "EDIT")}
USERS = {"trainer": "MLFLOW_TRAINER_PASSWORD", "serving": "MLFLOW_SERVING_PASSWORD"}
MIN_PASSWORD_LENGTH = 12  # what MLflow's auth store accepts


def password(variable: str) -> str:
    """The password in environment variable `variable`, refused with a message when unset or too short."""
    value = os.environ.get(variable, "")
    if len(value) < MIN_PASSWORD_LENGTH:
        raise SystemExit(f"{variable} must hold a password of at least {MIN_PASSWORD_LENGTH} characters "
                         f"(it is {'unset' if not value else f'{len(value)} long'})")
    return value


def ensure_user(client, username: str, secret: str) -> str:
    """Create `username` with `secret`, or set `secret` as its password if it exists; returns what was done."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_user(username, secret)
        return "created"
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    client.update_user_password(username, secret)
    return "password set"


def ensure_trainer_role(client, username: str) -> None:
    """Give `username` the trainer role, creating the role or adding its missing grants first."""
    role = next((r for r in client.list_roles(WORKSPACE) if r.name == TRAINER_ROLE), None)
    if role is None:
        role = client.create_role(WORKSPACE, TRAINER_ROLE, description="log runs, register models, move aliases")
    have = {(p.resource_type, p.resource_pattern, p.permission) for p in client.list_role_permissions(role.id)}
    for grant in sorted(TRAINER_GRANTS - have):
        client.add_role_permission(role.id, *grant)
    if role.id not in {r.id for r in client.list_user_roles(username)}:
        client.assign_role(username, role.id)


def main() -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    secrets = {username: password(variable) for username, variable in USERS.items()}
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise SystemExit(f"MLFLOW_TRACKING_URI must be the tracking server's http(s) URL, not {uri!r}")
    client = get_app_client("basic-auth", tracking_uri=uri)
    try:
        done = {username: ensure_user(client, username, secret) for username, secret in secrets.items()}
        ensure_trainer_role(client, "trainer")
    except MlflowException as e:
        if e.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            raise SystemExit(
                f"{uri} refused the admin {os.environ.get('MLFLOW_TRACKING_USERNAME')!r} ({e.error_code}): "
                "MLFLOW_TRACKING_PASSWORD must be the admin's current password. The server takes "
                "MLFLOW_AUTH_ADMIN_PASSWORD only when it creates the admin; change it later in the UI or with "
                "the update-password API, then here.") from None
        raise
    print(", ".join(f"{username}: {what}" for username, what in done.items()) + f"; {TRAINER_ROLE} role assigned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
