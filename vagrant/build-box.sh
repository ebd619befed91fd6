#!/usr/bin/env bash
# Build a Debian 12 Vagrant box (libvirt provider) from Debian's archive, and add it to Vagrant.
#
#   sudo vagrant/build-box.sh [--force]
#
# For machines that reach Debian's archive but no box registry, where `debian/bookworm64`
# cannot be downloaded. The box is what debian/bookworm64 gives the lab: Debian 12 with
# systemd, ifupdown, sshd and sudo, a `vagrant` user with Vagrant's insecure key (Vagrant
# replaces it at the first `vagrant up`); and, ahead of provisioning, the Debian packages that
# scripts/setup.sh installs and nftrace's Python dependencies (setup.sh still runs in each VM,
# makes nftrace's virtualenv and installs whatever the box lacks).
#
#   debootstrap (minbase + what a Vagrant guest needs) into an ext4 partition of a raw disk,
#   extlinux as boot loader (net.ifnames=0: eth0 is the management NIC, eth1... the lab's),
#   SSH host keys made at first boot (each VM its own), then box.img (qcow2) + metadata.json +
#   Vagrantfile in a tar, `vagrant box add`.
#
# Idempotent: a box of that name already added is left alone (--force builds it again).
# Environment: NFTLAB_BOX (box name, default nftlab/bookworm64), NFTLAB_BOX_WORKDIR (build
# directory, default /var/tmp/nftlab-box, removed afterwards), DEBIAN_MIRROR.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
BOX_NAME=${NFTLAB_BOX:-nftlab/bookworm64}
WORKDIR=${NFTLAB_BOX_WORKDIR:-/var/tmp/nftlab-box}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
DISK_SIZE_GB=10
# The partition starts at 1 MiB: room for the MBR and extlinux's boot sector chain.
PART_OFFSET=$((1024 * 1024))
# A minbase system is not bootable; these make it a Vagrant guest. dbus: hostnamectl, which
# Vagrant uses to set the hostname; netbase: /etc/services and /etc/protocols for nft.
GUEST_PACKAGES=systemd-sysv,udev,dbus,linux-image-cloud-amd64,openssh-server,sudo,rsync,ifupdown,isc-dhcp-client,netbase,iproute2,procps,kmod,ca-certificates,iputils-ping
HOST_PACKAGES=(debootstrap qemu-utils extlinux syslinux-common fdisk e2fsprogs mount vagrant python3-pip)

die() { echo "build-box.sh: $*" >&2; exit 1; }

force=0
case "${1:-}" in
    "") ;;
    --force) force=1 ;;
    *) die "usage: build-box.sh [--force]" ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, loop devices, mount)"

box_added() {
    vagrant box list --machine-readable 2>/dev/null | awk -F, -v name="$BOX_NAME" '
        $3 == "box-name" && $4 == name { found = 1 } found && $3 == "box-provider" && $4 == "libvirt" { ok = 1 }
        $3 == "box-name" && $4 != name { found = 0 } END { exit !ok }'
}

missing=()
for package in "${HOST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "build-box.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$force" -eq 0 ] && box_added; then
    echo "build-box.sh: box $BOX_NAME is already added (--force builds it again)"
    exit 0
fi

ROOT="$WORKDIR/root"
DISK="$WORKDIR/disk.raw"
loop=""

