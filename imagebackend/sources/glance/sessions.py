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

"""keystoneauth1 sessions kept for the life of the process.

A Glance source built from the ``[glance]`` options asks Keystone for a
token on its first request.  A compute process may build more than one
source (one backend per driver object, per thread, per command), and each
would authenticate again: two identity requests (version discovery of
``auth_url`` by the generic plugins, then the token) for every one.  So the
session (with its auth plugin and the token it holds, renewed by
keystoneauth1 before it expires) is shared by every source of the process
built from the same auth and session option values, and a token is asked
for once per process and credential.  A token stays with the credentials
and ``auth_url`` it was issued for: sources with other values get a session
of their own.

A forked child starts with no shared session (its parent's connections
and token are not used from two processes).
"""

import hashlib
import json
import os
import threading

from keystoneauth1 import loading as ks_loading
from keystoneauth1 import session as ks_session
from oslo_config import cfg

_LOCK = threading.Lock()
#: key of the option values -> session.
_SESSIONS: dict[str, ks_session.Session] = {}


def _values(conf: cfg.ConfigOpts, group: str, opts) -> list:
    values = []
    section = conf[group]
    for opt in opts:
        value = section.get(opt.dest)
        if isinstance(value, (list, tuple)):
            value = list(value)
        values.append((opt.dest, value))
    return sorted(values, key=lambda item: item[0])


def _key(conf: cfg.ConfigOpts, group: str) -> str:
    """A digest of every option value the session and its auth plugin are
    built from (the plugin's own options, read from ``auth_section`` when
    it is set).
    """
    # keystoneauth1 reads auth_type, and the plugin's options, from
    # auth_section when it is set.
    section = conf[group].auth_section or group
    auth_type = conf[section].auth_type
    parts = [group, section, auth_type,
             _values(conf, group, ks_loading.get_session_conf_options())]
    if auth_type:
        parts.append(_values(conf, section,
                             ks_loading.get_auth_plugin_conf_options(
                                 auth_type)))
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def shared(conf: cfg.ConfigOpts, group: str) -> ks_session.Session:
    """The session (and auth plugin) the options of ``group`` describe:
    the one made earlier in this process from the same values, or a new
    one.

    :raises keystoneauth1.exceptions.ClientException: the auth options
        name no usable plugin or lack a required value.
    :raises oslo_config.cfg.Error: an option cannot be read.
    """
    # Loading the plugin registers its options, which the key reads; it
    # makes no request.
    auth = ks_loading.load_auth_from_conf_options(conf, group)
    key = _key(conf, group)
    with _LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            session = ks_loading.load_session_from_conf_options(
                conf, group, auth=auth)
            _SESSIONS[key] = session
    return session


def forget_all() -> None:
    """Drop every shared session (the next source authenticates anew)."""
    with _LOCK:
        _SESSIONS.clear()


def _after_fork() -> None:
    # The lock may have been held by another thread at the fork.
    global _LOCK
    _LOCK = threading.Lock()
    _SESSIONS.clear()


os.register_at_fork(after_in_child=_after_fork)
