#!/usr/bin/env bash
# Make sure PgBouncer (Debian's `pgbouncer` package) is installed for the
# suite's PgBouncer run (tests/pgbouncer.py starts its own instance on a free
# port). Exit status: 0 ready; 3 it cannot be installed here (the reason is
# printed, and .ci/run skips only that run); anything else is a failure.
set -euo pipefail

binary() {
    # /usr/sbin is not on every user's PATH; the fixture looks there too
    command -v pgbouncer 2>/dev/null ||
        { [ -x /usr/sbin/pgbouncer ] && echo /usr/sbin/pgbouncer; } ||
        { [ -x /usr/bin/pgbouncer ] && echo /usr/bin/pgbouncer; }
}

cannot() {
    echo "pgbouncer is not installed and cannot be installed here: $*" >&2
    exit 3
}

if binary >/dev/null; then
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || cannot "no apt-get (not a Debian-like system)"
as_root=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || cannot "not root and no sudo"
    sudo -n true 2>/dev/null || cannot "not root and sudo needs a password"
    as_root="sudo -n"
fi

echo "--- installing pgbouncer (Debian package)"
$as_root apt-get update -qq || cannot "apt-get update failed"
# env, not a prefix assignment: sudo would drop it
$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null ||
    cannot "apt-get install pgbouncer failed"
path=$(binary) || cannot "the package installed no pgbouncer binary"

# The package enables and starts its own service (127.0.0.1:6432, the socket
# in /var/run/postgresql). The suite needs neither, so the pgbouncer this
# script installed is stopped and left disabled: nothing of it holds a port
# or a socket a later step or another checkout may want.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $as_root systemctl disable --now pgbouncer.service >/dev/null 2>&1 || true
elif [ -x /etc/init.d/pgbouncer ]; then
    # no systemd (a container): the init script, if policy-rc.d let it start
    $as_root /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true
fi
echo "installed $("$path" --version | head -1) ($path)"
