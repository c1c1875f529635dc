#!/usr/bin/env bash
# Makes everything a local mTLS + JWT setup needs, with openssl only:
#   ca.pem / ca.key            a development CA
#   server.pem / server.key    the server's certificate (localhost, 127.0.0.1)
#   <name>.pem / <name>.key    a client certificate whose identity is spiffe://nerve.dev/<name>
#   jwt.key / jwt.pub.pem      an RSA key pair for signing tokens (RS256)
#   <name>.jwt                 a token for the same identity (sub), valid for 12 hours
#   policy.toml                a policy that lets <name> publish, subscribe and replay dev.>
#   nerve.toml                 a server configuration using all of the above
# Usage: scripts/dev-pki.sh [DIR] [NAME]     (defaults: dev-pki planner)
# Development only: the keys are unencrypted and the CA is trusted by nothing else.
set -euo pipefail

DIR=${1:-dev-pki}
NAME=${2:-planner}
ID="spiffe://nerve.dev/$NAME"
ISSUER="https://nerve.dev/issuer"
AUDIENCE="nerve"
command -v openssl >/dev/null || { echo "dev-pki: needs openssl" >&2; exit 1; }
mkdir -p "$DIR"
cd "$DIR"

quiet() { "$@" 2>/dev/null; }

quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
  -subj "/CN=nerve dev CA" -keyout ca.key -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

issue() { # file-stem subject san
  quiet openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" \
    -keyout "$1.key" -out "$1.csr"
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=%s\n' \
    "$3" "$4" > "$1.ext"
  quiet openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
    -extfile "$1.ext" -out "$1.pem"
  rm -f "$1.csr" "$1.ext"
}
issue server "/CN=localhost" "DNS:localhost,IP:127.0.0.1" serverAuth
issue "$NAME" "/CN=$NAME" "URI:$ID" clientAuth

quiet openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out jwt.key
quiet openssl pkey -in jwt.key -pubout -out jwt.pub.pem

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
now=$(date +%s)
header=$(printf '{"alg":"RS256","typ":"JWT"}' | b64url)
payload=$(printf '{"sub":"%s","iss":"%s","aud":"%s","iat":%d,"exp":%d}' \
  "$ID" "$ISSUER" "$AUDIENCE" "$now" $((now + 12 * 3600)) | b64url)
signature=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -sign jwt.key -binary | b64url)
printf '%s.%s.%s\n' "$header" "$payload" "$signature" > "$NAME.jwt"

cat > policy.toml <<EOF
# Who may do what; see docs/security.md#policy.
[[principal]]
id = "$ID"
tenant = "dev"
sources = ["//$NAME", "//$NAME/*"]
allow = { publish = ["dev.>"], subscribe = ["dev.>"], groups = ["*"], replay = ["dev.>"], request = ["dev.>"], reply = ["dev.>"], admin = ["*"] }
EOF

cat > nerve.toml <<EOF
listen = "127.0.0.1:50051"
data_dir = "nerve-data"

[tls]
cert_file = "$PWD/server.pem"
key_file = "$PWD/server.key"
client_ca_file = "$PWD/ca.pem"

[auth]
policy_file = "$PWD/policy.toml"

[auth.jwt]
issuer = "$ISSUER"
audience = "$AUDIENCE"
algorithms = ["RS256"]
public_key_files = ["$PWD/jwt.pub.pem"]
EOF
chmod 600 ./*.key
echo "dev-pki: wrote CA, server and client ($ID) certificates, a token and nerve.toml to $PWD"
