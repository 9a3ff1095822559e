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
"""The cache package's shape: the facade owns its collaborators, and none
of them knows the facade.

No module of ``imagebackend.cache`` imports the package itself or the
module that defines the ``ImageCache`` facade (``facade``, which the
package hands out as ``imagebackend.cache.ImageCache``), not even under
``typing.TYPE_CHECKING``, and the modules import each other without a
cycle.
"""

import os

import grimp
import pytest

from imagebackend import cache

PACKAGE = "imagebackend.cache"
FACADE = PACKAGE + ".facade"


@pytest.fixture(scope="module")
def graph():
    # TYPE_CHECKING imports count: a back-import hidden from the runtime is
    # still a back-import.
    built = grimp.build_graph("imagebackend",
                              exclude_type_checking_imports=False)
    return built


def modules(graph):
    return sorted(graph.find_descendants(PACKAGE))


def test_the_check_sees_imports_of_the_facade(graph):
    # A control: the backends do import the facade, and the graph says so.
    assert "imagebackend.cache.fetch" in modules(graph)
    assert graph.direct_import_exists(importer="imagebackend.backends.base",
                                      imported=PACKAGE)


def test_the_facade_is_the_packages_image_cache():
    from imagebackend.cache import facade

    assert cache.ImageCache is facade.ImageCache


def test_no_cache_module_imports_the_facade(graph):
    back = [module for module in modules(graph) if module != FACADE
            and any(graph.direct_import_exists(importer=module,
                                               imported=imported)
                    for imported in (PACKAGE, FACADE))]
    assert back == [], (
        "these modules import imagebackend.cache (the facade); give them "
        "what they need instead: %s" % back)


def test_no_cache_module_mentions_type_checking():
    directory = os.path.dirname(cache.__file__)
    found = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            with open(os.path.join(directory, name)) as f:
                if "TYPE_CHECKING" in f.read():
                    found.append(name)
    assert found == []


def test_the_cache_modules_import_each_other_without_a_cycle(graph):
    inside = set(modules(graph))
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m)
                 if i in inside} for m in inside}
    done, path = set(), []

    def visit(module):
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle: %s" % " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for imported in sorted(edges[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(inside):
        visit(module)
