#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#    See the License for the specific language governing permissions and
#    limitations under the License.

"""Reading every option once, so that a bad value is reported up front.

oslo.config converts a value, and substitutes ``$references`` in it, only
when the option is first read -- possibly deep inside a command, and with
an error that names neither the option nor the file (``no such option nope
in group [DEFAULT]`` for ``instances_path = $nope``).  :func:`check_conf`
and :func:`check_options` read each option and turn such an error into a
:class:`imagebackend.exception.ConfigValueError` naming the option, the
config file(s) that set it and the problem.
"""

import glob
import os

from oslo_config import cfg

from imagebackend import exception


def check_conf(conf: cfg.ConfigOpts) -> None:
    """Read every option registered on ``conf``.

    :raises imagebackend.exception.ConfigValueError: the first option
        whose value cannot be read.
    """
    for name in list(conf):
        if isinstance(conf[name], conf.GroupAttr):
            check_options(conf, name, list(conf[name]))
        # Options of the DEFAULT group are oslo.config's own
        # (config_file, config_dir): read when the files were parsed.


def check_options(conf: cfg.ConfigOpts, group: str, names) -> None:
    """Read options ``names`` (names or :class:`oslo_config.cfg.Opt`) of
    ``group``.

    :raises imagebackend.exception.ConfigValueError: the first option
        whose value cannot be read.
    """
    for name in names:
        name = getattr(name, "dest", name)
        try:
            conf[group][name]
        except cfg.NoSuchOptError as exc:
            if exc.opt_name == name:
                raise           # not a substitution: a caller's bug
            raise _error(conf, group, name,
                         "refers to $%s, which is not an option (write $$ "
                         "for a literal $)" % exc.opt_name) from exc
        except cfg.TemplateSubstitutionError as exc:
            raise _error(conf, group, name, "cannot be substituted: %s"
                         % exc.msg) from exc
        except cfg.ConfigSourceValueError as exc:
            # oslo.config's text: "Value for option X from LOC is not
            # valid: REASON"; the location is said better below.
            reason = str(exc).rpartition(" is not valid: ")[2]
            raise _error(conf, group, name,
                         "is not valid: %s" % reason) from exc


def _error(conf, group, name, reason):
    files, values = _where_set(conf, group, name)
    if values:
        reason = "its value '%s' %s" % (values[-1], reason)
    else:
        reason = "its value %s" % reason
    return exception.ConfigValueError(group=group, option=name,
                                      files=files, reason=reason)


def config_files(conf: cfg.ConfigOpts) -> list[str]:
    """The files ``conf`` was read from, in the order they were read
    (later ones override earlier ones).
    """
    files = list(conf.config_file or [])
    dirs = conf.config_dir or []
    for directory in [dirs] if isinstance(dirs, str) else dirs:
        files += sorted(glob.glob(os.path.join(directory, "*.conf")))
    return files


def _where_set(conf, group, name) -> tuple[list[str], list[str]]:
    """The config files that set ``[group] name``, and the values they
    give it (re-read: oslo.config does not say where a value it cannot
    convert came from).
    """
    files, values = [], []
    for path in config_files(conf):
        sections: dict = {}
        try:
            cfg.ConfigParser(path, sections).parse()
        except (OSError, cfg.ParseError, UnicodeDecodeError):
            continue    # reported when it was first parsed
        found = sections.get(group, {}).get(name)
        if found:
            files.append(path)
            values.extend(found)
    return files, values
