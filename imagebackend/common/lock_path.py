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

"""oslo.concurrency's ``[oslo_concurrency]`` options (``lock_path``),
registered and read without importing :mod:`oslo_concurrency.lockutils`.

The cache and the disk operations read ``lock_path`` to find the lock
directory, but most commands take no lock; importing lockutils (with
debtcollector, fasteners, oslo.i18n and oslo_utils.timeutils) cost about
a tenth of the command line's start-up.  So, while lockutils is not
loaded, :func:`register_opts` registers :data:`OPTIONS`, a copy of
lockutils' own definitions made as lockutils makes them (the default of
``lock_path`` is ``$OSLO_LOCK_PATH`` as this module is imported);
oslo.config accepts lockutils' registration of the same options on the
same ConfigOpts later, so it and any user of ``lockutils.get_lock_path``
read the same value.  Once lockutils is loaded (a compute service always
has it), its own options are registered, as
``lockutils.get_lock_path(conf)`` registers them, so a default changed
through ``lockutils.set_defaults`` is honoured.  ``tests/unit/common/
test_lock_path.py`` fails if lockutils' definitions change.

The sample configuration lists these options through oslo.concurrency's
own generator namespace (``oslo.concurrency``), not through this copy.
"""

import os
import sys

from oslo_config import cfg

GROUP = "oslo_concurrency"
_LOCKUTILS = "oslo_concurrency.lockutils"

#: ``oslo_concurrency.lockutils._opts``, option for option.
OPTIONS = [
    cfg.BoolOpt(
        "disable_process_locking",
        default=False,
        help="Enables or disables inter-process locks.",
    ),
    cfg.StrOpt(
        "lock_path",
        default=os.environ.get("OSLO_LOCK_PATH"),
        help="Directory to use for lock files.  For security, the "
        "specified directory should only be writable by the user "
        "running the processes that need locking. "
        "Defaults to environment variable OSLO_LOCK_PATH. "
        "If external locks are used, a lock path must be set.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register the ``[oslo_concurrency]`` options on ``conf``
    (idempotent): lockutils' own when it is loaded, else :data:`OPTIONS`.

    :raises oslo_config.cfg.DuplicateOptError: ``conf`` has an option of
        that group and name defined otherwise, as lockutils raises.
    """
    lockutils = sys.modules.get(_LOCKUTILS)
    if lockutils is not None:
        try:
            # Its public way to register them: they are registered
            # before the value is read.
            lockutils.get_lock_path(conf)
            return
        except cfg.DuplicateOptError:
            # Registered from OPTIONS before lockutils was loaded (equal
            # unless its defaults changed since): those stay; a third
            # definition is refused below.
            pass
    conf.register_opts(OPTIONS, group=GROUP)


def get_lock_path(conf: cfg.ConfigOpts) -> str | None:
    """``[oslo_concurrency] lock_path``, the options registered first:
    what ``oslo_concurrency.lockutils.get_lock_path(conf)`` returns.
    """
    register_opts(conf)
    return conf.oslo_concurrency.lock_path
