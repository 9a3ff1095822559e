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

"""Configuration: the one place every option of the library is registered.

Options are declared in small modules of their own beside the code that
reads them (``imagebackend.cache.options``, ``imagebackend.backends.options``,
``imagebackend.qemu.options``, ...), which import nothing but oslo.config,
so that a configuration is built without loading the code that reads it;
this module gathers them, as oslo libraries' ``opts`` modules do:

* :func:`register_opts` registers every option on a ``ConfigOpts`` (the
  library's constructors register nothing themselves);
* :func:`set_defaults` lets a compute service give the library its own
  paths before its configuration files are read;
* :func:`list_opts` lists them for oslo-config-generator (namespace
  ``imagebackend``; oslo.concurrency's ``[oslo_concurrency]`` options come
  from its own namespace, ``oslo.concurrency``);
* :func:`new_conf` builds a ready ``ConfigOpts`` for the command line and
  for callers without a configuration of their own.

Nothing here reads a global configuration object.  How each option maps to
the compute service's option of the same meaning: doc/source/options.rst.
"""

import functools
import itertools
import os

from oslo_config import cfg

from imagebackend.backends import options as backends_options
from imagebackend.cache import options as cache_options
from imagebackend.common import config_check
from imagebackend.common import lock_path
from imagebackend.common import plugins
from imagebackend import exception
from imagebackend import inspection
from imagebackend.qemu import options as qemu_options
from imagebackend import sources

GROUP = "imagebackend"
#: the stevedore namespace of image sources.
SOURCES_NAMESPACE = "imagebackend.sources"

#: :func:`set_defaults`' keyword -> (group, option).
_DEFAULTABLE = {
    "instances_path": (GROUP, "instances_path"),
    "base_dir_name": (GROUP, "base_dir_name"),
    "images_type": (GROUP, "images_type"),
    "image_source": (GROUP, "image_source"),
    "force_raw_images": (GROUP, "force_raw_images"),
    "preallocate_images": (GROUP, "preallocate_images"),
    "remove_unused_original_minimum_age_seconds": (
        cache_options.IMAGE_CACHE_GROUP,
        "remove_unused_original_minimum_age_seconds"),
    "remove_unused_resized_minimum_age_seconds": (
        cache_options.IMAGE_CACHE_GROUP,
        "remove_unused_resized_minimum_age_seconds"),
    "lock_path": ("oslo_concurrency", "lock_path"),
}


def register_opts(conf: cfg.ConfigOpts,
                  image_sources: list[str] | None = None) -> None:
    """Register every option of the library on ``conf``.

    Idempotent: registering again (or after another library registered
    oslo.concurrency's options) changes nothing.  The options may be
    registered before or after ``conf`` parses its files.

    :param conf: the ConfigOpts; a compute service passes its own.  Its
        own options are left alone: ours are in the groups
        ``[imagebackend]``, ``[image_cache]``, ``[qemu_img]``, ``[rbd]``,
        the image
        sources' groups (``[local_source]``, ``[glance]``) and
        oslo.concurrency's ``[oslo_concurrency]``.
    :param image_sources: the names of the image sources whose options to
        register; by default every installed source's.
    :raises imagebackend.exception.SourceNotFound: a name in
        ``image_sources`` is not an installed source.
    :raises imagebackend.exception.ConfigurationError: ``conf`` already
        has an option of one of our names, in one of our groups, defined
        otherwise (the message names it).
    """
    for group, options in _library_opts():
        _register(group, conf.register_opts, options, group)
    # oslo.concurrency's options (lock_path): its own when it is loaded,
    # else the same definitions without loading it.
    _register(lock_path.GROUP, lock_path.register_opts, conf)
    if image_sources is None:
        image_sources = _source_names()
    for name in image_sources:
        cls = _source_class(name)
        _register("/".join(group for group, _ in cls.OPTIONS),
                  cls.register_opts, conf)


def _register(group: str, register, *args, **kwargs) -> None:
    """Call ``register(*args, **kwargs)``; a clash with an option the
    caller registered becomes the library's error, naming the option and
    the way out.
    """
    try:
        register(*args, **kwargs)
    except cfg.DuplicateOptError as exc:
        raise exception.ConfigurationError(
            reason="option [%s] %s is already registered on this "
                   "ConfigOpts with another definition (a compute service's "
                   "option of the same name); give imagebackend a "
                   "ConfigOpts of its own (imagebackend.opts.new_conf) and "
                   "pass the service's values with "
                   "imagebackend.opts.set_defaults"
                   % (group, exc.opt_name)) from exc


