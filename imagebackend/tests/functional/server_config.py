"""Configuration of the functional tests' Keystone and Glance.

Minimal working setups: sqlite databases, fernet tokens, Glance's
filesystem store, Glance validating tokens with Keystone through a service
user, and the catalog entries a client needs to find Glance.
"""

import json
import os
import pathlib


def ini(sections: dict) -> str:
    lines = []
    for section, values in sections.items():
        lines.append("[%s]" % section)
        lines.extend("%s = %s" % item for item in values.items())
        lines.append("")
    return "\n".join(lines)


def write_keystone_config(kdir: pathlib.Path) -> None:
    """keystone.conf, and the two Python entry points run from the venv,
    in ``kdir``.
    """
    for sub in ("fernet-keys", "credential-keys"):
        (kdir / sub).mkdir(parents=True, mode=0o700)
    (kdir / "keystone.conf").write_text(ini({
        "DEFAULT": {"log_file": str(kdir / "keystone.log"),
                    "use_stderr": "false"},
        "database": {"connection": "sqlite:///%s" % (kdir / "keystone.db")},
        "token": {"provider": "fernet"},
        "fernet_tokens": {"key_repository": str(kdir / "fernet-keys")},
        "credential": {"key_repository": str(kdir / "credential-keys")},
        # bcrypt's minimum: tests log in often and need no strength.
        "identity": {"password_hash_rounds": "4"},
    }))
    # keystone hands sys.argv to oslo.config, which would read gunicorn's
    # own arguments as keystone's.
    (kdir / "keystone_wsgi.py").write_text(
        "import sys\n"
        "sys.argv = sys.argv[:1]\n"
        "from keystone.wsgi import api\n"
        "application = api.application\n")
    # keystone-manage would spend seconds importing Keystone once per step.
    (kdir / "keystone_setup.py").write_text(
        "import json\n"
        "import sys\n"
        "from keystone.cmd import cli\n"
        "from keystone import conf\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    cli.main(argv=['keystone-manage'] + argv)\n"
        "    conf.CONF.reset()\n")


def keystone_setup_argv(kdir: pathlib.Path, admin, keystone_url: str,
                        region: str) -> list[str]:
    """One process running fernet_setup, credential_setup, db_sync and
    bootstrap (the ``admin`` user, project and role, and Keystone's own
    catalog entry) in turn.
    """
    user = ["--keystone-user", str(os.getuid()),
            "--keystone-group", str(os.getgid())]
    steps = [
        ["fernet_setup"] + user,
        ["credential_setup"] + user,
        ["db_sync"],
        ["bootstrap",
         "--bootstrap-username", admin.username,
         "--bootstrap-password", admin.password,
         "--bootstrap-project-name", admin.project_name,
         "--bootstrap-role-name", "admin",
         "--bootstrap-service-name", "keystone",
         "--bootstrap-region-id", region,
         "--bootstrap-admin-url", keystone_url,
         "--bootstrap-internal-url", keystone_url,
         "--bootstrap-public-url", keystone_url],
    ]
    conf = str(kdir / "keystone.conf")
    return ["python", str(kdir / "keystone_setup.py"),
            json.dumps([["--config-file", conf] + step for step in steps])]


def write_glance_config(gdir: pathlib.Path, store_dir: pathlib.Path,
                        paste_ini: pathlib.Path, keystone_url: str,
                        service) -> None:
    """glance-api.conf in ``gdir``: images in ``store_dir``, tokens checked
    by Keystone at ``keystone_url`` with the ``service`` credentials.
    """
    for path in (store_dir, gdir / "staging", gdir / "tasks"):
        path.mkdir(parents=True)
    (gdir / "glance-api.conf").write_text(ini({
        "DEFAULT": {"log_file": str(gdir / "glance-api.log"),
                    "use_stderr": "false",
                    "enabled_backends": "fs:file"},
        "database": {"connection": "sqlite:///%s" % (gdir / "glance.db")},
        "glance_store": {"default_backend": "fs"},
        "fs": {"filesystem_store_datadir": str(store_dir)},
        "os_glance_staging_store": {
            "filesystem_store_datadir": str(gdir / "staging")},
        "os_glance_tasks_store": {
            "filesystem_store_datadir": str(gdir / "tasks")},
        "oslo_messaging_notifications": {"driver": "noop"},
        "paste_deploy": {"flavor": "keystone",
                         "config_file": str(paste_ini)},
        "keystone_authtoken": {
            "www_authenticate_uri": keystone_url,
            "auth_url": keystone_url,
            "auth_type": "password",
            "username": service.username,
            "password": service.password,
            "project_name": service.project_name,
            "user_domain_name": service.user_domain_name,
            "project_domain_name": service.project_domain_name,
        },
    }))


def register(admin_session, keystone_url: str, members, glance_url: str,
             region: str) -> None:
    """Create a project and user for each ``(credentials, role)`` in
    ``members``, and the image service with its three endpoints.
    """
    api = _KeystoneAPI(admin_session, keystone_url)
    roles = {role["name"]: role["id"] for role in api.list("roles")}
    for creds, role in members:
        project = api.create("projects", {"name": creds.project_name,
                                          "domain_id": "default"})
        user = api.create("users", {"name": creds.username,
                                    "password": creds.password,
                                    "domain_id": "default",
                                    "default_project_id": project["id"]})
        api.put("projects/%s/users/%s/roles/%s"
                % (project["id"], user["id"], roles[role]))
    service = api.create("services", {"type": "image", "name": "glance"})
    for interface in ("public", "internal", "admin"):
        api.create("endpoints", {"service_id": service["id"],
                                 "interface": interface,
                                 "region_id": region, "url": glance_url})


class _KeystoneAPI:
    """The few identity v3 calls the setup needs."""

    def __init__(self, session, url):
        self.session = session
        self.url = url

    def list(self, collection):
        resp = self.session.get("%s/%s" % (self.url, collection))
        return resp.json()[collection]

    def create(self, collection, body):
        member = collection[:-1]
        resp = self.session.post("%s/%s" % (self.url, collection),
                                 json={member: body})
        return resp.json()[member]

    def put(self, path):
        self.session.put("%s/%s" % (self.url, path))
