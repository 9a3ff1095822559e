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

"""imagebackend: turn images into instance disks through a shared cache.

What a compute driver writes::

    import imagebackend
    from imagebackend import opts

    conf = opts.new_conf(["--config-file", path])   # or its own ConfigOpts
    backend = imagebackend.load_backend(conf)   # by [imagebackend] images_type
    disk = backend.create_image(image_id, target_path, size_bytes)
    disk.libvirt_disk()      # the values of its libvirt <disk> element
"""

import importlib
import sys
import typing

# The annotations of load_backend name these; they are imported for type
# checkers, and for Sphinx, whose autodoc resolves annotations in this
# module's namespace to document them.
if typing.TYPE_CHECKING or "sphinx" in sys.modules:
    from oslo_config import cfg

    from imagebackend.backends import base as backends_base

# Nothing is imported here that a caller may not need: the command line
# starts with ``imagebackend.cmd``, and ``imagebackend --help`` needs no
# cache, backend or configuration code.  The subpackages and
# ``__version__`` are loaded the first time they are asked for.

#: the subpackages and modules ``imagebackend.NAME`` reaches without an
#: import of its own (as it did when they were loaded eagerly).
_SUBMODULES = frozenset({
    "backends", "cache", "common", "disk", "exception", "inspection",
    "opts", "qemu", "sources", "textutils"})


def __getattr__(name: str) -> typing.Any:
    if name == "__version__":
        import pbr.version
        version = pbr.version.VersionInfo("imagebackend").version_string()
        globals()["__version__"] = version
        return version
    if name in _SUBMODULES:
        return importlib.import_module("%s.%s" % (__name__, name))
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES | {"__version__"})


def load_backend(conf: "cfg.ConfigOpts", name: str | None = None,
                 **kwargs: typing.Any) -> "backends_base.ImageBackend":
    """Build the image backend that makes instance disks.

    Registers every option of the library on ``conf`` first
    (:func:`imagebackend.opts.register_opts`), so a compute service may
    pass its own ConfigOpts, parsed or not.

    :param conf: the ConfigOpts to read the options from.
    :param name: the backend's name (an ``imagebackend.backends`` entry
        point: ``qcow2``, ``cached-base``, ``raw``); by default
        ``[imagebackend] images_type``.
    :param kwargs: passed to the backend's constructor: ``source`` (an
        :class:`imagebackend.sources.base.ImageSource`; by default the one
        ``[imagebackend] image_source`` names) and ``qemu`` (a
        :class:`imagebackend.qemu.img.QemuImg`).
    :returns: an :class:`imagebackend.backends.base.ImageBackend`.
    :raises imagebackend.exception.BackendNotFound: no backend has that
        name.
    :raises imagebackend.exception.SourceNotFound: no image source has the
        configured name.
    :raises imagebackend.exception.ConfigurationError: the configuration
        cannot be used (the message names the option).
    """
    from imagebackend.backends import base as backends_base
    from imagebackend import opts

    opts.register_opts(conf)
    return backends_base.load(conf, name, **kwargs)
