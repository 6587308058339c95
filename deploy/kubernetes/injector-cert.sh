#!/bin/sh
# Creates (or rotates) the serving certificate of keyhaven-injector for a cluster without
# cert-manager: a CA of its own and a certificate for the injector's Service, valid one year.
# The CA's private key is thrown away, so nothing else can ever be signed with it.
#
# Order, so that no admission request fails during a rotation: the webhook first trusts the
# new CA beside the current one, then the Secret gets the new pair (the injector reloads it
# within seconds of the kubelet updating the volume).
#
# Needs: kubectl (with rights on the Secret and the MutatingWebhookConfiguration), brokerctl.
# Usage: deploy/kubernetes/injector-cert.sh [namespace]
set -eu
ns=${1:-keyhaven}
svc=keyhaven-injector
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

brokerctl dev-ca --out "$dir" --hosts "$svc.$ns.svc,$svc.$ns.svc.cluster.local" >/dev/null

# The new CA, then the first certificate of the current bundle (if any).
cp "$dir/ca.pem" "$dir/bundle.pem"
kubectl get mutatingwebhookconfiguration "$svc" \
    -o jsonpath='{.webhooks[0].clientConfig.caBundle}' | base64 -d 2>/dev/null \
    | awk '/-----BEGIN CERTIFICATE-----/ {n++} n == 1 {print}' >>"$dir/bundle.pem" || true
bundle=$(base64 <"$dir/bundle.pem" | tr -d '\n')
kubectl patch mutatingwebhookconfiguration "$svc" --type=json \
    -p "[{\"op\":\"replace\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$bundle\"}]"

kubectl create secret tls keyhaven-injector-tls -n "$ns" \
    --cert "$dir/server.pem" --key "$dir/server-key.pem" --dry-run=client -o yaml \
    | kubectl apply -f -
echo "keyhaven-injector-tls updated; the webhook trusts the new CA (and the previous one)."
