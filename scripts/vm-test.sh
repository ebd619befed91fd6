#!/usr/bin/env bash
# The lab VMs, booted for real: vagrant/ proven end to end, as root, with libvirt.
#
#   sudo scripts/vm-test.sh [--all | SCENARIO...]     (default: $NFTLAB_SCENARIO, else host-firewall)
#
# 1. installs what it needs (Vagrant, vagrant-libvirt, libvirt, QEMU, debootstrap ...);
# 2. starts virtlogd and libvirtd if they are not running (by hand: no systemd needed);
# 3. builds the Debian 12 box with vagrant/build-box.sh if it is not there (NFTLAB_BOX names
#    another box, debian/bookworm64 say, which Vagrant then downloads);
# 4. brings up the three VMs (vagrant/Vagrantfile) with the first scenario on the firewall;
# 5. traces every flow of each scenario's rules/NAME.expect.toml with real traffic between the
#    VMs, through `nftrace why --json` on the firewall VM (scripts/vm_flows.py), and checks
#    verdict and deciding rule; runs `nftrace demo` inside the firewall VM;
# 6. on every exit path (normal, error, Ctrl-C, SIGTERM, SIGHUP): destroys the VMs, removes the
#    libvirt networks it made, stops the daemons it started, puts back the root namespace's
#    forwarding sysctls and removes the LIBVIRT_* chains libvirt left there.
#
# The last line is `vm lab: N of M flows as expected`; exit status 0 only when all M flows
# were as expected, the demo ran and everything was removed. Without hardware virtualisation,
# libvirt runs the VMs under software emulation (see vagrant/README.md): slower, same result.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VAGRANT_DIR="$REPO/vagrant"
DEFAULT_BOX=nftlab/bookworm64     # what vagrant/build-box.sh builds
export NFTLAB_BOX=${NFTLAB_BOX:-$DEFAULT_BOX}
VMS=(client firewall server)
# vagrant/Vagrantfile's names: domains nftlab-NAME, the lab's two networks, and the
# management network vagrant-libvirt makes for every machine.
DOMAIN_PREFIX=nftlab-
LAB_NETWORKS=(nftlab-client-side nftlab-server-side vagrant-libvirt)
VIRSH=(virsh -q -c qemu:///system)
PACKAGES=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
          dnsmasq-base iptables ebtables openssh-client rsync python3 debootstrap extlinux
          syslinux-common fdisk)
# Time limits, generous: under software emulation, on a host shared with other work.
UP_SECONDS=2700
FLOW_SECONDS_EACH=180
DEMO_SECONDS=600
DESTROY_SECONDS=600

die() { echo "vm-test.sh: $*" >&2; exit 2; }
say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# --- what to run --------------------------------------------------------------------------------
scenarios=()
for arg in "$@"; do
    case "$arg" in
        --all) mapfile -t scenarios < <(cd "$REPO/rules" && ls -- *.expect.toml | sed 's/\.expect\.toml$//') ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $arg (usage: vm-test.sh [--all | SCENARIO...])" ;;
        *) scenarios+=("$arg") ;;
    esac
done
[ "${#scenarios[@]}" -gt 0 ] || scenarios=("${NFTLAB_SCENARIO:-host-firewall}")
for scenario in "${scenarios[@]}"; do
    [ -f "$REPO/rules/$scenario.expect.toml" ] || die "no scenario $scenario in rules/"
done
# The firewall is provisioned with the first; the others are loaded into it in turn.
export NFTLAB_SCENARIO=${scenarios[0]}
[ "$(id -u)" -eq 0 ] || die "run as root (libvirt, the box build, the root namespace's sysctls)"

# --- state that the cleanup reads ------------------------------------------------------------------
WORK=$(mktemp -d /tmp/nftlab-vm-test.XXXXXX)
# Vagrant's machine state for this run only: a lab the user keeps in vagrant/.vagrant is not ours.
export VAGRANT_DOTFILE_PATH="$WORK/dot-vagrant"
SSH_CONFIG="$WORK/ssh_config"
RESULT="$WORK/result"
child=""             # the long command running now (timeout's pid, leader of its process group)
started_daemons=()   # "name pid" of the daemons this run started
made_vms=0           # set once the VMs may exist: only then does the cleanup destroy them
networks_before=""   # libvirt networks defined before this run, when libvirtd was already up
forwarding_before="" # "v4 v6" forwarding sysctls of the root namespace
nft_tables_before="" # nftables tables of the root namespace
flows_ok=0
flows_total=0
run_status=1         # 0 once flows and demo are all as expected

