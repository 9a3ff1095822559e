"""A real Keystone and a real Glance on 127.0.0.1 for the functional tests.

Both run from a virtualenv of their own (``tools/glance-servers/
setup-venv.sh`` makes it), served by gunicorn, configured in a temporary
directory with sqlite databases and Glance's filesystem store (see
server_config.py and server_procs.py).  Starting them takes several
seconds, so a test run starts them once (the ``openstack_servers`` session
fixture in conftest.py) and stops them at the end.

Nothing here is part of the library: it only gives the tests real servers
to talk to.
"""

import contextlib
import dataclasses
import logging
import os
import pathlib
import secrets
import tempfile
import time

from glanceclient import client as glance_client
from keystoneauth1.identity import v3
from keystoneauth1 import session as ks_session

from imagebackend.tests.functional import server_config
from imagebackend.tests.functional import server_procs

LOG = logging.getLogger(__name__)

REGION = "RegionOne"
#: the niceness of Glance's setup and first start (see start()).
_BEHIND_KEYSTONE = 10


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A Keystone user scoped to a project, as the tests log in."""

    auth_url: str
    username: str
    password: str
    project_name: str
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"

    def auth_options(self) -> dict:
        """The ``[glance]`` password-plugin options for these credentials."""
        return {
            "auth_type": "password",
            "auth_url": self.auth_url,
            "username": self.username,
            "password": self.password,
            "project_name": self.project_name,
            "user_domain_name": self.user_domain_name,
            "project_domain_name": self.project_domain_name,
        }

    def session(self) -> ks_session.Session:
        auth = v3.Password(
            auth_url=self.auth_url, username=self.username,
            password=self.password, project_name=self.project_name,
            user_domain_name=self.user_domain_name,
            project_domain_name=self.project_domain_name)
        return ks_session.Session(auth=auth)


class OpenStackServers:
    """Keystone and Glance, configured in ``workdir`` and run from ``venv``.

    After :meth:`start`: ``keystone_url`` (the v3 auth URL), ``glance_url``,
    ``admin`` and ``demo`` :class:`Credentials` (``demo`` is a member of
    project ``demo``, ``admin`` an admin of project ``admin``),
    ``glance_service`` (the user Glance validates tokens with) and
    ``store_dir`` (Glance's filesystem store: an image's file is named after
    its id).
    """

    def __init__(self, venv: pathlib.Path, workdir: pathlib.Path) -> None:
        self.venv = pathlib.Path(venv)
        self.workdir = pathlib.Path(workdir)
        self.keystone_port = server_procs.free_port()
        self.glance_port = server_procs.free_port()
        self.keystone_url = "http://127.0.0.1:%d/v3" % self.keystone_port
        self.glance_url = "http://127.0.0.1:%d" % self.glance_port
        self.keystone_dir = self.workdir / "keystone"
        self.glance_dir = self.workdir / "glance"
        self.store_dir = self.glance_dir / "images"
        self.admin = Credentials(self.keystone_url, "admin",
                                 secrets.token_hex(8), "admin")
        self.demo = Credentials(self.keystone_url, "demo",
                                secrets.token_hex(8), "demo")
        self.glance_service = Credentials(self.keystone_url, "glance",
                                          secrets.token_hex(8), "service")
        self.timings = {}
        self._glance_clients = {}
        self._keystone = None
        self._glance = None

    # --- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Configure and start both servers; returns once both answer.

        :raises server_procs.ServerFailed: a setup command failed or a
            server did not come up; the message holds the end of its log.
        """
        started = time.monotonic()
        setup = {}
        try:
            server_config.write_keystone_config(self.keystone_dir)
            server_config.write_glance_config(
                self.glance_dir, self.store_dir,
                self.venv / "etc" / "glance" / "glance-api-paste.ini",
                self.keystone_url, self.glance_service)
            # On two cores most of the start is Python importing Keystone
            # and Glance: overlap whatever does not depend on the other,
            # Glance at a lower priority since Keystone's chain (setup,
            # start, registration) is the longer one.
            setup["keystone-setup"] = (
                self._spawn_manage("keystone-setup",
                                   server_config.keystone_setup_argv(
                                       self.keystone_dir, self.admin,
                                       self.keystone_url, REGION)),
                self._spawn_keystone)
            glance_conf = str(self.glance_dir / "glance-api.conf")
            setup["glance-db-sync"] = (
                self._spawn_manage("glance-db-sync",
                                   ["glance-manage", "--config-file",
                                    glance_conf, "db", "sync"],
                                   niceness=_BEHIND_KEYSTONE),
                lambda: self._spawn_glance(niceness=_BEHIND_KEYSTONE))
            self._run_setup(setup, started)
            self._timed("keystone-start", self._keystone.wait_http,
                        self.keystone_url,
                        started + server_procs.START_TIMEOUT)
            self._timed("keystone-register", self._register)
            self._timed("glance-start", self._glance.wait_http,
                        self.glance_url + "/versions",
                        started + server_procs.START_TIMEOUT)
        except BaseException:
            for proc, _then in setup.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - started
        LOG.info("keystone on %s and glance on %s started in %.1f s",
                 self.keystone_url, self.glance_url, self.timings["start"])

    def _timed(self, name, func, *args):
        started = time.monotonic()
        func(*args)
        self.timings[name] = round(time.monotonic() - started, 2)

    def stop(self) -> None:
        """Stop both servers (SIGINT, then SIGKILL); safe to call twice."""
        servers = [s for s in (self._glance, self._keystone) if s is not None]
        for server in servers:
            server.interrupt()
        for server in servers:
            server.stop()

    def start_glance(self) -> None:
        """Start (or restart) Glance and wait until it answers."""
        if self._glance is not None and self._glance.running:
            return
        self._spawn_glance()
        self._glance.wait_http(
            self.glance_url + "/versions",
            time.monotonic() + server_procs.START_TIMEOUT)

    def _spawn_glance(self, niceness=0):
        self._glance = server_procs.GunicornServer(
            "glance", server_procs.nice(niceness) + server_procs.gunicorn_argv(
                self.venv, "glance.wsgi.api:application", self.glance_port,
                8),
            server_procs.clean_env(
                self.venv, OS_GLANCE_CONFIG_DIR=str(self.glance_dir)),
            self.glance_dir / "gunicorn.log")
        self._glance.start()

    def stop_glance(self) -> None:
        """Stop Glance only (Keystone keeps running)."""
        if self._glance is not None:
            self._glance.stop()

    @contextlib.contextmanager
    def glance_stopped(self):
        """Glance is down inside the block and back up after it."""
        self.stop_glance()
        try:
            yield
        finally:
            self.start_glance()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    # --- helpers for tests ------------------------------------------------

    def glance_client(self, creds: Credentials | None = None):
        """A glanceclient v2 client for ``creds`` (default: demo), kept
        for the next call (its token too).
        """
        creds = creds or self.demo
        if creds not in self._glance_clients:
            self._glance_clients[creds] = glance_client.Client(
                "2", session=creds.session(), region_name=REGION)
        return self._glance_clients[creds]

    def upload_image(self, data: bytes | str | os.PathLike,
                     disk_format: str,
                     container_format: str = "bare",
                     creds: Credentials | None = None,
                     name: str = "test-image") -> str:
        """Create an image and upload ``data`` (bytes or a file path).

        :returns: the new image's id; the image is active.
        """
        client = self.glance_client(creds)
        image = client.images.create(name=name, disk_format=disk_format,
                                     container_format=container_format)
        if isinstance(data, bytes):
            client.images.upload(image["id"], _BytesReader(data),
                                 image_size=len(data))
        else:
            with open(data, "rb") as src:
                client.images.upload(image["id"], src,
                                     image_size=os.path.getsize(data))
        status = client.images.get(image["id"])["status"]
        if status != "active":
            raise server_procs.ServerFailed(
                "image %s is %s after upload" % (image["id"], status))
        return image["id"]

    def deactivate_image(self, image_id: str) -> None:
        """Deactivate an image (an admin-only action in Glance)."""
        self.glance_client(self.admin).images.deactivate(image_id)

    def image_get(self, image_id: str, creds: Credentials | None = None):
        return self.glance_client(creds).images.get(image_id)

    def image_store_file(self, image_id: str) -> pathlib.Path:
        """The file holding an image's bytes in Glance's filesystem store."""
        path = self.store_dir / image_id
        if not path.is_file():
            raise FileNotFoundError("image %s has no file in %s"
                                    % (image_id, self.store_dir))
        return path

    def tamper_image_file(self, image_id: str, offset: int = 0) -> None:
        """Flip one byte of an image in Glance's store, behind Glance's
        back: its size and recorded hashes stay as they were.
        """
        path = self.image_store_file(image_id)
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            if not byte:
                raise ValueError("offset %d is past the end of %s"
                                 % (offset, path))
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))

    def issue_token(self, creds: Credentials | None = None) -> str:
        """A fresh project-scoped token for ``creds`` (default: demo)."""
        return (creds or self.demo).session().get_token()

    def revoke_token(self, token: str) -> None:
        """Revoke ``token`` so that Keystone and Glance refuse it."""
        sess = self.admin.session()
        sess.delete(self.keystone_url + "/auth/tokens",
                    headers={"X-Subject-Token": token})

    # --- setup ----------------------------------------------------------

    def _spawn_manage(self, name, argv, niceness=0):
        return server_procs.spawn(
            [str(self.venv / "bin" / argv[0])] + argv[1:],
            server_procs.clean_env(self.venv),
            self.workdir / ("%s.log" % name), niceness)

    def _run_setup(self, setup, started):
        """Wait for the setup commands; start each server as soon as its
        own setup is done.
        """
        pending = dict(setup)
        while pending:
            for name, (proc, start_server) in list(pending.items()):
                code = proc.poll()
                if code is None:
                    continue
                if code != 0:
                    log = (self.workdir / ("%s.log" % name)).read_text(
                        errors="replace")
                    raise server_procs.ServerFailed(
                        "%s failed (exit %s):\n%s"
                        % (name, code, log[-3000:]))
                self.timings[name] = round(time.monotonic() - started, 2)
                del pending[name]
                start_server()
            if time.monotonic() > started + server_procs.START_TIMEOUT:
                raise server_procs.ServerFailed(
                    "%s still running after %.0f s"
                    % (", ".join(pending), server_procs.START_TIMEOUT))
            time.sleep(0.05)

    def _spawn_keystone(self):
        self._keystone = server_procs.GunicornServer(
            "keystone",
            server_procs.gunicorn_argv(
                self.venv, "keystone_wsgi:application", self.keystone_port,
                4, "--pythonpath", str(self.keystone_dir)),
            server_procs.clean_env(
                self.venv, OS_KEYSTONE_CONFIG_DIR=str(self.keystone_dir)),
            self.keystone_dir / "gunicorn.log")
        self._keystone.start()

    def _register(self):
        server_config.register(
            self.admin.session(), self.keystone_url,
            [(self.demo, "member"), (self.glance_service, "admin")],
            self.glance_url, REGION)


class _BytesReader:
    """A minimal file object over bytes, read in pieces by glanceclient."""

    def __init__(self, data):
        self._data = memoryview(data)
        self._pos = 0

    def read(self, size=-1):
        if size is None or size < 0:
            size = len(self._data) - self._pos
        chunk = bytes(self._data[self._pos:self._pos + size])
        self._pos += len(chunk)
        return chunk


@contextlib.contextmanager
def servers_in_tempdir(venv: pathlib.Path, base_dir: str | None = None):
    """Start both servers from ``venv`` with their files in a new
    temporary directory; stop them and remove the directory afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="imagebackend-servers-",
                                     dir=base_dir) as workdir:
        with OpenStackServers(venv, pathlib.Path(workdir)) as servers:
            yield servers
