#!/usr/bin/env bash
# What scripts/run.sh prints once TorchServe is up: how to call the gateway it starts, as it is
# configured by ROBUSTGATE_* (address, TLS, token, metrics port), not only as it is by default.
# Usage: scripts/banner.sh MODEL
set -euo pipefail
model="$1"
port="${ROBUSTGATE_PORT:-50051}"
[ "$port" != 0 ] || port=PORT  # a free port, picked at start: its log line "gateway listening on" names it
host="${ROBUSTGATE_HOST:-127.0.0.1}"
case "$host" in
  0.0.0.0) host=127.0.0.1 ;;  # every interface: loopback is one
  ::|"[::]") host="[::1]" ;;
  *:*) [[ "$host" == \[* ]] || host="[$host]" ;;  # an IPv6 address, bracketed before its port
esac
cli=""
[ "$host:$port" = "127.0.0.1:50051" ] || cli="--address $host:$port"  # the client's default
grpcurl_flags="-plaintext"
if [ -n "${ROBUSTGATE_TLS_CERT_FILE:-}" ]; then
  cli="${cli:+$cli }--tls-ca CA.pem"  # the CA that signed $ROBUSTGATE_TLS_CERT_FILE
  grpcurl_flags="-cacert CA.pem"
  if [ -n "${ROBUSTGATE_TLS_CLIENT_CA_FILE:-}" ]; then
    cli="$cli --tls-cert client.pem --tls-key client.key"
    grpcurl_flags="$grpcurl_flags -cert client.pem -key client.key"
  fi
fi
# a token file's last token, trimmed, as the CLI reads it (two lines while a token is rotated)
# shellcheck disable=SC2016  # printed for a shell to run: expanded there, not here
last_token='awk '"'"'NF { t = $0 } END { gsub(/^[[:space:]]+|[[:space:]]+$/, "", t); print t }'"'"
if [ -n "${ROBUSTGATE_AUTH_TOKEN_FILE:-}" ]; then
  token_file=$(printf '%q' "$ROBUSTGATE_AUTH_TOKEN_FILE")  # pasted into a shell: quoted for it
  cli="${cli:+$cli }--token-file $token_file"
  grpcurl_flags="$grpcurl_flags -H \"authorization: Bearer \$($last_token $token_file)\""
elif [ -n "${ROBUSTGATE_AUTH_TOKEN:-}" ]; then
  cli="${cli:+$cli }--token-file TOKEN_FILE"  # a file holding the token you set in ROBUSTGATE_AUTH_TOKEN
  grpcurl_flags="$grpcurl_flags -H \"authorization: Bearer \$($last_token TOKEN_FILE)\""
fi
metrics="metrics on :${ROBUSTGATE_METRICS_PORT:-9464}/metrics"
[ "${ROBUSTGATE_METRICS_PORT:-}" != "-1" ] || metrics="metrics off"
cat <<MSG

RobustGate is starting on $host:$port ($metrics).
Call it from another shell:
  .venv/bin/robustgate${cli:+ $cli} classify some.png --model $model
  .venv/bin/grpcurl $grpcurl_flags -d '{"model":"$model","image":"'"\$(base64 -w0 some.png)"'"}' $host:$port robustgate.v1.ClassifierService/Classify
Make a test image:  .venv/bin/python -m service.sample_image some.png
MSG
