#!/usr/bin/env bash
# Install what `make test` needs: Debian packages, then the project venv.
# Idempotent; the Makefile runs it only when its inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages. qemu, nbd and fio tools are the peers havend's tests and
# benchmarks talk to; python3-venv builds .venv; python3-libnbd is built for
# /usr/bin/python3 only (hence the venv is made from that interpreter);
# git and rsync are used by tools/ansible-test.sh; strace injects faults and
# openssh-server is the protected server of the ssh checkpoint hook tests.
apt_packages=(
    qemu-system-x86 qemu-utils libnbd-bin nbdkit nbd-client fio busybox-static linux-image-cloud-amd64
    python3-venv python3-libnbd rsync git make strace openssh-server
)
apt_packages+=(chromium)  # the drill report's HTML is checked in headless Chromium
apt_packages+=(libvirt-daemon-system libvirt-clients python3-libvirt iptables)  # the libvirt provider
apt_packages+=(dropbear-bin qemu-guest-agent)  # ssh and guest-agent health checks in the tiny guests
apt_packages+=(mmdebstrap e2fsprogs openssh-client)  # the Debian 12 guest of the molecule scenarios
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo=()
    ((EUID == 0)) || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv must come from Debian's python (not pyenv's, often first in PATH).
if [[ ! -x .venv/bin/python ]] || [[ $(readlink -f .venv/bin/python) != "$(readlink -f /usr/bin/python3)" ]]; then
    echo "setup: creating .venv from /usr/bin/python3"
    rm -rf .venv
    /usr/bin/python3 -m venv .venv
fi
# constraints.txt pins every transitive dependency (see `make constraints`).
.venv/bin/python -m pip install -q -c constraints.txt -r requirements-dev.txt
.venv/bin/python -m pip install -q -c constraints.txt -e service/
