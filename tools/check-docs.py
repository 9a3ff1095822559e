#!/usr/bin/env python3
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

"""Check the built documentation site against the code (``tox -e docs``).

After Sphinx has built ``doc/build/html``:

- every option of the sample configuration (the namespaces of
  ``etc/imagebackend/imagebackend-config-generator.conf``) has its entry in
  the configuration reference (an anchor ``group.name``);
- every command of ``imagebackend`` (walked from its argument parser) has
  its section in the command-line reference, with every flag it accepts,
  and every argument has a help text;
- every error class has its entry on the troubleshooting page.

Exits 1 and lists what is missing.
"""

import argparse
import html
import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
GENERATOR_CONF = os.path.join(ROOT, "etc", "imagebackend",
                              "imagebackend-config-generator.conf")


def sample_options():
    """(group, name) of every option the sample configuration lists."""
    from oslo_config import generator
    # "namespace" is repeated, which configparser cannot read.
    with open(GENERATOR_CONF, encoding="utf-8") as f:
        namespaces = [value.strip() for key, _sep, value in
                      (line.partition("=") for line in f)
                      if key.strip() == "namespace"]
    found = set()
    for _namespace, listing in generator._list_opts(namespaces):
        for group, opts in listing:
            name = getattr(group, "name", group) or "DEFAULT"
            for opt in opts:
                found.add((name, opt.dest))
    return found


def html_ids(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return set(html.unescape(m) for m in re.findall(r'id="([^"]+)"', text)), \
        html.unescape(re.sub(r"<[^>]+>", "", text))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", nargs="?",
                        default=os.path.join(ROOT, "doc", "build", "html"))
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)  # this tree's code, as the Sphinx build used
    sys.path.insert(0, os.path.join(ROOT, "doc", "source", "_ext"))
    import cliref
    import errorref

    from imagebackend.cmd import main as cmd_main

    missing = []
    ids, _text = html_ids(os.path.join(args.html_dir,
                                       "config-reference.html"))
    options = sample_options()
    for group, name in sorted(options):
        if "%s.%s" % (group, name) not in ids:
            missing.append("configuration reference: [%s] %s"
                           % (group, name))

    ids, text = html_ids(os.path.join(args.html_dir, "cli-reference.html"))
    commands = cliref.walk(cmd_main.build_parser())
    for words, sub, _help in commands:
        anchor = "-".join(words)
        if anchor not in ids:
            missing.append("command-line reference: %s" % " ".join(words))
            continue
        # The command's section: from its anchor to the next section.
        start = text.find(" ".join(words))
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # every command has -h/--help
            if not action.help:
                missing.append("command-line reference: %s %s has no help"
                               % (" ".join(words),
                                  action.metavar or action.dest))
            for flag in action.option_strings:
                if flag not in text[start:]:
                    missing.append("command-line reference: %s %s" % (
                        " ".join(words), flag))

    ids, _text = html_ids(os.path.join(args.html_dir,
                                       "troubleshooting.html"))
    errors = errorref.error_classes()
    for cls in errors:
        if cls.__name__.lower() not in ids:
            missing.append("troubleshooting: %s" % cls.__name__)

    for line in missing:
        print("missing from the docs: %s" % line)
    print("checked %d options, %d commands, %d errors: %s" % (
        len(options), len(commands), len(errors),
        "%d missing" % len(missing) if missing else "all documented"))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
