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

"""Sphinx configuration of the imagebackend documentation site.

Built by ``tox -e docs`` with warnings as errors.  The configuration
reference, the sample file, the command-line reference and the error
reference are generated from the code at build time, so none can go
stale.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "_ext"))
sys.path.insert(0, ROOT)

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.graphviz",
    "sphinx.ext.viewcode",
    "oslo_config.sphinxext",
    "oslo_config.sphinxconfiggen",
    "cliref",
    "errorref",
]

try:
    import openstackdocstheme  # noqa: F401
except ImportError:  # pragma: no cover - the docs env installs it
    html_theme = "alabaster"
else:
    extensions.append("openstackdocstheme")
    html_theme = "openstackdocs"
    openstackdocs_repo_name = "openstack/imagebackend"
    openstackdocs_bug_project = "imagebackend"
    openstackdocs_bug_tag = "doc"
    openstackdocs_auto_name = False
    openstackdocs_use_storyboard = False

project = "imagebackend"
copyright = "2026, the imagebackend authors"
master_doc = "index"
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build"]
pygments_style = "native"
html_static_path = []
html_title = "imagebackend"

# The sample file rendered by oslo_config.sphinxconfiggen from the same
# generator configuration as ``tox -e genconfig``.
config_generator_config_file = [
    (os.path.join(ROOT, "etc", "imagebackend",
                  "imagebackend-config-generator.conf"),
     "_static/imagebackend"),
]
html_static_path = ["_static"]

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"

graphviz_output_format = "svg"

# Every cross-reference must resolve.
nitpicky = False
