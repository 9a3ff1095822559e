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

"""Finding backends and sources by name (stevedore entry points)."""

import importlib.metadata

from stevedore import driver
from stevedore import exception as stevedore_exc

from imagebackend import exception


def names(namespace: str) -> list[str]:
    """The names registered under an entry-point namespace (without
    importing them).
    """
    return sorted({ep.name for ep in
                   importlib.metadata.entry_points(group=namespace)})


def _load_failed(manager, entrypoint, exc):
    raise exception.ConfigurationError(
        reason="the %s plugin %r (%s) cannot be loaded: %s; reinstall "
               "imagebackend or fix the plugin" % (
                   manager.namespace, entrypoint.name, entrypoint.value,
                   exc)) from exc


def load_class(namespace: str, name: str, not_found: type) -> type:
    """The class registered as ``name`` in ``namespace``.

    The class is returned, not instantiated, so that errors raised while
    building it reach the caller instead of being logged by stevedore.

    :param not_found: the library exception raised, with ``name`` and
        ``choices``, when nothing is registered under that name.
    :raises imagebackend.exception.ConfigurationError: the plugin exists
        but cannot be imported.
    """
    try:
        manager = driver.DriverManager(
            namespace, name, invoke_on_load=False,
            on_load_failure_callback=_load_failed)
    except stevedore_exc.NoMatches as exc:
        raise not_found(name=name,
                        choices=", ".join(names(namespace))) from exc
    return manager.driver
