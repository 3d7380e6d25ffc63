#!/usr/bin/env bash
# Make sure PostgreSQL, MariaDB, Redis and RabbitMQ answer on 127.0.0.1; start (or install) them if not.
set -euo pipefail

pg_up()     { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up()  { (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
amqp_up()   { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
# The tests connect as root with an empty password over TCP (Debian's root uses unix_socket auth).
mariadb_up() { mysql --protocol=TCP -h 127.0.0.1 -P 3306 -uroot -e 'select 1' >/dev/null 2>&1; }
wait_for()  { for _ in $(seq 1 60); do "$1" && return 0; sleep 1; done; echo "services: $2 did not come up" >&2; return 1; }

apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# `services.sh mysqlclient-deps`: only the headers mysqlclient (mysql+mysqldb) builds against.
if [ "${1:-}" = "mysqlclient-deps" ]; then
  pkg-config --exists mysqlclient 2>/dev/null || apt_install pkg-config default-libmysqlclient-dev build-essential
  exit 0
fi

if ! pg_up; then
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  ls /etc/postgresql >/dev/null 2>&1 || apt_install postgresql
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  wait_for pg_up PostgreSQL
  # trust auth for local TCP, as the test setup expects; and the 'test' database
  su postgres -c "psql -h 127.0.0.1 -tAc \"select 1 from pg_database where datname='test'\"" 2>/dev/null | grep -q 1 \
    || su postgres -c "createdb test" || true
fi

if ! redis_up; then
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_for redis_up Redis
fi

if ! amqp_up; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  rabbitmq-server -detached || true
  wait_for amqp_up RabbitMQ
fi
if ! mariadb_up; then
  command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server
  service mariadb start >/dev/null 2>&1 || (mysqld_safe --bind-address=127.0.0.1 >/dev/null 2>&1 &)
  for _ in $(seq 1 60); do mysql -uroot -e 'select 1' >/dev/null 2>&1 && break; sleep 1; done
  # Let root in over TCP with an empty password, as the test setup expects (a no-op when it can already).
  mariadb_up || mysql -uroot -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket; FLUSH PRIVILEGES;"
  wait_for mariadb_up MariaDB
fi
echo "services: PostgreSQL, MariaDB, Redis and RabbitMQ are up"
