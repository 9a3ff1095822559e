"""Configuration: building a ConfigOpts and listing every option.

Options are declared beside the code that reads them; this module only
gathers them.  Nothing here reads a global configuration object.
"""

import itertools

from oslo_config import cfg

from imagebackend.backends import base as backends_base
from imagebackend import cache
from imagebackend.common import config_check
from imagebackend.common import plugins
from imagebackend import exception
from imagebackend import inspection
from imagebackend.qemu import options as qemu_options
from imagebackend import sources

GROUP = "imagebackend"


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register the library's core options on ``conf``.

    The options of the configured image source are registered when the
    source is built.
    """
    conf.register_opts(_core_opts(), group=GROUP)
    cache.register_opts(conf)
    qemu_options.register_opts(conf)


def _core_opts() -> list[cfg.Opt]:
    return list(itertools.chain(cache.OPTIONS, backends_base.OPTIONS,
                                sources.OPTIONS, inspection.OPTIONS))


def new_conf(argv: list[str] | None = None,
             default_config_files: list[str] | None = None
             ) -> cfg.ConfigOpts:
    """A new ConfigOpts with every option registered and ``argv`` parsed.

    Every option is read once here, so that a value that cannot be used (a
    ``$reference`` to no option, a value of the wrong type) is reported
    now, naming the option and the file, rather than part-way through
    some later operation.

    :param argv: command-line style arguments such as
        ``["--config-file", "/etc/imagebackend/imagebackend.conf"]``.
    :raises imagebackend.exception.ConfigValueError: an option's value
        cannot be read.
    :raises oslo_config.cfg.Error: a config file is missing or cannot be
        parsed (oslo.config's message names it).
    """
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf(argv or [], project="imagebackend",
         default_config_files=default_config_files or [])
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
    """Every option, by group, for oslo-config-generator
    (``oslo.config.opts`` entry point ``imagebackend``).
    """
    groups = {GROUP: _core_opts()}
    for group, opts in itertools.chain(
            [(cache.IMAGE_CACHE_GROUP, cache.IMAGE_CACHE_OPTIONS)],
            [(qemu_options.GROUP, qemu_options.OPTIONS)],
            _plugin_opts("imagebackend.sources")):
        groups.setdefault(group, []).extend(opts)
    return [(group, sorted(opts, key=lambda o: o.name))
            for group, opts in sorted(groups.items())]


def _plugin_opts(namespace):
    for name in plugins.names(namespace):
        cls = plugins.load_class(namespace, name,
                                 exception.SourceNotFound)
        yield from cls.OPTIONS
