"""Bad input and a bad environment: one line on stderr, exit status 2, nothing installed.

The line starts with `nftrace: ` and names what to fix; there is never a traceback, and
stdout stays empty so that a script reading `--json` sees no half document.
"""

from __future__ import annotations

import os
import textwrap

import pytest

from conftest import REPO, load_ruleset, nftrace, ruleset_state, without_admin_rights

FLOW = ["--from", "10.0.0.5", "--to", "10.0.0.9"]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nftrace: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--from", "10.0.0.256", "--to", "10.0.0.9"], "--from: '10.0.0.256' is not an IP address"),
        (["--from", "10.0.0.5", "--to", "example.com"], "--to: 'example.com' is not an IP address"),
        (["--from", "10.0.0.5", "--to", "fd00::9"], "one flow has one family"),
        ([*FLOW, "--proto", "tcp", "--dport", "70000"], "--dport: port 70000 is out of range 1-65535"),
        ([*FLOW, "--proto", "tcp", "--sport", "0"], "--sport: port 0 is out of range"),
        ([*FLOW, "--proto", "tcp", "--dport", "ssh"], "--dport"),
        ([*FLOW, "--dport", "22"], "--sport/--dport need --proto tcp, udp or sctp"),
        ([*FLOW, "--proto", "icmp", "--dport", "22"], "--sport/--dport need --proto tcp, udp or sctp"),
        ([*FLOW, "--proto", "ospf"], "--proto: 'ospf' is not one of"),
        ([*FLOW, "--count", "-1"], "--count"),
        (["--from", "10.0.0.5"], "Missing option '--to'"),
    ],
)
def test_bad_flow_is_refused_before_anything_happens(args, fragment):
    assert_one_line_error(nftrace("why", *args), fragment)


def test_unknown_subcommand_is_one_line():
    assert_one_line_error(nftrace("trace"), "No such command")


@pytest.mark.kernel
def test_unknown_namespace_is_an_error_and_is_never_created():
    name = f"nftrace-absent-{os.getpid()}"
    assert_one_line_error(nftrace("--netns", name, "why", *FLOW), f"network namespace '{name}' does not exist")
    assert not os.path.exists(f"/run/netns/{name}")


@pytest.mark.kernel
def test_unknown_interface_is_an_error_and_nothing_is_installed(netns):
    ns = netns()
    load_ruleset(ns, "table inet keep {\n chain input { type filter hook input priority 0; }\n}\n")
    before = ruleset_state(ns)
    assert_one_line_error(nftrace("--netns", ns, "why", *FLOW, "--iif", "eth7"), "--iif: no interface 'eth7'")
    assert ruleset_state(ns) == before


@pytest.mark.kernel
def test_without_root_rights_the_error_says_so(netns):
    ns = netns()
    result = nftrace("--netns", ns, "why", *FLOW, wrapper=without_admin_rights())
    assert_one_line_error(result, "needs root (CAP_NET_ADMIN)")
    assert ruleset_state(ns) == ""


def test_a_bug_is_one_line_that_says_where_the_traceback_is(tmp_path):
    # sitecustomize runs in the nftrace process: it breaks the flow parser, as a bug would.
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import nftrace.flow
        def broken(*args):
            raise RuntimeError("injected fault\\nwith a second line")
        nftrace.flow.parse_flow = broken
    """))
    result = nftrace("why", *FLOW, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "TMPDIR": str(tmp_path)})
    assert result.returncode == 70 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    (written,) = tmp_path.glob("nftrace-traceback-*.txt")
    assert line == f"nftrace: internal error: RuntimeError: injected fault (a bug; traceback in {written})"
    traceback = written.read_text()
    assert "Traceback (most recent call last)" in traceback and "in broken" in traceback
    assert "nftrace why --from 10.0.0.5" in traceback


def test_a_bugs_traceback_is_shown_on_request(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import nftrace.flow\nnftrace.flow.parse_flow = None\n")
    result = nftrace("why", *FLOW, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "TMPDIR": str(tmp_path),
                                         "NFTRACE_TRACEBACK": "1"})
    assert result.returncode == 70
    assert result.stderr.startswith("Traceback (most recent call last)")
    assert result.stderr.splitlines()[-1] == "nftrace: internal error: TypeError: 'NoneType' object is not callable"
    assert not list(tmp_path.glob("nftrace-traceback-*"))


# Modules imported while the command line starts (typer), and while `why` starts (its session).
@pytest.mark.parametrize("module", ["typer", "nftrace.trace.session"])
def test_ctrl_c_while_python_imports_is_the_same_one_line(tmp_path, module):
    # A Ctrl-C that arrives exactly while `module` is being imported: the process sends itself
    # SIGINT from inside the import system.
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os, signal, sys
        class CtrlC:
            def find_spec(self, name, path=None, target=None):
                if name == {module!r}:
                    sys.meta_path.remove(self)
                    os.kill(os.getpid(), signal.SIGINT)
                return None
        sys.meta_path.insert(0, CtrlC())
    """))
    result = nftrace("why", *FLOW, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert (result.returncode, result.stderr, result.stdout) == (130, "nftrace: interrupted\n", "")


@pytest.fixture
def fake_nftables(tmp_path):
    """A directory to put first on PYTHONPATH with a stand-in for Debian's nftables bindings."""

    def make(source: str) -> dict:
        (tmp_path / "nftables.py").write_text(textwrap.dedent(source))
        return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    return make


@pytest.mark.kernel
def test_missing_nftables_bindings_name_the_package_to_install(netns, fake_nftables):
    env = fake_nftables("raise ImportError('No module named nftables')\n")
    ns = netns()
    assert_one_line_error(nftrace("--netns", ns, "why", *FLOW, env=env), "apt-get install python3-nftables")


@pytest.mark.kernel
def test_kernel_without_nf_tables_is_a_clear_error(netns, fake_nftables):
    # The one environment this machine cannot provide: libnftables answering as it does on a
    # kernel built without nf_tables.
    env = fake_nftables(
        """
        class Nftables:
            def __getattr__(self, name):
                return lambda *args: None
            def cmd(self, command):
                return 1, "", "Error: Could not process rule: Operation not supported\\n"
        """
    )
    ns = netns()
    assert_one_line_error(nftrace("--netns", ns, "why", *FLOW, env=env), "nf_tables is not available")
