#!/usr/bin/env bash
# Usage: pgpass-from-secret.sh COMMAND [ARG...]
# Writes the database password from the compose secret (GSMSEARCH_DB_SECRET, default
# /run/secrets/db_password) into a libpq password file at $PGPASSFILE (mode 0600, the password
# for every host, port, database and user of that file's one line), then runs COMMAND.  libpq
# reads $PGPASSFILE in every process that has the variable, `docker compose exec` ones included,
# so the password is in no environment variable.  Without PGPASSFILE or a readable secret it only
# runs COMMAND (a service that does not talk to the database).
set -euo pipefail
secret=${GSMSEARCH_DB_SECRET:-/run/secrets/db_password}
if [ -n "${PGPASSFILE:-}" ] && [ -r "$secret" ]; then
  password=$(cat "$secret")       # without trailing newlines, as the postgres image reads it
  password=${password//\\/\\\\}   # the password file's escapes: backslash, then colon
  password=${password//:/\\:}
  mkdir -p "$(dirname "$PGPASSFILE")"
  (umask 077 && printf '*:*:*:*:%s\n' "$password" > "$PGPASSFILE.tmp")
  mv "$PGPASSFILE.tmp" "$PGPASSFILE"
fi
exec "$@"
