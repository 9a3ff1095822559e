#!/usr/bin/env python3
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

"""The main job end to end, on the local directory image source.

Builds a small qcow2 image with real data in it, writes a config file, and
runs the ``imagebackend`` command line for every backend: the first disk
fetches, converts and caches the image, the rest hit the cache.  Every
disk's content is then compared with the image by ``qemu-img compare``.
Last, the same config through the Python API, as a compute driver uses it
(``imagebackend.load_backend``).

    tox -e demo                   # in a fresh temporary directory
    tox -e demo -- --keep DIR     # keep the work in DIR to look at
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile


def run(argv, **kwargs):
    print("$ " + " ".join(argv), flush=True)
    return subprocess.run(argv, check=True, **kwargs)


def make_image(images_dir):
    """A 64 MiB qcow2 image with a few MiB of recognisable data."""
    raw = os.path.join(images_dir, "demo-seed.raw")
    with open(raw, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        for i in range(8):
            f.seek(i * 8 * 1024 * 1024)
            f.write((b"imagebackend demo block %d\n" % i) * 4096)
    image = os.path.join(images_dir, "cirros-demo.qcow2")
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw,
         image])
    os.unlink(raw)
    return image


def library_demo(conf_file, image_id, target):
    """One more disk through the Python API, from the warm cache."""
    import imagebackend
    from imagebackend import opts

    print("$ python: imagebackend.load_backend(conf).create_image(%r, %r, "
          "1 GiB)" % (image_id, target), flush=True)
    conf = opts.new_conf(["--config-file", conf_file])
    backend = imagebackend.load_backend(conf)
    disk = backend.create_image(image_id, target, 1024 ** 3)
    info = disk.libvirt_disk()
    print("  -> cache hit: %s; libvirt <disk type=%r>: <driver type=%r>, "
          "<source file=%r>, backing %s" % (
              disk.cache_hit, info.source_type, info.driver_type,
              info.source_path, ", ".join(info.backing_chain)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR",
                        help="work in DIR and keep it (default: a "
                             "temporary directory, removed at the end)")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="imagebackend-demo-")
    os.makedirs(work, exist_ok=True)
    try:
        images = os.path.join(work, "images")
        instances = os.path.join(work, "instances")
        os.makedirs(images, exist_ok=True)
        image = make_image(images)
        conf = os.path.join(work, "imagebackend.conf")
        with open(conf, "w") as f:
            f.write("[imagebackend]\ninstances_path = %s\n"
                    "image_source = local\n\n"
                    "[local_source]\npath = %s\n" % (instances, images))
        cli = [sys.executable, "-m", "imagebackend.cmd.main",
               "--config-file", conf]
        image_id = os.path.basename(image)
        for n, backend in enumerate(("qcow2", "cached-base", "raw")):
            target = os.path.join(instances, "vm%d" % n, "disk")
            out = run(cli + ["disk", "create", image_id, target,
                             "--size", "1G", "--backend", backend,
                             "-f", "json"],
                      stdout=subprocess.PIPE, text=True).stdout
            disk = json.loads(out)
            print("  -> %s disk %s, %d bytes, backing %s, cache hit: %s, "
                  "%.3f s" % (disk["format"], disk["path"],
                              disk["virtual_size"], disk["backing_file"],
                              disk["cache_hit"], sum(disk["timings"]
                                                     .values())))
            run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F",
                 disk["format"], image, target])
            print("  -> content identical to the image")
        run(cli + ["cache", "list"])
        library_demo(conf, image_id, os.path.join(instances, "vm3", "disk"))
        run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2",
             image, os.path.join(instances, "vm3", "disk")])
        print("  -> content identical to the image")
        print("\nDemo finished: 4 disks made from %s, one download." %
              image_id)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
