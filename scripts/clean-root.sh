#!/usr/bin/env bash
# Run a command in a clean Debian root, as a new user's fresh machine would: a minbase
# debootstrap from Debian's archive (no compiler, nothing else installed), this checkout copied
# to /root/nftrace (tracked and untracked files, nothing ignored: no .venv), the command run there
# as root in a chroot that shares this machine's kernel (network namespaces and nf_tables work
# inside it). CI runs the README's commands this way (.ci/run); so can you:
#
#     sudo scripts/clean-root.sh bookworm ./scripts/demo.sh
#     sudo scripts/clean-root.sh --keep trixie './scripts/demo.sh && ./scripts/test.sh -x'
#
# SUITE is bookworm (Debian 12) or trixie (Debian 13); COMMAND is a shell command, run in
# /root/nftrace; its exit status is this script's.
#
# Hygiene: everything happens in a mount namespace of its own (`unshare --mount`, all mounts
# private, `mount --make-rprivate /`), so nothing mounted for or inside the root (its own /proc,
# /sys, /dev, /run, and what `ip netns` and debootstrap mount) is seen by this machine, and all
# of it goes away with that namespace, whatever way the script ends. On every exit the root's
# leftover processes are killed, by pid, and the root is deleted (`--keep` keeps it, to look
# inside). This machine's firewall is not touched. Outbound HTTPS may pass a proxy with its own
# CA: the CA bundle that pip is told to use here (PIP_CERT, REQUESTS_CA_BUNDLE, SSL_CERT_FILE
# or pip.conf's cert) is copied in and pip is pointed at it, with the proxy and index settings
# found in the environment and the global pip.conf files.
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), DEBIAN_SECURITY_MIRROR
# (default http://deb.debian.org/debian-security), NFTRACE_ROOTS_DIR (where roots are made,
# default /var/tmp); CI and NFTRACE_REQUIRE_KERNEL are passed in.
set -euo pipefail

usage() {
    echo "usage: $0 [--keep] bookworm|trixie COMMAND" >&2
    exit 2
}

inside() {
    # In the new mount namespace: build the root, run the command.
    local root=$1 suite=$2 repo=$3 command=$4
    mount --make-rprivate /
    mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
    security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

    started=$SECONDS
    if ! debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.debootstrap.log" 2>&1; then
        tail -20 "$root.debootstrap.log" >&2
        echo "clean-root: debootstrap $suite failed (log above)" >&2
        exit 1
    fi
    echo "clean-root: debootstrap --variant=minbase $suite: $((SECONDS - started)) s" >&2
    rm -f "$root.debootstrap.log"
    # What an installed Debian has: the release, its updates and its security archive.
    cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
EOF

    # The checkout as a user gets it: its files, none of what building or testing made here.
    mkdir -m 700 -p "$root/root/nftrace"
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
        tar -C "$repo" --null --no-recursion -T - -cf - | tar -C "$root/root/nftrace" -xf -

    # pip behind this machine's HTTPS proxy: its CA bundle and settings.
    environment=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
                 TERM=dumb DEBIAN_FRONTEND=noninteractive)
    for name in CI NFTRACE_REQUIRE_KERNEL http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY \
                PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT PIP_RETRIES; do
        if [ -n "${!name:-}" ]; then environment+=("$name=${!name}"); fi
    done
    bundle=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-}}}
    for conf in /etc/pip.conf /etc/xdg/pip/pip.conf; do
        if [ -z "$bundle" ] && [ -f "$conf" ]; then
            bundle=$(sed -n 's/^[[:space:]]*cert[[:space:]]*=[[:space:]]*//p' "$conf" | head -1)
        fi
    done
    if [ -n "$bundle" ] && [ -f "$bundle" ]; then
        mkdir -p "$root/usr/local/share/nftrace-ci"
        cp "$bundle" "$root/usr/local/share/nftrace-ci/ca-bundle.crt"
        in_root=/usr/local/share/nftrace-ci/ca-bundle.crt
        environment+=("PIP_CERT=$in_root" "REQUESTS_CA_BUNDLE=$in_root" "SSL_CERT_FILE=$in_root")
    fi
    [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
    [ -d /etc/xdg/pip ] && mkdir -p "$root/etc/xdg" && cp -r /etc/xdg/pip "$root/etc/xdg/pip"

    # / of the chroot is a mount point (`ip netns exec` remounts it rslave), with its own
    # /proc, /sys, /dev and /run (ip netns keeps its namespaces in /run/netns).
    mount --bind "$root" "$root"
    mount --make-rprivate "$root"
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount -t tmpfs -o mode=755,nosuid dev "$root/dev"
    for node in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
        set -- $node
        mknod -m 666 "$root/dev/$1" c "$2" "$3"
    done
    mkdir "$root/dev/pts" "$root/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$root/dev/pts"
    ln -s pts/ptmx "$root/dev/ptmx"
    ln -s /proc/self/fd "$root/dev/fd"
    ln -s /proc/self/fd/0 "$root/dev/stdin"
    ln -s /proc/self/fd/1 "$root/dev/stdout"
    ln -s /proc/self/fd/2 "$root/dev/stderr"
    mount -t tmpfs -o mode=1777,nosuid shm "$root/dev/shm"
    mount -t tmpfs -o mode=755,nosuid run "$root/run"
    mkdir -p "$root/run/lock"
    # Unmounted here on the way out; the namespace's end would take them anyway.
    trap 'umount -R "$root" 2>/dev/null || true' EXIT

    started=$SECONDS
    echo "clean-root: $suite: cd /root/nftrace && $command" >&2
    status=0
    chroot "$root" /usr/bin/env -i "${environment[@]}" /bin/bash -c "cd /root/nftrace && $command" || status=$?
    echo "clean-root: $suite: exit status $status after $((SECONDS - started)) s" >&2
    exit "$status"
}