# run_bounded SECONDS LOG COMMAND...: COMMAND in the background under `timeout` (its own process
# group, so that the cleanup can stop all of it), so that a signal to this script is handled now,
# not when COMMAND ends. LOG "-" means the terminal.
run_bounded() {
    local seconds=$1 log=$2 status=0
    shift 2
    if [ "$log" = - ]; then
        timeout -k 60 "$seconds" "$@" &
    else
        timeout -k 60 "$seconds" "$@" >"$log" 2>&1 &
    fi
    child=$!
    wait "$child" || status=$?
    child=""
    return "$status"
}

# Vagrant's log without its progress bars, last lines: what to read when a step failed.
show_log() {
    echo "--- last lines of $1:" >&2
    tr '\r' '\n' <"$1" | grep -v -e '^\s*$' -e 'Progress:' | tail -n "${2:-30}" >&2
}

pid_of() { local pid; pid=$(cat "$1" 2>/dev/null) || return 1; kill -0 "$pid" 2>/dev/null && echo "$pid"; }

# Stop what this run started, by pid, and wait (bounded) until it is gone.
stop_pid() {
    local pid=$1 tries
    kill -TERM "$pid" 2>/dev/null || return 0
    for tries in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || :
}

vagrant_in_lab() { (cd "$VAGRANT_DIR" && vagrant "$@"); }

# LIBVIRT_* chains and the rules jumping to them, in every root-namespace nftables table
# (libvirt 9 writes them with iptables, iptables-nft here); then the tables libvirt created
# and left empty.
remove_libvirt_chains() {
    local family table chain handle
    while read -r family table; do
        for chain in $(nft list table "$family" "$table" 2>/dev/null | awk '$1 == "chain" && $2 ~ /^LIBVIRT_/ {print $2}'); do
            # Every rule that jumps there, by handle, wherever it is in the table.
            nft -a list table "$family" "$table" | awk -v target="$chain" '
                $1 == "chain" { current = $2 }
                $0 ~ ("(jump|goto) " target "( |$)") { print current, $NF }' |
            while read -r from handle; do
                nft delete rule "$family" "$table" "$from" handle "$handle"
            done
        done
        for chain in $(nft list table "$family" "$table" 2>/dev/null | awk '$1 == "chain" && $2 ~ /^LIBVIRT_/ {print $2}'); do
            nft flush chain "$family" "$table" "$chain"
            nft delete chain "$family" "$table" "$chain"
        done
        # A table that was not there before and now holds no rule: libvirt's, empty.
        if ! grep -qx "table $family $table" <<<"$nft_tables_before" &&
            ! nft list table "$family" "$table" | grep -qvE '^\s*(table|chain|type|policy|\}|$)'; then
            nft delete table "$family" "$table"
        fi
    done < <(nft list tables | awk '$1 == "table" && ($2 == "ip" || $2 == "ip6") {print $2, $3}')
}

