"""Contract suites: what every implementation of an interface promises.

Each module holds a mixin of test methods (not collected on its own: its
name does not start with ``Test``) and the interface of the "world" it runs
in.  An implementation's test class inherits the mixin, sets the hooks that
describe its differences, and provides the world as a fixture -- once with
fakes in ``tests/unit/`` and once with the real thing in
``tests/functional/`` -- so both levels check the same promises.
"""
