"""The command line: parse, call one function of the library, render. Nothing else."""

from __future__ import annotations

import functools
import os
import shlex
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import typer

from .errors import InputError, NftraceError
from .signals import Interrupted, SignalsAsExceptions, cleanup_failures

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Why was my packet dropped? Trace a flow through nftables and iptables, rule by rule.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_NO_PACKET = 3
EXIT_BUG = 70  # EX_SOFTWARE: an exception nftrace did not expect
TRACEBACK_ENV = "NFTRACE_TRACEBACK"  # =1: print a bug's traceback too


def _say(err: BaseException, line: str) -> None:
    """The one line, then what went wrong too while nftrace undid its changes (if anything)."""
    typer.echo(f"nftrace: {line}", err=True)
    for note in cleanup_failures(err):
        typer.echo(f"nftrace: {note}", err=True)


def _fail(err: NftraceError) -> None:
    _say(err, str(err))
    raise typer.Exit(err.exit_code)


def _stopped(stop: BaseException, done: Optional[str] = None) -> int:
    """What a stop signal ends with: its line (and what was undone first) and its exit status."""
    signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
    line = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    _say(stop, f"{line}; {done}" if done else line)
    return 128 + signum


def _ctrl_c_is_one_line(command):
    """A Ctrl-C that the command did not handle itself (while it imports what it needs, say)
    ends as every other one: one line and status 130 from `run`. typer would otherwise turn
    it into a silent exit."""

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted(signal.SIGINT) from None

    return guarded


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
    netns: Optional[List[str]] = typer.Option(None, "--netns", metavar="NAME",
                                              help="Work inside /run/netns/NAME (never created); several: one trace across them."),
    pid: Optional[List[str]] = typer.Option(None, "--pid", metavar="PID",
                                            help="The network namespace of process PID (as a --netns)."),
    container: Optional[List[str]] = typer.Option(None, "--container", metavar="NAME|ID",
                                                  help="The network namespace of a running container (docker, podman or containerd)."),
    all_netns: bool = typer.Option(False, "--all-netns", help="Every named namespace and this one."),
):
    from .kernel.netns import NamespaceRequest

    if version:
        from . import __version__

        typer.echo(f"nftrace {__version__}")
        raise typer.Exit(0)
    request = NamespaceRequest(tuple(netns or ()), tuple(pid or ()), tuple(container or ()), all_netns)
    command = ctx.invoked_subcommand
    if command not in (None, "why", "cleanup"):
        if command == "drops" and request.several:  # drops also takes its one namespace from --pid, --container
            _fail(InputError("'drops' works in one namespace: give at most one --netns NAME, --pid PID or "
                             "--container NAME (--all-netns and several namespaces are for 'why' and 'cleanup')"))
        if command != "drops" and (request.several or request.pids or request.containers):
            _fail(InputError(f"'{command}' works in one namespace: give at most one --netns NAME "
                             "(--pid, --container, --all-netns and several --netns are for 'why' and 'cleanup')"))
    ctx.obj = {"netns": request.one_name, "namespaces": request}
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


