#!/usr/bin/env bash
# The cluster's CurveZMQ keys as Kubernetes Secrets, printed as YAML for `kubectl apply -f -`:
#
#   deploy/kubernetes/keys.sh DIR NODES | kubectl apply -f -
#
# DIR keeps the keys (made with `p3 keys generate` the first time; `p3 keys add` and
# `p3 keys revoke` change them, then run this again). NODES is the node StatefulSet's
# replicas: a node runs as its pod name (p3-node-0, p3-node-1, ...), which is its key's name.
# Every edge runs as the one edge key, edge-0. Each role's public keys and secret keys are
# separate Secrets, p3-keys-ROLE and p3-keys-ROLE-secret, so that a pod mounts only its own
# role's secrets (see base/*.yaml, volume "keys").
set -euo pipefail
dir=${1:?usage: keys.sh DIR NODES}
nodes=${2:?usage: keys.sh DIR NODES}
if [ ! -d "$dir/coordinator" ]; then
  names=()
  for ((i = 0; i < nodes; i++)); do names+=(--node "p3-node-$i"); done
  p3 keys generate "$dir" "${names[@]}" --edge edge-0 >&2
fi
for ((i = 0; i < nodes; i++)); do
  [ -f "$dir/node/p3-node-$i.key" ] || p3 keys add "$dir" node "p3-node-$i" >&2
done
for role in coordinator node edge; do
  public=() secret=()
  for f in "$dir/$role"/*.key; do public+=("--from-file=$f"); done
  for f in "$dir/$role"/*.key_secret; do secret+=("--from-file=$f"); done
  echo ---
  kubectl create secret generic "p3-keys-$role" "${public[@]}" --dry-run=client -o yaml
  echo ---
  kubectl create secret generic "p3-keys-$role-secret" "${secret[@]}" --dry-run=client -o yaml
done
