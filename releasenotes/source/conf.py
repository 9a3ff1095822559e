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

"""Sphinx configuration of the release notes (``tox -e releasenotes``).

The notes are YAML files in ``releasenotes/notes/`` written with ``reno
new <slug>``; reno groups them by the release whose tag first contains
them (before the first tag: "Current Series").
"""

extensions = ["reno.sphinxext"]

try:
    import openstackdocstheme  # noqa: F401
except ImportError:  # pragma: no cover - the env installs it
    html_theme = "alabaster"
else:
    extensions.append("openstackdocstheme")
    html_theme = "openstackdocs"
    openstackdocs_repo_name = "openstack/imagebackend"
    openstackdocs_bug_project = "imagebackend"
    openstackdocs_bug_tag = "releasenotes"
    openstackdocs_auto_name = False
    openstackdocs_use_storyboard = False

project = "imagebackend release notes"
copyright = "2026, the imagebackend authors"
master_doc = "index"
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = []
html_static_path = ["_static"]
