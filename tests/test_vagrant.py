"""vagrant/: the same lab as three VMs. Vagrant itself is rarely installed where the tests run,
so the files are checked as far as this machine can: Ruby and bash syntax, the Vagrantfile
evaluated against a recording stand-in of Vagrant's API, and agreement with the namespace lab."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess


from conftest import REPO, unavailable
from nftrace.lab.lab import LISTEN_TCP, LISTEN_UDP, scenario_names
from nftrace.lab.topology import CLIENT_V4, ROUTER_CLIENT_V4, ROUTER_SERVER_V4, SERVER_V4

VAGRANT = REPO / "vagrant"
VAGRANTFILE = VAGRANT / "Vagrantfile"
PROVISION = VAGRANT / "provision.sh"

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


def evaluated(env=None) -> dict:
    result = subprocess.run([ruby_or_skip(), "-e", RECORDER, str(VAGRANTFILE)], capture_output=True, text=True,
                            timeout=30, env=dict(os.environ, **(env or {})), cwd=VAGRANT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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
