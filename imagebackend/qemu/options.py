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

"""The ``[qemu_img]`` options: which program runs, and the process limits
the commands that read a user's image run under (:func:`info_limits`,
:func:`convert_limits`).
"""

import typing

from oslo_config import cfg

if typing.TYPE_CHECKING:
    from imagebackend.qemu import runner

GROUP = "qemu_img"

OPTIONS = [
    cfg.StrOpt(
        "binary", default="qemu-img",
        help="The qemu-img program imagebackend runs: a name looked up on "
             "PATH, or an absolute path.  Every qemu-img command uses it.  "
             "The default, qemu-img, finds the distribution's binary "
             "(package qemu-utils or qemu-img); versions 7.0 and later are "
             "supported."),
    cfg.IntOpt(
        "info_address_space_limit", default=1024, min=0,
        help="Address space, in MiB, that 'qemu-img info' may use while it "
             "reads an image.  Images come from users, and a crafted image "
             "can make qemu-img allocate without bound; the limit stops it "
             "and the request fails with an error naming this option.  The "
             "default, 1024, is ample for images of 100 GiB and more.  "
             "Values below 64 make qemu-img fail on every image.  0 removes "
             "the limit (not recommended)."),
    cfg.IntOpt(
        "info_cpu_time_limit", default=30, min=0,
        help="CPU time, in seconds, that 'qemu-img info' may use while it "
             "reads an image.  A crafted image can keep qemu-img busy "
             "indefinitely; when the limit is reached qemu-img is killed "
             "and the request fails with an error naming this option.  The "
             "default, 30, is far above the fraction of a second a sound "
             "image of 100 GiB needs.  The same limits apply to the "
             "'qemu-img check' every non-raw image passes before it is "
             "converted or cached.  0 removes the limit (not "
             "recommended)."),
    cfg.IntOpt(
        "convert_address_space_limit", default=4096, min=0,
        help="Address space, in MiB, that 'qemu-img convert' may use while "
             "it converts a downloaded image to raw.  A crafted image can "
             "make qemu-img allocate without bound; the limit stops it and "
             "the request fails with an error naming the image and this "
             "option.  qemu-img reserves address space for each of its "
             "worker threads (stacks and allocator arenas), about 1 GiB on "
             "a small host and more on hosts with many CPUs, so the default, "
             "4096, leaves room for that.  0 removes the limit (not "
             "recommended)."),
    cfg.IntOpt(
        "convert_cpu_seconds_per_gib", default=30, min=0,
        help="CPU time, in seconds per GiB of the image's virtual size "
             "(and at least 60 seconds in all), that 'qemu-img convert' may "
             "use while it converts a downloaded image to raw.  A crafted "
             "image (tiny clusters, heavily compressed data) can keep "
             "qemu-img busy for a very long time; when the limit is "
             "reached qemu-img is killed and the request fails with an "
             "error naming the image and this option.  The default, 30, is "
             "several times what decompressing a compressed qcow2 image "
             "costs (about 5 s per GiB).  A conversion's output is also "
             "limited to the image's checked virtual size.  0 removes the "
             "CPU limit (not recommended)."),
]

#: the smallest CPU time limit of a conversion, in seconds.
CONVERT_MIN_CPU_TIME = 60
#: bytes a conversion's output may exceed the virtual size by (qemu-img
#: rounds sizes up to whole sectors).
CONVERT_OUTPUT_SLACK = 1024 * 1024
#: (is a conversion, limit hit) -> the option that sets the limit, for
#: messages.
LIMIT_OPTIONS = {
    (False, "cpu_time"): "info_cpu_time_limit",
    (False, "address_space"): "info_address_space_limit",
    (True, "cpu_time"): "convert_cpu_seconds_per_gib",
    (True, "address_space"): "convert_address_space_limit",
}


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register the ``[qemu_img]`` options on ``conf`` (idempotent)."""
    conf.register_opts(OPTIONS, group=GROUP)


def info_limits(conf: cfg.ConfigOpts) -> "runner.Limits":
    """The limits of ``qemu-img info`` and ``check`` on a user's image.

    :param conf: a ConfigOpts with the ``[qemu_img]`` options registered.
    """
    # The runner is imported by what runs qemu-img, not by the options
    # (registered by every command, most of which run no qemu-img).
    from imagebackend.qemu import runner

    group = conf.qemu_img
    return runner.Limits(
        address_space=group.info_address_space_limit * 1024 ** 2 or None,
        cpu_time=group.info_cpu_time_limit or None)


def convert_limits(conf: cfg.ConfigOpts, limits: bool,
                   max_output_size: int | None
                   ) -> "runner.Limits | None":
    """The limits of a conversion.

    :param conf: a ConfigOpts with the ``[qemu_img]`` options registered.
    :param limits: apply the ``convert_*`` CPU-time and address-space
        limits (the CPU time is scaled by ``max_output_size``).
    :param max_output_size: the largest output allowed, less
        :data:`CONVERT_OUTPUT_SLACK`; ``None`` for no bound.
    :returns: ``None`` when nothing is limited.
    """
    from imagebackend.qemu import runner

    if not limits and max_output_size is None:
        return None
    group = conf.qemu_img
    file_size = cpu_time = address_space = None
    if max_output_size is not None:
        file_size = max_output_size + CONVERT_OUTPUT_SLACK
    if limits:
        address_space = group.convert_address_space_limit * 1024 ** 2
        per_gib = group.convert_cpu_seconds_per_gib
        if per_gib:
            gib = -(-(max_output_size or 0) // 1024 ** 3)
            cpu_time = max(CONVERT_MIN_CPU_TIME, per_gib * gib)
    return runner.Limits(address_space=address_space or None,
                         cpu_time=cpu_time, file_size=file_size)
