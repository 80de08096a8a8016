#!/bin/sh
# Makes a cluster's CA (once, in ADMIN_DIR, which keeps the CA key and the admin token: keep it
# private) and prints the two Secrets the base mounts: shoal-coordinator-credentials (the CA's
# certificate, the token key, the first tokens and a certificate per replica) and
# shoal-worker-credentials (the workers' certificate and token).
#
#   cluster/deploy/kubernetes/credentials.sh ADMIN_DIR [REPLICAS] | kubectl apply -f -
#
# Then reach the cluster with the admin's token and certificate:
#   SHOAL_TOKEN=$(cat ADMIN_DIR/admin.token) SHOAL_CLIENT_CREDENTIALS=... shoal status --endpoints ...
# (`shoal ca issue --dir ADMIN_DIR --client NAME --out DIR` makes a client's folder).
# REPLICAS must match the StatefulSet's (and its credentials volume's items). SHOAL names the
# shoal binary (default: shoal on PATH).
set -eu
[ $# -ge 1 ] || { echo "usage: $0 ADMIN_DIR [REPLICAS]" >&2; exit 2; }
admin=$1
replicas=${2:-3}
shoal=${SHOAL:-shoal}
[ -e "$admin/token.key" ] || "$shoal" ca init --dir "$admin" >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
set -- --from-file=ca.crt="$admin/ca.crt"
i=1
while [ "$i" -le "$replicas" ]; do
    "$shoal" ca issue --dir "$admin" --node "$i" --out "$tmp/coordinator-$i" >/dev/null
    set -- "$@" --from-file=node-$i.crt="$tmp/coordinator-$i/node.crt" --from-file=node-$i.key="$tmp/coordinator-$i/node.key"
    i=$((i + 1))
done
kubectl create secret generic shoal-coordinator-credentials --dry-run=client -o yaml "$@" \
    --from-file=token.key="$tmp/coordinator-1/token.key" --from-file=bootstrap.pb="$tmp/coordinator-1/bootstrap.pb"
echo ---
"$shoal" ca issue --dir "$admin" --worker --out "$tmp/worker" >/dev/null
kubectl create secret generic shoal-worker-credentials --dry-run=client -o yaml --from-file="$tmp/worker"