outside() {
    # The root's directory, and its removal on every exit; the rest in a mount namespace.
    keep=
    if [ "${1:-}" = "--keep" ]; then keep=1; shift; fi
    [ $# -eq 2 ] || usage
    suite=$1 command=$2
    case "$suite" in bookworm|trixie) ;; *) usage ;; esac
    if [ "$(id -u)" -ne 0 ]; then
        echo "clean-root.sh: run as root (debootstrap, chroot and mounts need it)" >&2
        exit 2
    fi
    for tool in debootstrap unshare chroot git; do
        command -v "$tool" >/dev/null || { echo "clean-root.sh: $tool is not installed (apt-get install $tool)" >&2; exit 2; }
    done
    repo=$(cd "$(dirname "$0")/.." && pwd)
    root=$(mktemp -d "${NFTRACE_ROOTS_DIR:-/var/tmp}/nftrace-$suite.XXXXXX")
    chmod 755 "$root"  # it becomes /: readable by all, as / is

    child=
    cleanup() {
        # A second signal (a CI runner passes its own on) must not cut the removal short.
        trap '' INT TERM HUP
        # What still runs in the root (the command, when a signal ended this script, or a
        # listener it left) is killed, by pid, and so is debootstrap when a signal came while
        # it built the root (its first stage runs outside it, unpacking in it); the half in the
        # mount namespace then unmounts and ends, and the namespace with it.
        pkill -KILL -f -- "debootstrap .*$root" 2>/dev/null || true
        for proc in /proc/[0-9]*; do
            proc_root=$(readlink "$proc/root" 2>/dev/null || true)
            proc_cwd=$(readlink "$proc/cwd" 2>/dev/null || true)
            if [ "$proc_root" = "$root" ] || [ "${proc_cwd#"$root"}" != "$proc_cwd" ]; then
                kill -KILL "${proc#/proc/}" 2>/dev/null || true
            fi
        done
        if [ -n "$child" ]; then wait "$child" 2>/dev/null || true; fi
        if [ -n "$keep" ]; then
            echo "clean-root: kept $root" >&2
        else
            # --one-file-system: never into a mount, should one be visible here after all.
            rm -rf --one-file-system "$root" "$root.debootstrap.log"
        fi
    }
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP

    # In the background, waited for: a signal to this script is handled at once, not when the
    # command ends. bash starts a background command with SIGINT and SIGQUIT ignored; env gives
    # the command the defaults a user's shell gives it, or no Ctrl-C in it would work.
    env --default-signal=INT,QUIT unshare --mount --propagation private -- \
        "$0" --inside "$root" "$suite" "$repo" "$command" <&0 &
    child=$!
    status=0
    wait "$child" || status=$?
    child=
    exit "$status"
}

# Functions first, then the call: bash has read the whole script before it runs any of it.
if [ "${1:-}" = "--inside" ]; then
    shift
    inside "$@"
else
    outside "$@"
fi