@app.command(context_settings={"allow_interspersed_args": False})
@_ctrl_c_is_one_line
def why(
    ctx: typer.Context,
    src: str = typer.Option(..., "--from", metavar="ADDR[/LEN]", help="Source address or prefix."),
    dst: str = typer.Option(..., "--to", metavar="ADDR[/LEN]", help="Destination address or prefix."),
    proto: Optional[str] = typer.Option(None, "--proto", help="tcp, udp, icmp, icmpv6 or sctp."),
    sport: Optional[int] = typer.Option(None, "--sport", metavar="N", help="Source port (tcp/udp/sctp)."),
    dport: Optional[int] = typer.Option(None, "--dport", metavar="N", help="Destination port (tcp/udp/sctp)."),
    iif: Optional[str] = typer.Option(None, "--iif", metavar="IF", help="Only packets arriving on this interface."),
    oif: Optional[str] = typer.Option(None, "--oif", metavar="IF", help="Only packets leaving on this interface."),
    count: int = typer.Option(10, "--count", min=0, help="Stop after N traced packets (0: no limit)."),
    timeout: float = typer.Option(60.0, "--timeout", min=0, metavar="SEC", help="Stop after SEC seconds (0: no limit)."),
    max_rate: int = typer.Option(100, "--max-rate", min=0, metavar="PPS", help="Kernel-side limit on traced packets per second (0: no limit)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    color: str = typer.Option("auto", "--color", "--colour", metavar="auto|always|never",
                              help="Colour the answer: on a terminal (auto, off with NO_COLOR), always, or never."),
    drop_reasons: bool = typer.Option(True, "--drop-reasons/--no-drop-reasons",
                                      help="Also say why the kernel dropped a packet after netfilter (eBPF, or bpftrace)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="No live traffic: trace one crafted packet of the flow in a sandbox copy of the namespace, which is never touched."),
    ruleset_file: Optional[Path] = typer.Option(None, "--ruleset", metavar="FILE", help="With --dry-run: load FILE (nft, or iptables-save text) in the sandbox instead of the current ruleset."),
    ruleset_kind: Optional[str] = typer.Option(None, "--ruleset-kind", metavar="KIND", help="With --ruleset: nft, iptables-legacy or iptables-nft (default: guessed from the file)."),
    state: str = typer.Option("new", "--state", metavar="new|established", help="With --dry-run: the packet opens a connection, or belongs to an established one."),
    backend: str = typer.Option("auto", "--backend", metavar="auto|nft|iptables",
                                help="What to trace: nftables (iptables-nft included), legacy iptables, or auto: both where present."),
    fix: Optional[str] = typer.Option(None, "--fix", metavar="accept|drop", help="Also give the smallest change after which this flow gets that verdict, proven in a sandbox copy of the namespace (nothing is applied)."),
    keep: Optional[Path] = typer.Option(None, "--keep", metavar="FILE", help="With --fix: flows that must keep their verdicts (an expectations file, as rules/*.expect.toml)."),
    command: Optional[List[str]] = typer.Argument(None, metavar="[-- COMMAND ARGS...]", help="Traffic to run once tracing is on."),
):
    """Trace the packets of one flow and say which rule decided each one's fate."""
    from .iptables.backends import parse_backend
    from .errors import InputError
    from .flow import parse_flow
    from .trace.jsonstream import JsonStream
    from .trace.colour import Style, colour_wanted, parse_colour_choice
    from .trace.render import dry_run_line, render_closing, render_packet
    from .trace.report import TraceReport, netns_words
    from .trace.session import TraceOptions, TraceSession

    netns, namespaces = ctx.obj["netns"], ctx.obj["namespaces"]
    try:
        flow = parse_flow(src, dst, proto, sport, dport, iif, oif)
        backend = parse_backend(backend)
        style = Style(colour_wanted(parse_colour_choice(color), sys.stdout))
        if not dry_run and (ruleset_file is not None or ruleset_kind is not None or state != "new"):
            raise InputError("--ruleset, --ruleset-kind and --state go with --dry-run")
        if dry_run and (namespaces.several or namespaces.pids or namespaces.containers):
            raise InputError("--dry-run copies one namespace: give one --netns NAME (or none for this one)")
        fixing = None
        if fix is not None or keep is not None:
            from .dryrun.fix import FixRequest, load_keep, parse_fix_verdict

            if fix is None:
                raise InputError("--keep goes with --fix")
            if ruleset_file is not None:
                raise InputError("--fix changes the namespace's current ruleset: it does not go with --ruleset")
            if namespaces.several or namespaces.pids or namespaces.containers:
                raise InputError("--fix changes one namespace's ruleset: give one --netns NAME (or none for this one)")
            fixing = FixRequest(parse_fix_verdict(fix), load_keep(keep), timeout=min(timeout or 10.0, 10.0))
    except NftraceError as err:
        _fail(err)
    options = TraceOptions(flow=flow, netns=netns, count=count, timeout=timeout, max_rate=max_rate,
                           command=list(command or []), drop_reasons=drop_reasons, backend=backend,
                           namespaces=None if dry_run else namespaces)
    report = TraceReport(flow=flow, netns=netns)
    packets = []  # with --fix: the answers get their fix once the trace is over
    fixes = []
    if dry_run:
        from .dryrun.session import DryRunRequest, DryRunSession

        request = DryRunRequest(netns, ruleset_file, ruleset_kind, state)

        def proving(dry):
            from .dryrun.fix import fix_packets

            fixes.extend(fix_packets(packets, flow, fixing, request, dry=dry, interfaces=report.interfaces))
        session = DryRunSession(options, report, request, with_sandbox=proving if fixing is not None else None)
    else:
        session = TraceSession(options, report)
    stream = JsonStream(sys.stdout, report) if as_json else None

    def on_packet(path):
        if fixing is not None:
            packets.append(path)
        if stream:
            if fixing is None:
                stream.packet(path)
        else:
            typer.echo(render_packet(path, report.interfaces, style) + dry_run_line(report) + "\n", color=style.enabled)

    def on_ready():
        # On stderr in every mode: scripts reading --json can wait for it before sending traffic.
        # A dry run takes a moment; its answer says it is one.
        if dry_run:
            return
        named = [netns_words(label) for label in report.namespaces if label is not None or len(report.namespaces) > 1]
        where = f" in {', '.join(named)}" if named else ""
        typer.echo(f"tracing {flow.describe()}{where} (Ctrl-C to stop)", err=True)

    # A live trace flushes JSON once per batch of events read; a dry run's one answer is
    # flushed when the document is finished.
    batches = {"on_batch": stream.flush} if stream and not dry_run else {}
    exit_code, _ = _run_session(lambda: session.run(on_packet, on_ready, **batches), stream)
    if fixing is not None and exit_code is None and packets and not dry_run:
        exit_code = _prove_live_fix(packets, flow, fixing, netns, report, fixes)
    if stream:
        for path in packets:
            stream.packet(path)
        stream.finish()
    else:
        if fixes:
            from .dryrun.fix import render_fix

            typer.echo("\n\n".join(render_fix(answer) for answer in fixes))
        closing = render_closing(report, session.packets_seen)
        if closing:
            typer.echo(closing, err=True)
    if exit_code is None:
        exit_code = 0 if session.packets_seen else EXIT_NO_PACKET
    raise typer.Exit(exit_code)


def _run_session(run: Callable[[], None], stream) -> tuple[Optional[int], bool]:
    """Run a live session. An error once output has started, Ctrl-C or a signal ends it with
    one line on stderr (the rules are removed by then); returns the exit status it calls for
    (None: the run ended by itself) and whether the user stopped it."""
    try:
        run()
    except NftraceError as err:
        if not (stream and stream.started):
            _fail(err)
        _say(err, str(err))
        return err.exit_code, False
    except (KeyboardInterrupt, Interrupted) as stop:
        return _stopped(stop, "trace rules removed"), True
    return None, False


def _prove_live_fix(packets, flow, fixing, netns, report, fixes) -> Optional[int]:
    """--fix after a live trace: the change is proven in sandbox copies of the namespace. A
    failure there is one line; the answers are still printed."""
    from .dryrun.fix import fix_packets
    from .dryrun.session import DryRunRequest

    try:
        with SignalsAsExceptions():
            fixes.extend(fix_packets(packets, flow, fixing, DryRunRequest(netns), interfaces=report.interfaces))
    except NftraceError as err:
        _say(err, f"--fix: {err}")
        return err.exit_code
    except (KeyboardInterrupt, Interrupted) as stop:
        return _stopped(stop, "sandbox removed")
    return None


@app.command()
@_ctrl_c_is_one_line
def drops(
    ctx: typer.Context,
    src: Optional[str] = typer.Option(None, "--from", metavar="ADDR[/LEN]", help="Only packets from this address or prefix."),
    dst: Optional[str] = typer.Option(None, "--to", metavar="ADDR[/LEN]", help="Only packets to this address or prefix."),
    proto: Optional[str] = typer.Option(None, "--proto", help="tcp, udp, icmp, icmpv6 or sctp."),
    sport: Optional[int] = typer.Option(None, "--sport", metavar="N", help="Source port (tcp/udp/sctp)."),
    dport: Optional[int] = typer.Option(None, "--dport", metavar="N", help="Destination port (tcp/udp/sctp)."),
    iif: Optional[str] = typer.Option(None, "--iif", metavar="IF", help="Only packets arriving on this interface."),
    oif: Optional[str] = typer.Option(None, "--oif", metavar="IF", help="Only packets leaving on this interface."),
    duration: float = typer.Option(0.0, "--duration", min=0, metavar="SEC", help="Stop after SEC seconds (0: at Ctrl-C)."),
    max_rate: int = typer.Option(100, "--max-rate", min=0, metavar="PPS", help="Kernel-side limit on traced packets per second (0: no limit)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    drop_reasons: bool = typer.Option(True, "--drop-reasons/--no-drop-reasons",
                                      help="Also count packets the kernel dropped after netfilter, by reason (eBPF, or bpftrace)."),
):
    """What is this firewall dropping right now? Every dropping rule, with counts and flows."""
    from .drops.render import CLEAR, LiveTable, drop_line, render_summary
    from .drops.report import DropsReport
    from .drops.run import DropsSession
    from .flow import parse_filter
    from .trace.jsonstream import JsonStream
    from .trace.report import netns_words
    from .trace.session import TraceOptions
    import shutil
    import time

    netns = ctx.obj["netns"]
    try:
        flow = parse_filter(src, dst, proto, sport, dport, iif, oif)
    except NftraceError as err:
        _fail(err)
    options = TraceOptions(flow=flow, netns=netns, count=0, timeout=duration, max_rate=max_rate,
                           drop_reasons=drop_reasons, namespaces=ctx.obj["namespaces"])
    report = DropsReport(flow=flow, netns=netns, max_rate=max_rate)
    session = DropsSession(options, report)
    stream = JsonStream(sys.stdout, report) if as_json else None
    live = None if as_json or not sys.stdout.isatty() else LiveTable(report, *shutil.get_terminal_size())
    refreshed = [0.0]

    def on_drop(path):
        if stream:
            stream.packet(path)
        elif live is None:
            typer.echo(drop_line(path, report.interfaces))

    def on_batch():
        if stream:
            stream.flush()
        elif live is not None:
            now = time.monotonic()
            if now - refreshed[0] >= 1.0 and session.started is not None:
                refreshed[0] = now
                sys.stdout.write(CLEAR + live.render(now, now - session.started) + "\n")
                sys.stdout.flush()
        else:
            sys.stdout.flush()

    def on_ready():
        where = f" in {netns_words(report.netns)}" if report.netns else ""  # as --pid or --container named it
        limit = f"at most {max_rate} packets/s" if max_rate else "every packet"
        typer.echo(f"watching drops of {flow.describe()}{where}, tracing {limit} (Ctrl-C to stop)", err=True)

    # Ctrl-C and SIGTERM are how a watch ends: the summary follows, and the status is 0.
    exit_code, stopped = _run_session(lambda: session.run(on_drop, on_ready, on_batch), stream)
    if stopped:
        exit_code = 0
    note = report.sample_note()
    if stream and note:
        report.warnings.append(note)  # the text summary says it in its own line
    if stream:
        stream.finish()
    else:
        if live is not None:
            sys.stdout.write(CLEAR)
        typer.echo(render_summary(report))
    raise typer.Exit(exit_code or 0)


@app.command()
@_ctrl_c_is_one_line
def cleanup(ctx: typer.Context):
    """Remove what killed nftrace runs left behind (only nftrace's own, never anything else)."""
    from .iptables.backends import clean_up_legacy
    from .errors import EnvironmentProblem
    from .dryrun.sandbox import remove_leftover_sandboxes
    from .trace.session import open_nftables
    from .trace.report import netns_words
    from .trace.ruleset import RulesetSnapshot
    from .kernel.system import enter_namespace_fd, require_net_admin
    from .kernel.tracetable import remove_leftover_tables

    removed = []
    try:
        require_net_admin()
        sandboxes = remove_leftover_sandboxes()
        targets = ctx.obj["namespaces"].resolve()
        try:
            several = len(targets.targets) > 1
            for target in targets.targets:
                # One namespace after the other, nftrace's own thread in each: the leftovers of
                # legacy iptables are found by the namespace the process is in.
                enter_namespace_fd(target.fd, target.shown)
                where = f" in {netns_words(target.label)}" if several else ""
                try:
                    nft = open_nftables()
                except EnvironmentProblem:
                    nft = None  # no nf_tables here: nothing of nftrace's can be in it
                if nft is not None:
                    removed.extend(f"removed table {item}{where}"
                                   for item in remove_leftover_tables(nft, RulesetSnapshot.take(nft)))
                removed.extend(f"{item}{where}" for item in clean_up_legacy())
        finally:
            targets.close()
    except NftraceError as err:
        _fail(err)
    for name in sandboxes:
        typer.echo(f"removed dry-run sandbox namespace {name}")
    for item in removed:
        typer.echo(item)
    if not removed and not sandboxes:
        typer.echo("nothing to clean up")


lab_app = typer.Typer(
    no_args_is_help=True,
    help="A client, a router and a server in network namespaces; a rules/ scenario on the router.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(lab_app, name="lab")


def _lab(ctx: typer.Context, command: str, prefix: Optional[str]):
    from .lab.lab import LAB_PREFIX, Lab

    try:
        if ctx.obj and ctx.obj.get("netns"):
            raise InputError(f"--netns does not apply to 'lab {command}': the lab makes its own namespaces")
        return Lab(prefix or LAB_PREFIX)
    except NftraceError as err:
        _fail(err)


@lab_app.command("up")
@_ctrl_c_is_one_line
def lab_up(
    ctx: typer.Context,
    named: Optional[str] = typer.Argument(None, metavar="SCENARIO", help="The scenario, as --scenario names it.", show_default=False),
    scenario: Optional[str] = typer.Option(None, "--scenario", metavar="NAME", help="A rules/ scenario (default: host-firewall)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", metavar="NAME", help="Namespaces NAME-client, -router, -server (default: nftlab)."),
    listen_seconds: Optional[float] = typer.Option(None, "--listen-seconds", min=1, metavar="SEC", help="The server's listeners end after SEC seconds (default: 8 hours)."),
):
    """Build the lab (or leave it as it is) and load the scenario on the router."""
    from .lab.lab import DEFAULT_SCENARIO, LISTEN_SECONDS, find_scenario, render_status, require_root

    lab = _lab(ctx, "up", prefix)
    try:
        if named and scenario and named != scenario:
            raise InputError(f"two scenarios given ({named} and --scenario {scenario}): give one")
        require_root()
        with SignalsAsExceptions():
            done = lab.up(find_scenario(named or scenario or DEFAULT_SCENARIO),
                          listen_seconds=listen_seconds or LISTEN_SECONDS)
        status = lab.status()
    except NftraceError as err:
        _fail(err)
    for line in done or [f"lab {lab.prefix} is already up with scenario {status.state.scenario}: nothing to do"]:
        typer.echo(line, err=True)
    typer.echo(render_status(status))


@lab_app.command("down")
@_ctrl_c_is_one_line
def lab_down(
    ctx: typer.Context,
    prefix: Optional[str] = typer.Option(None, "--prefix", metavar="NAME", help="The lab's name (default: nftlab)."),
):
    """Remove everything `lab up` made: listeners, namespaces, state."""
    lab = _lab(ctx, "down", prefix)
    try:
        with SignalsAsExceptions():
            removed = lab.down()
    except NftraceError as err:
        _fail(err)
    for item in removed:
        typer.echo(f"removed {item}")
    if not removed:
        typer.echo("nothing to remove")


@lab_app.command("status")
@_ctrl_c_is_one_line
def lab_status(
    ctx: typer.Context,
    prefix: Optional[str] = typer.Option(None, "--prefix", metavar="NAME", help="The lab's name (default: nftlab)."),
):
    """Say whether the lab is up, which scenario it runs, and what to try. Exit 3 when it is not up."""
    from .lab.lab import render_status, scenario_names

    lab = _lab(ctx, "status", prefix)
    try:
        status = lab.status()
    except NftraceError as err:
        _fail(err)
    typer.echo(render_status(status, scenario_names()))
    raise typer.Exit(0 if status.up else EXIT_NO_PACKET)


@lab_app.command("load")
@_ctrl_c_is_one_line
def lab_load(
    ctx: typer.Context,
    scenario: str = typer.Argument(..., metavar="SCENARIO", help="A rules/ scenario name."),
):
    """Replace the ruleset of the namespace given with --netns by a scenario's (the Vagrant lab uses it)."""
    from .lab.lab import find_scenario, load_scenario, require_root

    netns = ctx.obj["netns"] if ctx.obj else None
    try:
        if not netns:
            raise InputError("lab load replaces a whole ruleset: say where with --netns NAME (never this machine's own)")
        require_root()
        chosen = find_scenario(scenario)
        load_scenario(chosen, netns)
    except NftraceError as err:
        _fail(err)
    typer.echo(f"loaded scenario {chosen.name} ({chosen.ruleset.name}, {chosen.kind}) into {netns}")


@app.command()
@_ctrl_c_is_one_line
def demo(ctx: typer.Context):
    """Build a lab, trace four flows (accepted, dropped by a rule, by a policy, NATed), remove the lab."""
    from .lab.demo import run_demo

    if ctx.obj and ctx.obj.get("netns"):
        _fail(InputError("--netns does not apply to 'demo': it makes its own namespaces"))
    try:
        code = run_demo()
    except NftraceError as err:
        _fail(err)
    raise typer.Exit(code)


@app.command("test")
@_ctrl_c_is_one_line
def test_command(
    ctx: typer.Context,
    files: List[Path] = typer.Argument(..., metavar="FILE...", help="Expectation files (the format of rules/*.expect.toml)."),
    ruleset_file: Optional[Path] = typer.Option(None, "--ruleset", metavar="FILE", help="Test every flow against FILE instead of the ruleset each expectation file names."),
    ruleset_kind: Optional[str] = typer.Option(None, "--ruleset-kind", metavar="KIND", help="With --ruleset: nft, iptables-legacy or iptables-nft (default: guessed from the file)."),
    current: bool = typer.Option(False, "--current", help="Test against the namespace's current ruleset."),
    lab: bool = typer.Option(False, "--lab", help="Copy a fresh lab router (client, router, server as in rules/) instead of a namespace."),
    junit: Optional[Path] = typer.Option(None, "--junit", metavar="FILE", help="Also write a JUnit XML report to FILE."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, metavar="SEC", help="Give up on a flow after SEC seconds."),
):
    """Firewall regression tests: every flow a dry run; exit 1 if any verdict or deciding rule differs."""
    from .dryrun.testing import load_all, render_table, junit_xml

    netns = ctx.obj["netns"]
    try:
        if lab and netns:
            raise InputError("--lab and --netns exclude each other")
        if current and ruleset_file is not None:
            raise InputError("--current and --ruleset exclude each other")
        expectation_files = load_all(files)
    except NftraceError as err:
        _fail(err)
    try:
        with SignalsAsExceptions():
            results = _run_tests(expectation_files, netns, lab, ruleset_file, ruleset_kind, current, timeout)
        if junit is not None:
            try:
                junit.write_text(junit_xml(results))
            except OSError as err:
                raise InputError(f"--junit: cannot write {junit}: {err.strerror}") from None
    except NftraceError as err:
        _fail(err)
    typer.echo(render_table(results))
    raise typer.Exit(0 if all(result.passed for result in results) else 1)


def _run_tests(expectation_files, netns, lab, ruleset_file, ruleset_kind, current, timeout) -> list:
    """Every flow of every file, in a copy of the namespace or of a fresh lab router."""
    from .dryrun.testing import run_files
    from .signals import UndoStack

    if lab:
        from .lab.topology import Topology
        from .dryrun.sandbox import sandbox_name

        with UndoStack() as undo:
            topology = Topology(f"{sandbox_name()}-lab")
            undo.callback(topology.down)
            topology.up()
            return run_files(expectation_files, topology.router, ruleset=ruleset_file, ruleset_kind=ruleset_kind,
                             current=current, timeout=timeout)
    return run_files(expectation_files, netns, ruleset=ruleset_file, ruleset_kind=ruleset_kind, current=current,
                     timeout=timeout)


def report_bug(err: Exception) -> str:
    """The one line for an exception nftrace did not expect (a bug), with where its traceback
    went: a file of its own (the line stays one line), or stderr when NFTRACE_TRACEBACK=1."""
    from . import __version__

    text = "".join(traceback.format_exception(err))
    first_line = next(iter(str(err).splitlines()), "")
    what = f"nftrace: internal error: {type(err).__name__}" + (f": {first_line}" if first_line else "")
    if os.environ.get(TRACEBACK_ENV) == "1":
        sys.stderr.write(text)
        return what
    report = (f"nftrace {__version__}, Python {sys.version.split()[0]}\n"
              f"command: {shlex.join(['nftrace', *sys.argv[1:]])}\n\n{text}")
    try:
        descriptor, path = tempfile.mkstemp(prefix="nftrace-traceback-", suffix=".txt")
        with os.fdopen(descriptor, "w") as file:
            file.write(report)
    except OSError as write_error:
        return f"{what} (a bug; the traceback could not be written: {write_error.strerror}; {TRACEBACK_ENV}=1 shows it)"
    return f"{what} (a bug; traceback in {path})"


def run() -> None:
    """Entry point: every ending is one line on stderr at most. Usage errors exit 2 like every
    other bad input; Ctrl-C 130 wherever it comes; an unexpected exception, a bug, exits 70
    with its traceback in a file, after every `finally` has undone what the run changed.

    Stop signals are exceptions from here to the exit, and only the first one counts: a second
    one while the first one's cleanup or exit message is under way changes nothing.
    """
    try:
        with SignalsAsExceptions(until_exit=True):
            try:
                result = app(standalone_mode=False)
            except typer.TyperException as err:  # usage errors (typer >= 0.28 derives them all from it)
                typer.echo(f"nftrace: {err.format_message()}", err=True)
                sys.exit(2)
            except (typer.Abort, KeyboardInterrupt, Interrupted) as stop:
                sys.exit(_stopped(stop))
            except typer.Exit as done:
                sys.exit(done.exit_code)
            except Exception as err:  # noqa: BLE001 - a bug: one line, not a screen of traceback
                typer.echo(report_bug(err), err=True)
                for note in cleanup_failures(err):
                    typer.echo(f"nftrace: {note}", err=True)
                sys.exit(EXIT_BUG)
            sys.exit(result if isinstance(result, int) else 0)
    except (KeyboardInterrupt, Interrupted) as stop:
        # A stop signal as the run ended, everything already undone (SignalsAsExceptions).
        sys.exit(_stopped(stop))
