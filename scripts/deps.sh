#!/usr/bin/env bash
# Installs what rlsproxy's demo and tests need on a Debian machine, when it
# is missing. `deps.sh dev`: the PostgreSQL server. `deps.sh test`: also the
# client drivers the test suite runs (JDBC and HikariCP, psycopg 2 and 3,
# SQLAlchemy, asyncpg, node-postgres and the ORMs of e2e/clients/node),
# pg_dump and pgbench.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-test}
pkgs=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || pkgs+=(postgresql)
command -v psql >/dev/null || pkgs+=(postgresql-client)
if [ "$mode" = test ]; then
  command -v pgbench >/dev/null || ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || pkgs+=(postgresql-contrib)
  have_pkg libpostgresql-jdbc-java || pkgs+=(libpostgresql-jdbc-java)
  # HikariCP (and SLF4J, which it depends on): e2e/txpool_clients_test.go.
  have_pkg libhikaricp-java || pkgs+=(libhikaricp-java)
  command -v java >/dev/null || pkgs+=(default-jdk-headless)
  have_pkg python3-psycopg2 || pkgs+=(python3-psycopg2)
  have_pkg python3-psycopg || pkgs+=(python3-psycopg)
  have_pkg python3-sqlalchemy || pkgs+=(python3-sqlalchemy)
  have_pkg python3-asyncpg || pkgs+=(python3-asyncpg)
  command -v node >/dev/null || pkgs+=(nodejs npm)
fi

if [ ${#pkgs[@]} -gt 0 ]; then
  echo "deps: installing ${pkgs[*]}"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "deps: need root (or sudo) to apt-get install ${pkgs[*]}" >&2; exit 1; }
    sudo=sudo
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

if [ "$mode" = test ] && [ ! -d e2e/clients/node/node_modules ]; then
  echo "deps: npm ci in e2e/clients/node"
  (cd e2e/clients/node && npm ci --no-audit --no-fund --loglevel=error)
fi
