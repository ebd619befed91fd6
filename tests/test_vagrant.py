"""vagrant/: the same lab as three VMs. Booting them takes minutes (scripts/vm-test.sh does, end
to end); here the files are checked as far as is cheap: Ruby and bash syntax, the Vagrantfile
evaluated against a recording stand-in of Vagrant's API (box, libvirt driver and networks, what
is carried in from the host), and agreement with the namespace lab and with vm-test.sh."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, unavailable
from nftrace.lab.lab import LISTEN_TCP, LISTEN_UDP, list_scenarios, scenario_names
from nftrace.lab.topology import CLIENT_V4, ROUTER_CLIENT_V4, ROUTER_SERVER_V4, SERVER_V4

VAGRANT = REPO / "vagrant"
VAGRANTFILE = VAGRANT / "Vagrantfile"
PROVISION = VAGRANT / "provision.sh"
BUILD_BOX = VAGRANT / "build-box.sh"
VM_TEST = REPO / "scripts" / "vm-test.sh"
VM_FLOWS = REPO / "scripts" / "vm_flows.py"
# The host's own settings must not leak into what a test expects: no CA, no pip config, no proxy.
NEUTRAL_HOST = {"PIP_CONFIG_FILE": os.devnull, "PIP_CERT": "", "REQUESTS_CA_BUNDLE": "", "SSL_CERT_FILE": "",
                "PIP_INDEX_URL": "", "PIP_EXTRA_INDEX_URL": "", "PIP_TRUSTED_HOST": "", "PIP_PROXY": "",
                "PIP_TIMEOUT": "", "PIP_DEFAULT_TIMEOUT": "", "PIP_RETRIES": "", "http_proxy": "", "https_proxy": "",
                "no_proxy": "", "HTTP_PROXY": "", "HTTPS_PROXY": "", "NO_PROXY": "", "NFTLAB_BOX": "",
                "NFTLAB_LIBVIRT_DRIVER": ""}

# Stands in for Vagrant: records what the Vagrantfile configures, prints it as JSON.
RECORDER = r'''
require "json"
class Recorder
  attr_reader :calls, :children
  def initialize; @calls = []; @children = {}; end
  def method_missing(name, *args, **options, &block)
    if block
      child = Recorder.new
      block.arity == 0 ? child.instance_eval(&block) : block.call(child)
      @calls << [name.to_s, args, options.transform_keys(&:to_s), child.to_h]
      return child
    end
    return (@children[name] ||= Recorder.new) if args.empty? && options.empty? && !name.to_s.end_with?("=")
    @calls << [name.to_s, args, options.transform_keys(&:to_s), nil]
  end
  def respond_to_missing?(*) = true
  def to_h = { "calls" => @calls, "children" => @children.transform_keys(&:to_s).transform_values(&:to_h) }
end
module Vagrant
  def self.configure(version)
    config = Recorder.new
    yield config
    puts JSON.generate(config.to_h)
  end
end
load ARGV[0]
'''


def ruby_or_skip() -> str:
    ruby = shutil.which("ruby")
    if ruby is None:
        unavailable("ruby is not installed (scripts/setup.sh installs it); CI must check the Vagrantfile")
    return ruby


def evaluated(env=None, vagrantfile=VAGRANTFILE) -> dict:
    result = subprocess.run([ruby_or_skip(), "-e", RECORDER, str(vagrantfile)], capture_output=True, text=True,
                            timeout=30, env={**os.environ, **NEUTRAL_HOST, **(env or {})}, cwd=vagrantfile.parent)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def config_calls(config: dict, name: str) -> list:
    """(args, options, block) of every call `name` on config.vm (provider, provision, ...)."""
    return [(args, options, child) for method, args, options, child in config["children"]["vm"]["calls"] if method == name]


def provider_settings(config: dict, provider: str) -> dict:
    """{setting: value} of a provider block: `lv.memory = 768` gives {"memory": 768}."""
    for args, _options, child in config_calls(config, "provider"):
        if args == [provider]:
            return {method[:-1]: values[0] for method, values, _o, _c in child["calls"] if method.endswith("=")}
    return {}


def vm_settings(config: dict) -> dict:
    return {method[:-1]: values[0] for method, values, _o, _c in config["children"]["vm"]["calls"] if method.endswith("=")}


def machines(config: dict) -> dict:
    """name -> the calls made on that machine's config, flattened to (method, args, options)."""
    found = {}
    for name, args, _options, child in config["children"]["vm"]["calls"]:
        if name == "define":
            flat = []
            for sub in child["children"].values():
                flat += [(call[0], call[1], call[2]) for call in sub["calls"]]
            found[args[0]] = flat
    return found