cleanup() {
    local status=$? name line i cleanup_ok=1
    trap '' INT TERM HUP   # the cleanup itself is not interrupted
    set +e                 # and goes on past a step that fails, to the next
    if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
        say "stopping the running step"
        kill -TERM "$child" 2>/dev/null || :
        wait "$child" 2>/dev/null || :   # timeout -k ends it for sure within 60 s
    fi
    if [ -f "$SSH_CONFIG" ]; then
        for name in "${VMS[@]}"; do
            timeout 10 ssh -F "$SSH_CONFIG" -O exit "$name" >/dev/null 2>&1 || :
        done
    fi
    if [ "$made_vms" -eq 1 ]; then
        say "destroying the VMs"
        timeout -k 30 "$DESTROY_SECONDS" bash -c 'cd "$1" && vagrant destroy -f' _ "$VAGRANT_DIR" \
            >"$WORK/destroy.log" 2>&1 || { show_log "$WORK/destroy.log" 10; }
        # Whatever Vagrant could not remove (a half-made VM, a timed-out destroy), by name.
        for name in "${VMS[@]}"; do
            if "${VIRSH[@]}" dominfo "$DOMAIN_PREFIX$name" >/dev/null 2>&1; then
                "${VIRSH[@]}" destroy "$DOMAIN_PREFIX$name" >/dev/null 2>&1 || :
                "${VIRSH[@]}" undefine --remove-all-storage "$DOMAIN_PREFIX$name" >/dev/null 2>&1 || cleanup_ok=0
            fi
        done
        # A disk made just before the run was stopped, for a domain not defined yet: no domain
        # takes it with it. The names are the lab's (checked free at the start).
        for name in "${VMS[@]}"; do
            if "${VIRSH[@]}" vol-info --pool default "$DOMAIN_PREFIX$name.img" >/dev/null 2>&1; then
                "${VIRSH[@]}" vol-delete --pool default "$DOMAIN_PREFIX$name.img" >/dev/null 2>&1 || cleanup_ok=0
            fi
        done
        for name in "${LAB_NETWORKS[@]}"; do
            if "${VIRSH[@]}" net-info "$name" >/dev/null 2>&1 && ! grep -qx "$name" <<<"$networks_before"; then
                "${VIRSH[@]}" net-destroy "$name" >/dev/null 2>&1 || :
                "${VIRSH[@]}" net-undefine "$name" >/dev/null 2>&1 || cleanup_ok=0
            fi
        done
    fi
    # Daemons this run started: any network still active is theirs (libvirt keeps bridges and
    # dnsmasq running after libvirtd exits), then the daemons themselves.
    for line in "${started_daemons[@]}"; do
        if [ "${line% *}" = libvirtd ]; then
            for name in $("${VIRSH[@]}" net-list --name 2>/dev/null); do
                "${VIRSH[@]}" net-destroy "$name" >/dev/null 2>&1 || cleanup_ok=0
            done
        fi
    done
    for ((i = ${#started_daemons[@]} - 1; i >= 0; i--)); do
        line=${started_daemons[$i]}
        say "stopping ${line% *} (pid ${line#* })"
        stop_pid "${line#* }"
    done
    if [ -n "$forwarding_before" ]; then
        sysctl -qw "net.ipv4.ip_forward=${forwarding_before% *}" "net.ipv6.conf.all.forwarding=${forwarding_before#* }" \
            || cleanup_ok=0
    fi
    if [ "${#started_daemons[@]}" -gt 0 ] && command -v nft >/dev/null; then
        remove_libvirt_chains || cleanup_ok=0
        if [ "$(nft list tables)" != "$nft_tables_before" ]; then
            echo "vm-test.sh: the root namespace's nftables tables differ from before the run:" >&2
            diff <(echo "$nft_tables_before") <(nft list tables) >&2 || :
            cleanup_ok=0
        fi
    fi
    for name in "${VMS[@]}"; do
        if "${VIRSH[@]}" dominfo "$DOMAIN_PREFIX$name" >/dev/null 2>&1; then
            echo "vm-test.sh: VM $DOMAIN_PREFIX$name is still there" >&2
            cleanup_ok=0
        fi
    done
    rm -rf "$WORK"
    [ "$cleanup_ok" -eq 1 ] || echo "vm-test.sh: the cleanup was incomplete (see above)" >&2
    say "done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
    echo "vm lab: $flows_ok of $flows_total flows as expected"
    if [ "$status" -eq 0 ] && { [ "$run_status" -ne 0 ] || [ "$cleanup_ok" -ne 1 ]; }; then
        status=1
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

flows_total=$(python3 "$REPO/scripts/vm_flows.py" --count "${scenarios[@]}")
say "vm-test: scenarios ${scenarios[*]} ($flows_total flows), box $NFTLAB_BOX"

# --- 1. packages ---------------------------------------------------------------------------------
missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    # --no-install-recommends: libvirt would otherwise bring a desktop's worth of extras.
    DEBIAN_FRONTEND=noninteractive run_bounded 1800 "$WORK/apt.log" \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" || { show_log "$WORK/apt.log"; die "apt-get install failed"; }
fi

# --- 2. libvirt's daemons --------------------------------------------------------------------------
forwarding_before="$(sysctl -n net.ipv4.ip_forward) $(sysctl -n net.ipv6.conf.all.forwarding)"
nft_tables_before=$(nft list tables 2>/dev/null || :)
# No systemd here to start them on demand: each is started by hand, as a daemon, if its pid
# file names no live process, and remembered so that the cleanup stops it.
mkdir -p /run/libvirt
for daemon in virtlogd libvirtd; do
    if pid=$(pid_of "/run/$daemon.pid"); then
        say "$daemon is running already (pid $pid): left alone"
        continue
    fi
    "$daemon" -d
    for _ in $(seq 100); do
        pid=$(pid_of "/run/$daemon.pid") && break
        sleep 0.1
    done
    [ -n "${pid:-}" ] || die "$daemon did not start"
    started_daemons+=("$daemon $pid")
    say "started $daemon (pid $pid)"
done
for _ in $(seq 100); do
    "${VIRSH[@]}" version >/dev/null 2>&1 && break
    sleep 0.2
done
"${VIRSH[@]}" version >/dev/null 2>&1 || die "libvirtd does not answer on qemu:///system"
networks_before=$("${VIRSH[@]}" net-list --all --name)

# The lab's names must be free: a lab someone keeps up is not ours to destroy.
for name in "${VMS[@]}"; do
    if "${VIRSH[@]}" dominfo "$DOMAIN_PREFIX$name" >/dev/null 2>&1; then
        die "a VM $DOMAIN_PREFIX$name exists already (a lab of yours? 'cd vagrant && vagrant destroy -f')"
    fi
done
for name in "${VMS[@]}"; do
    if "${VIRSH[@]}" vol-info --pool default "$DOMAIN_PREFIX$name.img" >/dev/null 2>&1; then
        die "a disk $DOMAIN_PREFIX$name.img exists already in libvirt's pool 'default' (a lab of yours?)"
    fi
done
for name in nftlab-client-side nftlab-server-side; do
    if grep -qx "$name" <<<"$networks_before"; then
        die "a libvirt network $name exists already (a lab of yours? 'cd vagrant && vagrant destroy -f')"
    fi
done

# --- 3. the box ------------------------------------------------------------------------------------
if ! vagrant box list 2>/dev/null | grep -q "^$NFTLAB_BOX .*libvirt"; then
    if [ "$NFTLAB_BOX" = "$DEFAULT_BOX" ]; then
        say "building the box $NFTLAB_BOX (vagrant/build-box.sh)"
        run_bounded 1800 - "$VAGRANT_DIR/build-box.sh" || die "the box build failed"
    else
        say "box $NFTLAB_BOX is not added: Vagrant downloads it"
    fi
fi

# --- 4. the VMs --------------------------------------------------------------------------------------
say "vagrant up: ${VMS[*]} (scenario $NFTLAB_SCENARIO on the firewall; log in $WORK/up.log)"
made_vms=1
up_started=$SECONDS
run_bounded "$UP_SECONDS" "$WORK/up.log" bash -c 'cd "$1" && vagrant up --provider libvirt' _ "$VAGRANT_DIR" \
    || { show_log "$WORK/up.log" 40; die "vagrant up failed"; }
say "VMs up and provisioned in $((SECONDS - up_started)) s ($(grep -c "Domain type: *qemu" "$WORK/up.log" || :) of 3 under software emulation)"
rss_kib=$(ps -C qemu-system-x86_64 -o rss= | awk '{ total += $1 } END { print total + 0 }')
say "memory: the VMs' QEMU processes use $((rss_kib / 1024)) MiB (resident)"

# Plain ssh with one shared connection per VM: a flow is a few ssh commands, and a new SSH
# handshake under software emulation costs about a second.
vagrant_in_lab ssh-config >"$SSH_CONFIG"
cat >>"$SSH_CONFIG" <<EOF
Host *
  ControlPath $WORK/ssh-%C
  ServerAliveInterval 15
  ServerAliveCountMax 8
EOF
for name in "${VMS[@]}"; do
    timeout 120 ssh -F "$SSH_CONFIG" -o ControlMaster=yes -o ControlPersist=yes -fN "$name" </dev/null >/dev/null 2>&1 \
        || die "cannot ssh to the $name VM"
done

# --- 5. flows and the demo ---------------------------------------------------------------------------
say "tracing $flows_total flows on the firewall VM, with traffic from the client and server VMs"
flows_started=$SECONDS
flows_status=0
run_bounded $((FLOW_SECONDS_EACH * flows_total + 120)) - \
    python3 "$REPO/scripts/vm_flows.py" --ssh-config "$SSH_CONFIG" --result "$RESULT" "${scenarios[@]}" || flows_status=$?
if [ -f "$RESULT" ]; then
    read -r flows_ok _ <"$RESULT"
fi
say "flows traced in $((SECONDS - flows_started)) s"

say "nftrace demo inside the firewall VM"
demo_status=0
# Each of the demo's traces gets 60 s instead of 10: nftrace starts far slower under emulation.
run_bounded "$DEMO_SECONDS" - ssh -F "$SSH_CONFIG" firewall sudo NFTRACE_DEMO_TIMEOUT=60 nftrace demo || demo_status=$?
[ "$demo_status" -eq 0 ] || echo "vm-test.sh: nftrace demo in the firewall VM exited $demo_status" >&2
rss_kib=$(ps -C qemu-system-x86_64 -o rss= | awk '{ total += $1 } END { print total + 0 }')
say "memory: the VMs' QEMU processes use $((rss_kib / 1024)) MiB (resident) after the flows"

if [ "$flows_status" -eq 0 ] && [ "$demo_status" -eq 0 ] && [ "$flows_ok" -eq "$flows_total" ]; then
    run_status=0
fi
exit 0   # the cleanup (EXIT trap) decides the status from run_status and what it removed
