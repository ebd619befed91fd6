#!/usr/bin/env bash
# Provisioning of the Vagrant lab (vagrant/Vagrantfile), run as root in each VM:
#
#   provision.sh install             nftrace from the synced repository (/nftrace) with scripts/setup.sh,
#                                    using the host's CA bundle and pip settings where the
#                                    Vagrantfile carried them in (vagrant/host_settings.rb)
#   provision.sh client|server       lab addresses and routes; on the server, the lab's listeners
#   provision.sh firewall SCENARIO   namespace nftlab-router holding both lab links (renamed r-client
#                                    and r-server, as in the namespace lab), forwarding on, and
#                                    rules/SCENARIO loaded into it by `nftrace lab load`
#
# Everything but `install` runs at every `vagrant up`: a reboot puts the links back in the VM's
# own namespace, and this puts them where the lab wants them again. The firewall VM's own
# ruleset, and its management NIC, are never touched.
set -euo pipefail

REPO=/nftrace
NFTRACE="$REPO/.venv/bin/nftrace"
PYTHON="$REPO/.venv/bin/python"
HOST_CA=/usr/local/share/nftlab/host-ca.pem
ROUTER_NS=nftlab-router
# nftrace/lab/lab.py's LISTEN_TCP / LISTEN_UDP, less 22: the server VM's sshd answers there.
LISTEN_TCP="25 80 443 3306 5432 6379 8080 9090"
LISTEN_UDP="53 161 5000"
LISTEN_SECONDS=86400

die() { echo "provision.sh: $*" >&2; exit 1; }

# The interface holding an IPv4 address in this namespace (Vagrant configured it).
device_with() {
    ip -o -4 addr show | awk -v address="$1" '{ split($4, a, "/"); if (a[1] == address) { print $2; exit } }'
}

# The host's pip settings (PIP_* in the environment) and CA bundle (NFTLAB_HOST_CA, uploaded
# by the Vagrantfile), kept in the VM's /etc/pip.conf so that pip works there later too.
# Nothing carried in: nothing written.
carry_host_pip_settings() {
    local lines=() variable option
    if [ -n "${NFTLAB_HOST_CA:-}" ]; then
        [ -f "$NFTLAB_HOST_CA" ] || die "the host's CA bundle was not uploaded to $NFTLAB_HOST_CA"
        install -D -m 644 "$NFTLAB_HOST_CA" "$HOST_CA"
        rm -f "$NFTLAB_HOST_CA"
        export PIP_CERT="$HOST_CA"
    fi
    for variable in PIP_CERT PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_PROXY PIP_TIMEOUT PIP_DEFAULT_TIMEOUT PIP_RETRIES; do
        if [ -n "${!variable:-}" ]; then
            option=${variable#PIP_}
            option=${option,,}
            lines+=("${option//_/-} = ${!variable}")
        fi
    done
    if [ "${#lines[@]}" -gt 0 ]; then
        printf '%s\n' "# Carried in from the host by nftrace's vagrant/provision.sh" "[global]" "${lines[@]}" >/etc/pip.conf
    fi
}

install_nftrace() {
    carry_host_pip_settings
    [ -x "$REPO/scripts/setup.sh" ] || die "$REPO/scripts/setup.sh is missing: is the repository synced?"
    "$REPO/scripts/setup.sh"
    ln -sf "$NFTRACE" /usr/local/bin/nftrace
}

# host_side ADDRESS4 ADDRESS6 PEER_NET4 PEER_NET6 GATEWAY4 GATEWAY6
host_side() {
    local device
    device=$(device_with "$1")
    [ -n "$device" ] || die "no interface has $1: is the private network up?"
    ip -6 addr replace "$2/64" dev "$device" nodad
    ip route replace "$3" via "$5"
    ip -6 route replace "$4" via "$6"
}

start_listeners() {
    local kind ports unit
    for kind in tcp udp; do
        if [ "$kind" = tcp ]; then ports=$LISTEN_TCP; else ports=$LISTEN_UDP; fi
        unit="nftlab-listen-$kind"
        if systemctl is-active --quiet "$unit"; then
            systemctl stop "$unit"
        fi
        systemctl reset-failed "$unit" 2>/dev/null || :
        # shellcheck disable=SC2086 # the port list is meant to split
        systemd-run --quiet --unit "$unit" --collect "$PYTHON" -m nftrace.lab.traffic "listen-$kind" :: $ports \
            --seconds "$LISTEN_SECONDS"
    done
}

# router_link NAME ADDRESS4 ADDRESS6: move the NIC holding ADDRESS4 into the router namespace.
router_link() {
    local name=$1 address4=$2 address6=$3 device
    if ! ip -n "$ROUTER_NS" link show "$name" >/dev/null 2>&1; then
        device=$(device_with "$address4")
        [ -n "$device" ] || die "no interface has $address4: is the private network up?"
        ip link set "$device" down
        ip link set "$device" netns "$ROUTER_NS"
        ip -n "$ROUTER_NS" link set "$device" name "$name"
    fi
    ip -n "$ROUTER_NS" addr replace "$address4/24" dev "$name"
    ip -n "$ROUTER_NS" -6 addr replace "$address6/64" dev "$name" nodad
    ip -n "$ROUTER_NS" link set "$name" up
}

firewall() {
    local scenario=$1
    [ -e "/run/netns/$ROUTER_NS" ] || ip netns add "$ROUTER_NS"
    ip -n "$ROUTER_NS" link set lo up
    router_link r-client 10.77.1.1 fd77:1::1
    router_link r-server 10.77.2.1 fd77:2::1
    ip netns exec "$ROUTER_NS" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    "$NFTRACE" --netns "$ROUTER_NS" lab load "$scenario"
}

role=${1:-}
case "$role" in
    install) install_nftrace ;;
    client) host_side 10.77.1.2 fd77:1::2 10.77.2.0/24 fd77:2::/64 10.77.1.1 fd77:1::1 ;;
    server)
        host_side 10.77.2.2 fd77:2::2 10.77.1.0/24 fd77:1::/64 10.77.2.1 fd77:2::1
        start_listeners
        ;;
    firewall) firewall "${2:?provision.sh firewall SCENARIO}" ;;
    *) die "usage: provision.sh install | client | server | firewall SCENARIO" ;;
esac