def test_vagrantfile_is_valid_ruby():
    result = subprocess.run([ruby_or_skip(), "-c", str(VAGRANTFILE)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr


def test_vagrant_validate_accepts_it_where_vagrant_is_installed(tmp_path):
    if shutil.which("vagrant") is None:
        unavailable("vagrant is not installed here (ruby -c and the recorder check the file)", optional=True)
    # Vagrant keeps its state next to the Vagrantfile unless told otherwise: not in the checkout.
    env = dict(os.environ, VAGRANT_DOTFILE_PATH=str(tmp_path / ".vagrant"))
    result = subprocess.run(["vagrant", "validate"], capture_output=True, text=True, timeout=120, cwd=VAGRANT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(PROVISION)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert os.access(PROVISION, os.X_OK)


def test_three_machines_on_the_namespace_labs_addresses():
    found = machines(evaluated())
    assert set(found) == {"client", "firewall", "server"}
    addresses = {name: [options["ip"] for method, args, options in calls if method == "network"]
                 for name, calls in found.items()}
    assert addresses == {"client": [CLIENT_V4], "firewall": [ROUTER_CLIENT_V4, ROUTER_SERVER_V4], "server": [SERVER_V4]}


def test_the_firewall_and_each_host_share_one_private_network_per_side():
    found = machines(evaluated())
    nets = {name: [options["virtualbox__intnet"] for method, args, options in calls if method == "network"]
            for name, calls in found.items()}
    assert nets["client"][0] == nets["firewall"][0] != nets["firewall"][1] == nets["server"][0]


def test_the_chosen_scenario_is_passed_to_the_firewalls_provisioning():
    found = machines(evaluated({"NFTLAB_SCENARIO": "docker"}))
    provisions = [(args, options) for method, args, options in found["firewall"] if method == "provision"]
    assert (["lab"], {"type": "shell", "path": "provision.sh", "args": ["firewall", "docker"], "run": "always"}) in provisions


def test_an_unknown_scenario_stops_vagrant_with_the_known_names():
    result = subprocess.run([ruby_or_skip(), "-e", RECORDER, str(VAGRANTFILE)], capture_output=True, text=True,
                            timeout=30, env=dict(os.environ, NFTLAB_SCENARIO="nope"), cwd=VAGRANT)
    assert result.returncode != 0
    assert "NFTLAB_SCENARIO=nope: no such scenario in rules/ (known: docker," in result.stderr


def test_the_repository_is_synced_so_scenarios_are_shared_not_copied():
    config = evaluated()
    synced = [(args, options) for method, args, options, _ in config["children"]["vm"]["calls"] if method == "synced_folder"]
    assert synced[0] == ([".", "/vagrant"], {"disabled": True})
    assert synced[1][0] == [str(REPO), "/nftrace"]
    assert ".venv/" in synced[1][1]["rsync__exclude"]
    assert not [path for path in VAGRANT.rglob("*") if path.suffix in (".nft", ".rules") or path.name.endswith(".toml")]
    assert '"$NFTRACE" --netns "$ROUTER_NS" lab load "$scenario"' in PROVISION.read_text()


def test_default_scenario_exists():
    default = re.search(r'ENV\.fetch\("NFTLAB_SCENARIO", "([^"]+)"\)', VAGRANTFILE.read_text()).group(1)
    assert default in scenario_names()


def test_server_listens_on_the_namespace_labs_ports_but_ssh():
    text = PROVISION.read_text()
    tcp = [int(port) for port in re.search(r'^LISTEN_TCP="([^"]+)"', text, re.MULTILINE).group(1).split()]
    udp = [int(port) for port in re.search(r'^LISTEN_UDP="([^"]+)"', text, re.MULTILINE).group(1).split()]
    assert tcp == [port for port in LISTEN_TCP if port != 22]
    assert udp == list(LISTEN_UDP)


def test_box_building_and_vm_test_scripts_are_valid_bash():
    for script in (BUILD_BOX, VM_TEST):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_the_public_box_by_default():
    assert vm_settings(evaluated())["box"] == "debian/bookworm64"


def test_a_locally_built_box_named_by_the_environment():
    assert vm_settings(evaluated({"NFTLAB_BOX": "nftlab/bookworm64"}))["box"] == "nftlab/bookworm64"


def test_a_locally_built_box_named_by_a_file_next_to_the_vagrantfile(tmp_path):
    lab = tmp_path / "vagrant"
    lab.mkdir()
    for name in ("Vagrantfile", "host_settings.rb", "provision.sh"):
        shutil.copy(VAGRANT / name, lab / name)
    (tmp_path / "rules").symlink_to(REPO / "rules")
    (lab / "local-box").write_text("# built by vagrant/build-box.sh\nnftlab/bookworm64\n")
    assert vm_settings(evaluated(vagrantfile=lab / "Vagrantfile"))["box"] == "nftlab/bookworm64"
    assert vm_settings(evaluated({"NFTLAB_BOX": "other/box"}, vagrantfile=lab / "Vagrantfile"))["box"] == "other/box"


def test_the_local_box_file_is_not_committed():
    # Read from .gitignore, not asked of git: a checkout copied without .git (CI's clean roots,
    # a release tarball) has no git to ask.
    assert "vagrant/local-box" in (REPO / ".gitignore").read_text().splitlines()


def test_build_box_names_the_box_the_vagrantfile_and_vm_test_use():
    assert re.search(r'^BOX_NAME=\$\{NFTLAB_BOX:-nftlab/bookworm64\}$', BUILD_BOX.read_text(), re.MULTILINE)
    assert re.search(r'^DEFAULT_BOX=nftlab/bookworm64\b', VM_TEST.read_text(), re.MULTILINE)
    text = BUILD_BOX.read_text()
    for needed in ("--variant=minbase", "net.ifnames=0", "extlinux --install", "NOPASSWD:ALL", "ssh-keygen -A",
                   '"format": "qcow2"', "vagrant box add", "setup.sh\" --packages"):
        assert needed in text, needed


def test_the_lab_networks_give_the_host_no_address_on_libvirt():
    for name, calls in machines(evaluated()).items():
        for method, args, options in calls:
            if method == "network":
                assert options["libvirt__forward_mode"] == "veryisolated", name
                assert options["libvirt__dhcp_enabled"] is False, name


@pytest.mark.parametrize("driver", ["kvm", "qemu"])
def test_the_libvirt_driver_can_be_chosen(driver):
    config = evaluated({"NFTLAB_LIBVIRT_DRIVER": driver})
    assert provider_settings(config, "libvirt")["driver"] == driver
    assert ("boot_timeout" in vm_settings(config)) == (driver == "qemu")


def test_the_libvirt_driver_is_kvm_or_qemu():
    result = subprocess.run([ruby_or_skip(), "-e", RECORDER, str(VAGRANTFILE)], capture_output=True, text=True,
                            timeout=30, env={**os.environ, **NEUTRAL_HOST, "NFTLAB_LIBVIRT_DRIVER": "xen"}, cwd=VAGRANT)
    assert result.returncode != 0 and "NFTLAB_LIBVIRT_DRIVER=xen: kvm or qemu" in result.stderr


def test_the_libvirt_driver_is_chosen_for_this_machine_by_default():
    flags = set()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags.update(line.split())
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK) and bool(flags & {"vmx", "svm"})
    assert provider_settings(evaluated(), "libvirt")["driver"] == ("kvm" if usable else "qemu")


def test_domains_and_networks_have_the_names_vm_test_cleans_up():
    config = evaluated()
    assert provider_settings(config, "libvirt")["default_prefix"] == "nftlab-"
    script = VM_TEST.read_text()
    assert re.search(r"^DOMAIN_PREFIX=nftlab-$", script, re.MULTILINE)
    networks = {options["libvirt__network_name"] for calls in machines(config).values()
                for method, _args, options in calls if method == "network"}
    listed = re.search(r"^LAB_NETWORKS=\(([^)]*)\)", script, re.MULTILINE).group(1).split()
    assert networks | {"vagrant-libvirt"} == set(listed)


def test_nothing_is_carried_in_from_a_host_without_ca_or_pip_settings():
    config = evaluated()
    provisions = {args[0]: options for args, options, _child in config_calls(config, "provision")}
    for calls in machines(config).values():
        provisions.update({args[0]: options for method, args, options in calls if method == "provision"})
    assert "host-ca" not in provisions
    assert provisions["install"]["env"] == {}


def test_the_hosts_ca_bundle_and_pip_settings_are_carried_in(tmp_path):
    bundle = tmp_path / "proxy-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    pip_conf = tmp_path / "pip.conf"
    pip_conf.write_text("[global]\nextra-index-url = file:///opt/local/simple https://mirror.example/simple\n"
                        "find-links = /opt/wheels\ntrusted-host = mirror.example\n")
    config = evaluated({"REQUESTS_CA_BUNDLE": str(bundle), "PIP_CONFIG_FILE": str(pip_conf), "HOME": str(tmp_path),
                        "XDG_CONFIG_DIRS": str(tmp_path),
                        "PIP_INDEX_URL": "https://index.example/simple", "https_proxy": "http://proxy.example:3128"})
    for name, calls in machines(config).items():
        provisions = {args[0]: options for method, args, options in calls if method == "provision"}
        assert provisions["host-ca"] == {"type": "file", "source": str(bundle), "destination": "/tmp/nftlab-host-ca.pem"}
        assert provisions["install"]["env"] == {
            "NFTLAB_HOST_CA": "/tmp/nftlab-host-ca.pem",
            "PIP_INDEX_URL": "https://index.example/simple",
            "PIP_EXTRA_INDEX_URL": "https://mirror.example/simple",  # the host's own disk is not in the VM
            "PIP_TRUSTED_HOST": "mirror.example",
            "https_proxy": "http://proxy.example:3128",
        }, name
        order = [args[0] for method, args, options in calls if method == "provision"]
        assert order.index("host-ca") < order.index("install")


def test_provisioning_writes_every_pip_setting_the_vagrantfile_can_carry():
    options = re.search(r"PIP_OPTIONS = %w\[([^\]]+)\]", (VAGRANT / "host_settings.rb").read_text()).group(1).split()
    handled = re.search(r"for variable in (PIP_CERT[^;]+);", PROVISION.read_text()).group(1).split()
    assert {"PIP_" + option.upper().replace("-", "_") for option in options} | {"PIP_CERT"} == set(handled)


def test_vm_flows_traces_every_flow_of_the_scenarios():
    names = scenario_names()
    result = subprocess.run([sys.executable, str(VM_FLOWS), "--count", *names], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == sum(len(scenario.flows) for scenario in list_scenarios())


def test_vm_flows_sends_each_flows_traffic_with_the_vms_nftrace():
    sys.path.insert(0, str(VM_FLOWS.parent))
    try:
        import vm_flows
    finally:
        sys.path.remove(str(VM_FLOWS.parent))
    for scenario in list_scenarios():
        for flow in scenario.flows:
            traffic = vm_flows.traffic_argv(flow)
            assert traffic[:3] == ["/nftrace/.venv/bin/python", "-m", "nftrace.lab.traffic"]
            assert traffic[3] in ("tcp", "udp", "icmp"), traffic
            why = vm_flows.why_argv(flow)
            assert why[:5] == ["sudo", "nftrace", "--netns", "nftlab-router", "why"] and "--json" in why
            assert "--" not in why


def test_vm_test_ends_with_the_flow_count_and_cleans_up_on_every_exit():
    script = VM_TEST.read_text()
    assert 'echo "vm lab: $flows_ok of $flows_total flows as expected"' in script
    assert "trap cleanup EXIT" in script
    for signal_trap in ("trap 'exit 130' INT", "trap 'exit 143' TERM", "trap 'exit 129' HUP"):
        assert signal_trap in script
    for cleanup_step in ("vagrant destroy -f", "net-undefine", "net.ipv4.ip_forward=", "LIBVIRT_", "stop_pid"):
        assert cleanup_step in script, cleanup_step