# Whatever happens, nothing stays mounted, no loop device stays attached, and the build
# directory (gigabytes) goes away.
cleanup() {
    local status=$? mountpoint
    trap '' INT TERM HUP
    if [ -d "$ROOT" ]; then
        # Deepest first: debootstrap and the chroot steps mount proc, sys, dev inside ROOT.
        for mountpoint in $(findmnt -rn -o TARGET | grep -F "$ROOT" | sort -r); do
            umount -l "$mountpoint" || status=1
        done
    fi
    if [ -n "$loop" ]; then
        losetup -d "$loop" || status=1
    fi
    rm -rf "$WORKDIR"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

rm -rf "$WORKDIR"
mkdir -p "$ROOT"

echo "build-box.sh: disk image, one ext4 partition"
truncate -s "${DISK_SIZE_GB}G" "$DISK"
echo "start=$((PART_OFFSET / 512)), type=83, bootable" | sfdisk --quiet "$DISK"
# A loop device on the partition alone (by offset): no partition scanning needed, which
# containers and minimal hosts often lack.
loop=$(losetup --find --show --offset "$PART_OFFSET" "$DISK")
# 64bit and metadata_csum off: extlinux 6.04 cannot boot from ext4 with them.
mkfs.ext4 -q -L nftlab-root -O ^64bit,^metadata_csum "$loop"
root_uuid=$(blkid -s UUID -o value "$loop")
mount "$loop" "$ROOT"

echo "build-box.sh: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include="$GUEST_PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >"$WORKDIR/debootstrap.log" 2>&1 \
    || { tail -20 "$WORKDIR/debootstrap.log" >&2; die "debootstrap failed"; }

# The lab's Debian packages (scripts/setup.sh's list), installed here at the host's speed:
# under software emulation, installing them in each VM takes minutes. setup.sh still runs in
# each VM and installs whatever this box lacks.
echo "build-box.sh: the lab's packages (scripts/setup.sh --packages)"
mapfile -t lab_packages < <("$REPO/scripts/setup.sh" --packages)
for filesystem in proc sys dev; do
    mount --rbind "/$filesystem" "$ROOT/$filesystem"
done
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
chroot "$ROOT" apt-get update -qq
DEBIAN_FRONTEND=noninteractive chroot "$ROOT" apt-get install -y -qq --no-install-recommends "${lab_packages[@]}" \
    >"$WORKDIR/packages.log" 2>&1 || { tail -20 "$WORKDIR/packages.log" >&2; die "installing the lab's packages failed"; }
rm -f "$ROOT/usr/sbin/policy-rc.d"

# nftrace's Python dependencies (pyproject.toml: its dependencies and the test extra; the
# iptables extra is Debian's python3-iptables, above) in the box's /usr/local, with the host's
# pip and its settings, at the host's speed. A VM's virtualenv sees them (setup.sh makes it with
# --system-site-packages), so pip in the VM installs only nftrace itself: under software
# emulation, resolving and unpacking these takes the better part of ten minutes per VM.
echo "build-box.sh: nftrace's Python dependencies"
mapfile -t python_requirements < <(/usr/bin/python3 - "$REPO/pyproject.toml" <<'PYTHON'
import sys, tomllib
with open(sys.argv[1], "rb") as pyproject:
    project = tomllib.load(pyproject)["project"]
print("\n".join(project["dependencies"] + project.get("optional-dependencies", {}).get("test", [])))
PYTHON
)
# The host's pip builds for the host's Python: only where that is the box's too (a Debian 12 host).
box_python=$(chroot "$ROOT" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
host_python=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$box_python" = "$host_python" ]; then
    # --target: the directory Debian's python3 reads for locally installed packages, named
    # outright (pip's --prefix maps differently on Debian and elsewhere).
    /usr/bin/python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --target "$ROOT/usr/local/lib/python$box_python/dist-packages" "${python_requirements[@]}" \
        >"$WORKDIR/pip.log" 2>&1 || { tail -20 "$WORKDIR/pip.log" >&2; die "installing nftrace's Python dependencies failed"; }
else
    echo "build-box.sh: the host's Python is $host_python, the box's $box_python: the VMs install nftrace's dependencies themselves"
fi
for filesystem in dev sys proc; do
    umount -R "$ROOT/$filesystem"
done

echo "build-box.sh: configuring the guest"
cat >"$ROOT/etc/fstab" <<EOF
UUID=$root_uuid / ext4 errors=remount-ro 0 1
EOF
echo nftlab-box >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<EOF
127.0.0.1 localhost
127.0.1.1 nftlab-box
::1 localhost ip6-localhost ip6-loopback
EOF
# eth0 is the management NIC (DHCP from Vagrant's network); Vagrant adds the others below.
cat >"$ROOT/etc/network/interfaces" <<EOF
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
EOF
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://security.debian.org/debian-security $SUITE-security main
EOF

# The vagrant user: Vagrant logs in with its insecure key, which Debian ships inside its
# vagrant package, and needs sudo without a password.
# (Debian: under rubygems-integration; HashiCorp's package: under /opt/vagrant.)
insecure_key=$(find /usr/share/rubygems-integration /usr/lib/ruby /opt/vagrant -path '*/keys/vagrant.pub' 2>/dev/null \
    | head -n 1 || :)
[ -n "$insecure_key" ] || die "Vagrant's insecure public key (keys/vagrant.pub) is not on this machine: install vagrant"
chroot "$ROOT" useradd --create-home --shell /bin/bash --user-group vagrant
install -d -m 700 -o 1000 -g 1000 "$ROOT/home/vagrant/.ssh"
install -m 600 -o 1000 -g 1000 "$insecure_key" "$ROOT/home/vagrant/.ssh/authorized_keys"
[ "$(chroot "$ROOT" id -u vagrant)" = 1000 ] || die "the vagrant user did not get uid 1000"
echo "vagrant ALL=(ALL) NOPASSWD:ALL" >"$ROOT/etc/sudoers.d/vagrant"
chmod 440 "$ROOT/etc/sudoers.d/vagrant"

# Host keys made here would be shared by every VM of every lab: each VM makes its own at
# first boot instead.
rm -f "$ROOT"/etc/ssh/ssh_host_*
cat >"$ROOT/etc/systemd/system/ssh-host-keys.service" <<EOF
[Unit]
Description=Generate SSH host keys at first boot
Before=ssh.service
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
chroot "$ROOT" systemctl enable --quiet ssh-host-keys.service
# Each VM gets its own machine id at first boot (an empty file tells systemd to make one).
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"

chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/log/*.log

echo "build-box.sh: extlinux"
kernel=$(cd "$ROOT/boot" && ls vmlinuz-* | sort -V | tail -n 1)
initrd="initrd.img-${kernel#vmlinuz-}"
[ -f "$ROOT/boot/$initrd" ] || die "no initramfs for $kernel"
mkdir -p "$ROOT/boot/extlinux"
cat >"$ROOT/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
TIMEOUT 0
PROMPT 0
LABEL debian
    LINUX /boot/$kernel
    INITRD /boot/$initrd
    APPEND root=UUID=$root_uuid ro net.ifnames=0 biosdevname=0 console=tty0 console=ttyS0,115200n8
EOF
extlinux --install "$ROOT/boot/extlinux" >"$WORKDIR/extlinux.log" 2>&1 \
    || { cat "$WORKDIR/extlinux.log" >&2; die "extlinux --install failed"; }
sync
umount "$ROOT"
losetup -d "$loop"
loop=""
# The MBR's boot code loads the active partition's boot sector (extlinux's).
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$DISK" bs=440 count=1 conv=notrunc status=none

echo "build-box.sh: box image"
# Compressed: half the size, and vagrant-libvirt copies the box into libvirt's pool at a few MB/s.
qemu-img convert -c -O qcow2 "$DISK" "$WORKDIR/box.img"
rm -f "$DISK"
cat >"$WORKDIR/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $DISK_SIZE_GB}
EOF
cat >"$WORKDIR/Vagrantfile" <<EOF
# Debian 12 built by nftrace's vagrant/build-box.sh from Debian's archive.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
  end
end
EOF
tar -C "$WORKDIR" -cf "$WORKDIR/nftlab.box" metadata.json Vagrantfile box.img

vagrant box add --force --name "$BOX_NAME" "$WORKDIR/nftlab.box" >/dev/null
# vagrant-libvirt copies a box into libvirt's storage pool once and reuses that copy: a
# rebuilt box must not be shadowed by the old one's.
volume_prefix="${BOX_NAME//\//-VAGRANTSLASH-}_vagrant_box_image_"
if virsh -q -c qemu:///system pool-info default >/dev/null 2>&1; then
    for volume in $(virsh -q -c qemu:///system vol-list default | awk '{print $1}' | grep -F "$volume_prefix" || :); do
        virsh -q -c qemu:///system vol-delete --pool default "$volume" >/dev/null
        echo "build-box.sh: removed the old box's copy $volume from libvirt's pool"
    done
elif [ "$force" -eq 1 ]; then
    echo "build-box.sh: libvirt is not running: if its pool 'default' holds ${volume_prefix}*, delete it (virsh vol-delete)" >&2
fi
echo "build-box.sh: box $BOX_NAME added (NFTLAB_BOX=$BOX_NAME vagrant up, in vagrant/)"
