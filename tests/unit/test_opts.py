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

import os

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
from oslo_config import generator
import pytest

import imagebackend
from imagebackend.backends import qcow2
from imagebackend import exception
from imagebackend import opts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SAMPLE = os.path.join(ROOT, "etc", "imagebackend",
                      "imagebackend.conf.sample")
GENERATOR_CONF = os.path.join(ROOT, "etc", "imagebackend",
                              "imagebackend-config-generator.conf")


def test_committed_sample_config_is_current(tmp_path):
    out = tmp_path / "sample.conf"
    generator.main(["--config-file", GENERATOR_CONF,
                    "--output-file", str(out)])
    with open(SAMPLE) as f:
        committed = f.read()
    assert out.read_text() == committed, (
        "etc/imagebackend/imagebackend.conf.sample is stale; run "
        "'tox -e genconfig' and commit the result")


def _keystoneauth_option_names():
    names = {o.dest for o in ks_loading.get_auth_common_conf_options()}
    names |= {o.dest for o in ks_loading.get_session_conf_options()}
    names |= {o.dest for o in ks_loading.get_adapter_conf_options()}
    for plugin in ("password", "v3applicationcredential", "token"):
        names |= {o.dest for o in
                  ks_loading.get_auth_plugin_conf_options(plugin)}
    return names


def test_every_option_of_ours_has_full_sentence_help():
    # keystoneauth1's and oslo.concurrency's options carry their own help.
    theirs = _keystoneauth_option_names()
    checked = 0
    for group, options in opts.list_opts():
        if group == "oslo_concurrency":
            continue
        for opt in options:
            if group == "glance" and opt.dest in theirs:
                continue
            assert opt.help and opt.help.rstrip().endswith("."), (
                group, opt.name)
            assert len(opt.help) > 30, (group, opt.name)
            checked += 1
    assert checked >= 20


def test_new_conf_reads_a_config_file(tmp_path):
    path = tmp_path / "ib.conf"
    path.write_text("[imagebackend]\nimages_type = raw\n"
                    "instances_path = /srv/instances\n")
    conf = opts.new_conf(["--config-file", str(path)])
    assert conf.imagebackend.images_type == "raw"
    assert conf.imagebackend.instances_path == "/srv/instances"
    assert conf.imagebackend.base_dir_name == "_base"
    assert conf.imagebackend.force_raw_images is True


def test_new_conf_rejects_an_unknown_backend_name(tmp_path):
    path = tmp_path / "ib.conf"
    path.write_text("[imagebackend]\nimages_type = lvm\n")
    with pytest.raises(exception.ConfigValueError) as err:
        opts.new_conf(["--config-file", str(path)])
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "[imagebackend] images_type" in message
    assert str(path) in message and "'lvm'" in message


def _groups(conf):
    return {name: {opt for opt in conf[name]} for name in
            ("imagebackend", "image_cache", "qemu_img", "oslo_concurrency",
             "local_source", "glance", "rbd")}


def test_register_opts_registers_every_option_in_one_call():
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    groups = _groups(conf)
    listed = {group: {o.dest for o in options}
              for group, options in opts.list_opts()}
    # An auth plugin's own options are registered when it is loaded.
    listed["glance"] -= _keystoneauth_option_names() - {"auth_type"}
    for group, names in listed.items():
        assert names <= groups[group], group
    assert "lock_path" in groups["oslo_concurrency"]
    # Read without parsing: the defaults.
    assert conf.imagebackend.images_type == "qcow2"
    assert conf.image_cache.disk_dirs == []
    assert conf.qemu_img.binary == "qemu-img"
    # Registering again (the constructors used to) changes nothing.
    opts.register_opts(conf)
    assert _groups(conf) == groups


def test_register_opts_can_leave_the_image_sources_out():
    conf = cfg.ConfigOpts()
    opts.register_opts(conf, image_sources=[])
    assert "instances_path" in conf.imagebackend
    assert "local_source" not in conf and "glance" not in conf
    opts.register_opts(conf, image_sources=["local"])
    assert "local_source" in conf and "glance" not in conf
    with pytest.raises(exception.SourceNotFound):
        opts.register_opts(conf, image_sources=["nfs"])


def test_new_conf_registers_every_source_and_reads_their_options(
        tmp_path):
    # disk extract --upload uses Glance whatever the configured source.
    conf = opts.new_conf([])
    assert conf.imagebackend.image_source == "local"
    assert conf.glance.stall_timeout == 60
    path = tmp_path / "ib.conf"
    path.write_text("[glance]\nstall_timeout = soon\n")
    with pytest.raises(exception.ConfigValueError) as err:
        opts.new_conf(["--config-file", str(path)])
    assert "[glance] stall_timeout" in str(err.value)


def test_a_compute_service_with_its_own_instances_path_loads_ours_too():
    # Nova registers instances_path (and state_path) in [DEFAULT]; ours
    # live in [imagebackend], so both register, and set_defaults maps the
    # service's value onto ours.
    conf = cfg.ConfigOpts()
    conf.register_opts([
        cfg.StrOpt("state_path", default="/var/lib/nova"),
        cfg.StrOpt("instances_path", default="$state_path/instances",
                   help="Where instances are stored on disk."),
    ])
    conf([])
    opts.register_opts(conf)
    assert conf.instances_path == "/var/lib/nova/instances"
    assert (conf.imagebackend.instances_path
            == "/var/lib/imagebackend/instances")
    opts.set_defaults(conf, instances_path=conf.instances_path,
                      base_dir_name="_base")
    assert conf.imagebackend.instances_path == "/var/lib/nova/instances"
    assert conf.instances_path == "/var/lib/nova/instances"