def set_defaults(conf: cfg.ConfigOpts, instances_path: str | None = None,
                 base_dir_name: str | None = None,
                 lock_path: str | None = None,
                 images_type: str | None = None,
                 image_source: str | None = None,
                 force_raw_images: bool | None = None,
                 preallocate_images: str | None = None,
                 remove_unused_original_minimum_age_seconds:
                 int | None = None,
                 remove_unused_resized_minimum_age_seconds:
                 int | None = None) -> None:
    """Give the library's options the compute service's values as their
    defaults (a value in a config file still wins).

    Registers the options first.  Only ``conf`` changes, never the option
    objects (other ConfigOpts in the process keep their own defaults);
    ``conf.reset()`` clears them, as it clears every ``set_default``, so
    call this again after a reset.
    Nova, for example (its own options on its CONF; ``conf`` is the
    library's own ConfigOpts, see doc/source/configuration.rst)::

        opts.set_defaults(conf, instances_path=CONF.instances_path,
                          base_dir_name=CONF.image_cache.subdirectory_name,
                          lock_path=CONF.oslo_concurrency.lock_path,
                          force_raw_images=CONF.force_raw_images)

    :param instances_path: ``[imagebackend] instances_path``: an absolute
        path.
    :param base_dir_name: ``[imagebackend] base_dir_name``: a plain name.
    :param lock_path: ``[oslo_concurrency] lock_path``: an absolute path.
    :param images_type: ``[imagebackend] images_type``.
    :param image_source: ``[imagebackend] image_source``.
    :param force_raw_images: ``[imagebackend] force_raw_images``.
    :param preallocate_images: ``[imagebackend] preallocate_images``.
    :param remove_unused_original_minimum_age_seconds: ``[image_cache]
        remove_unused_original_minimum_age_seconds``.
    :param remove_unused_resized_minimum_age_seconds: ``[image_cache]
        remove_unused_resized_minimum_age_seconds``.
    :raises imagebackend.exception.ConfigurationError: a path is not
        absolute.
    """
    given = {"instances_path": instances_path,
             "base_dir_name": base_dir_name, "lock_path": lock_path,
             "images_type": images_type, "image_source": image_source,
             "force_raw_images": force_raw_images,
             "preallocate_images": preallocate_images,
             "remove_unused_original_minimum_age_seconds":
                 remove_unused_original_minimum_age_seconds,
             "remove_unused_resized_minimum_age_seconds":
                 remove_unused_resized_minimum_age_seconds}
    for key in ("instances_path", "lock_path"):
        path = given[key]
        if path is not None and not os.path.isabs(path):
            raise exception.ConfigurationError(
                reason="the default %s %r is not an absolute path; give "
                       "an absolute one" % (key, path))
    register_opts(conf)
    for key, value in given.items():
        if value is not None:
            group, name = _DEFAULTABLE[key]
            conf.set_default(name, value, group=group)


def new_conf(argv: list[str] | None = None,
             default_config_files: list[str] | None = None,
             image_sources: list[str] | None = None) -> cfg.ConfigOpts:
    """A new ConfigOpts with every option registered and ``argv`` parsed.

    Every option is read once here, so that a value that cannot be used (a
    ``$reference`` to no option, a value of the wrong type) is reported
    now, naming the option and the file, rather than part-way through
    some later operation.  Every installed image source's options are
    registered, not only the configured one's: a command may use another
    (``disk extract --upload`` uploads to Glance).

    :param argv: command-line style arguments such as
        ``["--config-file", "/etc/imagebackend/imagebackend.conf"]``.
    :param default_config_files: files read when ``argv`` names none.
    :param image_sources: as for :func:`register_opts`: the sources whose
        options to register and check now (by default every installed
        one's); :func:`imagebackend.sources.load` registers those of the
        source it builds.
    :raises imagebackend.exception.ConfigValueError: an option's value
        cannot be read.
    :raises imagebackend.exception.ConfigFileError: a config file is
        missing or cannot be parsed (the message names it).
    """
    conf = cfg.ConfigOpts()
    register_opts(conf, image_sources)
    try:
        conf(argv or [], project="imagebackend",
             default_config_files=default_config_files or [])
    except cfg.Error as exc:
        raise exception.ConfigFileError(reason=str(exc)) from exc
    check_conf(conf)
    return conf


def check_conf(conf: cfg.ConfigOpts) -> None:
    """Read every option registered on ``conf`` (for a caller that builds
    its own ConfigOpts: call it once the files are parsed).

    :raises imagebackend.exception.ConfigValueError: the first option
        whose value cannot be read, naming it and the file that set it.
    """
    config_check.check_conf(conf)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """Every option of ours, by group, for oslo-config-generator
    (``oslo.config.opts`` entry point ``imagebackend``); the
    ``[oslo_concurrency]`` options are listed by oslo.concurrency's own
    entry point (``namespace = oslo.concurrency``).
    """
    groups: dict[str, list[cfg.Opt]] = {}
    for group, options in itertools.chain(_library_opts(),
                                          _all_source_opts()):
        groups.setdefault(group, []).extend(options)
    return [(group, sorted(options, key=lambda o: o.name))
            for group, options in sorted(groups.items())]


def _library_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """Every (group, options) pair but the image sources'."""
    core = list(itertools.chain(cache_options.OPTIONS,
                                backends_options.OPTIONS, sources.OPTIONS,
                                inspection.OPTIONS))
    return [(GROUP, core),
            (cache_options.IMAGE_CACHE_GROUP,
             list(cache_options.IMAGE_CACHE_OPTIONS)),
            (qemu_options.GROUP, list(qemu_options.OPTIONS)),
            (backends_options.RBD_GROUP, list(backends_options.RBD_OPTIONS))]


def _all_source_opts():
    for name in _source_names():
        yield from _source_class(name).OPTIONS


# Entry points are looked up once per process: load_backend registers the
# options on every call, and a lookup costs milliseconds.
@functools.lru_cache(maxsize=None)
def _source_names() -> tuple[str, ...]:
    return tuple(plugins.names(SOURCES_NAMESPACE))


@functools.lru_cache(maxsize=None)
def _source_class(name: str) -> type:
    return plugins.load_class(SOURCES_NAMESPACE, name,
                              exception.SourceNotFound)
