#!/usr/bin/env bash
# Makes an OpenSSH server available for the SSH tests (tests/test_devices_remote.py start their own sshd
# on 127.0.0.1 with a throw-away config; nothing here starts or enables a service). Safe to run twice.
set -euo pipefail

if [ ! -x /usr/sbin/sshd ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-sshd: /usr/sbin/sshd is missing and this is not root; the SSH tests will be skipped" >&2
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: no ncurses-term, xauth or other extras the tests do not need.
    apt-get install -y -qq --no-install-recommends openssh-server >/dev/null
fi

# sshd refuses to start without its privilege-separation directory (normally made by systemd at boot).
if [ "$(id -u)" -eq 0 ]; then
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
fi
echo "install-sshd: $(/usr/sbin/sshd -V 2>&1 | head -n 1 || true)"
