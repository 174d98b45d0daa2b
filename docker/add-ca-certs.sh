#!/bin/sh
# Adds the PEM certificates in $EXTRA_CA_CERTS (a build argument, e.g. a TLS-intercepting proxy's
# CA) to the system store, one file per certificate as update-ca-certificates wants them.
set -eu
[ -n "${EXTRA_CA_CERTS:-}" ] || exit 0
printf '%s\n' "$EXTRA_CA_CERTS" > /tmp/extra-ca.pem
awk '/-----BEGIN CERTIFICATE-----/ {n++} n {print > ("/usr/local/share/ca-certificates/extra-" n ".crt")}' \
    /tmp/extra-ca.pem
rm /tmp/extra-ca.pem
update-ca-certificates