def test_set_defaults_changes_only_that_conf_and_files_still_win(tmp_path):
    path = tmp_path / "ib.conf"
    path.write_text("[imagebackend]\nimages_type = raw\n")
    conf = cfg.ConfigOpts()
    opts.set_defaults(conf, instances_path="/srv/vms", lock_path="/srv/l",
                      images_type="cached-base", base_dir_name="cache",
                      image_source="glance", force_raw_images=False,
                      preallocate_images="space",
                      remove_unused_original_minimum_age_seconds=60,
                      remove_unused_resized_minimum_age_seconds=30)
    conf(["--config-file", str(path)])
    assert conf.imagebackend.instances_path == "/srv/vms"
    assert conf.imagebackend.base_dir_name == "cache"
    assert conf.imagebackend.image_source == "glance"
    assert conf.imagebackend.force_raw_images is False
    assert conf.imagebackend.preallocate_images == "space"
    assert conf.image_cache.remove_unused_original_minimum_age_seconds == 60
    assert conf.image_cache.remove_unused_resized_minimum_age_seconds == 30
    assert conf.oslo_concurrency.lock_path == "/srv/l"
    assert conf.imagebackend.images_type == "raw"      # the file's value
    other = opts.new_conf([])
    assert other.imagebackend.instances_path == (
        "/var/lib/imagebackend/instances")
    assert other.imagebackend.images_type == "qcow2"


@pytest.mark.parametrize("key", ["instances_path", "lock_path"])
def test_set_defaults_refuses_a_relative_path(key):
    with pytest.raises(exception.ConfigurationError) as err:
        opts.set_defaults(cfg.ConfigOpts(), **{key: "instances"})
    assert key in str(err.value) and "absolute" in str(err.value)


def test_no_path_option_defaults_to_a_relative_path():
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    checked = 0
    for group, options in opts.list_opts():
        for opt in options:
            if opt.dest == "path" or opt.dest.endswith(("_path", "_dir")):
                value = conf[group][opt.dest]
                assert value is None or os.path.isabs(value), (group, opt)
                checked += 1
    assert checked >= 2


def test_oslo_concurrency_options_come_from_its_own_namespace():
    assert "oslo_concurrency" not in dict(opts.list_opts())
    with open(GENERATOR_CONF) as f:
        lines = [line.strip() for line in f]
    assert "namespace = oslo.concurrency" in lines
    assert "namespace = imagebackend" in lines


def test_load_backend_registers_the_options_and_builds_the_backend(
        tmp_path):
    conf = cfg.ConfigOpts()
    opts.set_defaults(conf, instances_path=str(tmp_path / "instances"))
    conf([])
    backend = imagebackend.load_backend(conf)
    assert isinstance(backend, qcow2.Qcow2Backend)
    assert backend.cache.base_dir == str(tmp_path / "instances" / "_base")
    bare = cfg.ConfigOpts()
    bare([])
    raw_backend = imagebackend.load_backend(bare, "raw")
    assert raw_backend.name == "raw" and raw_backend.disk_format == "raw"
    with pytest.raises(exception.BackendNotFound) as err:
        imagebackend.load_backend(bare, "lvm")
    assert "'lvm'" in str(err.value) and "qcow2" in str(err.value)


def test_a_clashing_option_of_the_service_is_the_libraries_error():
    # Nova's [image_cache] remove_unused_original_minimum_age_seconds has
    # our name and group but its own help: oslo.config refuses both.
    conf = cfg.ConfigOpts()
    conf.register_opt(cfg.IntOpt(
        "remove_unused_original_minimum_age_seconds", default=86400,
        help="Nova's own help."), group="image_cache")
    with pytest.raises(exception.ConfigurationError) as err:
        opts.register_opts(conf)
    message = str(err.value)
    assert ("[image_cache] remove_unused_original_minimum_age_seconds"
            in message)
    assert "opts.new_conf" in message and "set_defaults" in message
    assert isinstance(err.value.__cause__, cfg.DuplicateOptError)


def test_set_defaults_on_a_parsed_conf_of_our_own():
    # The recipe of doc/source/configuration.rst: the library's own
    # ConfigOpts, given the compute service's values.
    conf = opts.new_conf([])
    assert conf.imagebackend.instances_path == (
        "/var/lib/imagebackend/instances")
    opts.set_defaults(conf, instances_path="/var/lib/nova/instances",
                      base_dir_name="_base", lock_path="/var/lib/nova/tmp")
    assert conf.imagebackend.instances_path == "/var/lib/nova/instances"
    assert conf.oslo_concurrency.lock_path == "/var/lib/nova/tmp"
    backend = imagebackend.load_backend(conf)
    assert backend.cache.base_dir == "/var/lib/nova/instances/_base"
    assert backend.cache.lock_dir == "/var/lib/nova/tmp"


def test_a_missing_or_broken_config_file_is_the_libraries_error(tmp_path):
    missing = tmp_path / "nope.conf"
    with pytest.raises(exception.ConfigFileError) as err:
        opts.new_conf(["--config-file", str(missing)])
    assert str(missing) in str(err.value) and "--config-file" in str(
        err.value)
    assert isinstance(err.value, exception.ConfigurationError)
    broken = tmp_path / "broken.conf"
    broken.write_text("[imagebackend\nimages_type = raw\n")
    with pytest.raises(exception.ConfigFileError) as err:
        opts.new_conf(["--config-file", str(broken)])
    assert str(broken) in str(err.value)
    assert isinstance(err.value.__cause__, cfg.Error)
