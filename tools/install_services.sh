#!/usr/bin/env bash
# The services a team's setup needs, for tests/test_team_server.py (and a try-out
# with tools/team_services.py): PostgreSQL's server programs, from the
# distribution (Debian / Ubuntu). Idempotent: nothing is done when they exist.
set -euo pipefail
log() { printf '[services] %s\n' "$*"; }
if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  log "PostgreSQL's server programs are installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Install PostgreSQL's server programs (initdb, pg_ctl) with your system's package manager." >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# PostgreSQL 15 where the distribution has it (Debian 12, what CI runs), else its own version.
package=postgresql
if apt-cache show postgresql-15 >/dev/null 2>&1; then package=postgresql-15; fi
log "installing $package"
$SUDO apt-get install -y -q --no-install-recommends "$package"
