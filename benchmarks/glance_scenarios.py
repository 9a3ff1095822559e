# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""The Glance rows' servers, and the warm lookup from Glance: a disk of an
image whose base is cached, made in a long-lived process and from the
command line, with the requests each one sends to Keystone and Glance
(counted by an HTTP proxy all of them go through).
"""

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse

from benchmarks import harness
import imagebackend
from imagebackend import opts
from imagebackend.sources.glance import sessions

MiB = harness.MiB


@contextlib.contextmanager
def running_servers(bench):
    """Keystone and Glance: the pair ``--servers`` describes, or a pair
    started for the run (from the functional tests' virtualenv); yields
    ``(servers, None)``, or ``(None, reason)`` when none can be had.
    """
    # Test support, not library code: imported only when a row runs.
    from tests.functional.fixtures import server_procs
    from tests.functional.fixtures import servers

    if bench.args.servers:
        with open(bench.args.servers) as f:
            yield servers.OpenStackServers.attach(json.load(f)), None
        return
    try:
        venv = server_procs.ensure_venv()
    except server_procs.ServersUnavailable as exc:
        yield None, str(exc).splitlines()[0]
        return
    with servers.servers_in_tempdir(venv, base_dir=bench.root) as srv:
        yield srv, None


def _glance_config(bench, srv):
    """A copy of the bench's config file with Glance as the source."""
    path = os.path.join(bench.root, "glance.conf")
    with open(bench.config_file) as f:
        text = f.read()
    text = text.replace("image_source = local", "image_source = glance")
    text += "\n[glance]\n" + "".join(
        "%s = %s\n" % item for item in srv.demo.auth_options().items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _requests(proxy, srv, timed=None):
    """The requests logged since the last call, as ``server METHOD path``;
    each one's seconds (as the proxy relayed it) are appended to ``timed``
    as ``{"request": ..., "seconds": ...}``.
    """
    names = {urllib.parse.urlsplit(srv.keystone_url).netloc: "keystone",
             urllib.parse.urlsplit(srv.glance_url).netloc: "glance"}
    out = []
    for method, url, seconds in proxy.take_timed():
        parts = urllib.parse.urlsplit(url)
        out.append("%s %s %s" % (names.get(parts.netloc, parts.netloc),
                                 method, parts.path))
        if timed is not None:
            timed.append({"request": out[-1], "seconds": seconds})
    return out


@contextlib.contextmanager
def _proxied(proxy):
    """Every HTTP request of this process through ``proxy``."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(proxy.environ(saved))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def glance_warm_lookup(bench):
    """A warm create from Glance: one record GET and the overlay; the
    token once per process.
    """
    from tests.functional.fixtures import counting_proxy

    row = {"name": "glance-warm-lookup",
           "target": "1 request per warm create in a process; token once "
                     "per process"}
    curl = shutil.which("curl")
    if curl is None:
        return dict(row, skipped="curl is not installed (apt-get install "
                                 "curl)")
    args = bench.args
    image = os.path.join(bench.root, "lookup.raw")
    harness.write_sparse_raw(image, 64 * MiB, 4 * MiB, MiB, seed=3)
    with running_servers(bench) as (srv, skipped):
        if skipped:
            return dict(row, skipped=skipped)
        image_id = srv.upload_image(image, "raw", name="bench-lookup")
        config = _glance_config(bench, srv)
        size = str(args.disk_size)
        imagebackend.load_backend(
            opts.new_conf(["--config-file", config])).create_image(
                image_id, bench.target("populate"), args.disk_size)
        token = srv.issue_token(srv.demo)
        record_url = "%s/v2/images/%s" % (srv.glance_url, image_id)
        floor_disk = bench.floor_file("disk")
        base = None
        with counting_proxy.CountingProxy() as proxy, _proxied(proxy):
            sessions.forget_all()
            start = time.perf_counter()
            backend = imagebackend.load_backend(
                opts.new_conf(["--config-file", config]))
            disk = backend.create_image(image_id, bench.target("first"),
                                        args.disk_size)
            first_s = time.perf_counter() - start
            first_timed = []
            first = _requests(proxy, srv, first_timed)
            base = disk.backing_file
            per_create, create_timed, cli_timed = [], [], []

            def library(i):
                disk = backend.create_image(image_id, bench.target(i),
                                            args.disk_size)
                assert disk.cache_hit
                per_create.append(_requests(proxy, srv, create_timed))

            def floor(i):
                harness.run(curl, "-sSf", "-o", os.devnull, "-H",
                            "X-Auth-Token: %s" % token, record_url)
                harness.overlay(base, floor_disk, args.disk_size)
                proxy.take()

            lib, spawned, floors = harness.measure(
                args.warm_repeat, library, {"floor": floor}, bench.clear)
            cli_s, cli_requests = [], []
            for i in range(max(3, args.repeat // 2)):
                bench.clear()
                start = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "imagebackend.cmd.main",
                     "--config-file", config, "disk", "create", image_id,
                     bench.target("cli-%d" % i), "--size", size],
                    check=True, stdout=subprocess.DEVNULL)
                cli_s.append(time.perf_counter() - start)
                cli_requests.append(_requests(proxy, srv, cli_timed))
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c",
                            "import imagebackend.cmd.main"], check=True)
            import_s = time.perf_counter() - start
        sessions.forget_all()
    result = harness.row(
        "glance-warm-lookup", "%s disk of a Glance image whose base is "
        "cached (record GET + overlay), in a long-lived process"
        % harness.size_text(args.disk_size),
        "curl GET of the image record (token given) + qemu-img create",
        row["target"], lib, spawned, floors,
        first_create_s=first_s, first_create_requests=first_timed,
        requests_per_create=sorted({len(r) for r in per_create}),
        create_requests_example=per_create[-1],
        record_get_s=statistics.median(
            t["seconds"] for t in create_timed),
        cli_s=harness.summary(cli_s),
        cli_requests=cli_requests[-1],
        cli_request_s={
            name: statistics.median(t["seconds"] for t in cli_timed
                                    if t["request"] == name)
            for name in cli_requests[-1]},
        cli_import_s=import_s)
    record = "glance GET /v2/images/%s" % image_id
    result["met"] = (all(r == [record] for r in per_create)
                     and first[-1] == record
                     and sum("tokens" in r for r in first) == 1
                     and not any("/file" in r for r in first))
    return result
