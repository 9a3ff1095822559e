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

"""Image sources: where image bytes come from (local directory, Glance)."""

from oslo_config import cfg

from imagebackend.common import plugins
from imagebackend import exception

OPTIONS = [
    cfg.StrOpt("image_source",
               default="local",
               help="Where images come from: the name of an "
                    "'imagebackend.sources' entry point. 'local' serves "
                    "files from [local_source] path (no image service "
                    "needed); 'glance' downloads from OpenStack Glance "
                    "with the [glance] options. Default: local."),
]


def load(conf: cfg.ConfigOpts, name: str | None = None, **kwargs):
    """Build the image source named ``name`` (default: ``[imagebackend]
    image_source``), registering its options on ``conf`` first (a source
    never registers them itself).

    :raises imagebackend.exception.SourceNotFound: no such source.
    :raises imagebackend.exception.ConfigurationError: its options do not
        describe a usable source.
    """
    name = name or conf.imagebackend.image_source
    cls = plugins.load_class("imagebackend.sources", name,
                             exception.SourceNotFound)
    cls.register_opts(conf)
    return cls(conf, **kwargs)
