# shellcheck shell=bash
# Helpers of tests/e2e/run.sh (host) and tests/e2e/node.sh (guest).

# wait_for SECONDS WHAT CMD...: retry CMD (quietly) once a second until it succeeds.
wait_for() {
    local limit=$1 what=$2 start=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $((SECONDS - start)) -ge "$limit" ]; then
            echo "e2e: timed out after ${limit}s waiting for $what ($*)" >&2
            return 1
        fi
        sleep 1
    done
}

# make_pki DIR API_IP SERVICE_IP NODE_NAME: a throw-away CA and the certificates of one cluster.
make_pki() {
    local d=$1 api_ip=$2 svc_ip=$3 node=$4
    cd "$d" || return 1
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=sealcsi-e2e-ca -keyout ca.key -out ca.crt
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key
    openssl pkey -in sa.key -pubout -out sa.pub
    # name subject extra-extensions
    cert() {
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" \
            -keyout "$1.key" -out "$1.csr"
        printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" "$3" >"$1.ext"
        openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
            -extfile "$1.ext" -out "$1.crt"
    }
    cert apiserver /CN=kube-apiserver \
        "subjectAltName=IP:$api_ip,IP:$svc_ip,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
    cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
    cert admin "/O=system:masters/CN=e2e-admin" "extendedKeyUsage=clientAuth"
    cert kube-controller-manager /CN=system:kube-controller-manager "extendedKeyUsage=clientAuth"
    cert kube-scheduler /CN=system:kube-scheduler "extendedKeyUsage=clientAuth"
    cert kube-proxy /CN=system:kube-proxy "extendedKeyUsage=clientAuth"
    cert kubelet "/O=system:nodes/CN=system:node:$node" "extendedKeyUsage=clientAuth"
    rm -f ./*.csr ./*.ext
}

# make_kubeconfig PKI_DIR WHO SERVER: a kubeconfig with WHO's client certificate, inline.
make_kubeconfig() {
    local d=$1 who=$2 server=$3
    cat <<KC
apiVersion: v1
kind: Config
clusters:
  - name: e2e
    cluster:
      server: $server
      certificate-authority-data: $(base64 -w0 "$d/ca.crt")
users:
  - name: $who
    user:
      client-certificate-data: $(base64 -w0 "$d/$who.crt")
      client-key-data: $(base64 -w0 "$d/$who.key")
contexts:
  - name: e2e
    context: {cluster: e2e, user: $who}
current-context: e2e
KC
}

# print_timings FILE: the per-step table (where, step, seconds).
print_timings() {
    echo
    echo "e2e: per-step timings"
    awk -F'\t' '{ printf "  %-6s %6ss  %s\n", $1, $3, $2; total += ($1 == "host" ? 0 : 0) }' "$1"
}

# print_results FILE: one line per scenario (name, result, seconds, detail).
print_results() {
    echo
    echo "e2e: scenarios"
    awk -F'\t' '{ printf "  %-4s %-5s %5ss  %s\n", $1, $2, $3, $4 }' "$1"
}
