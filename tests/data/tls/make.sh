#!/usr/bin/env bash
# Makes the test CA and the 127.0.0.1 server certificate tests/fetch.rs serves HTTPS with
# (DER files; valid until 2125). Run from this folder; the outputs are committed.
set -euo pipefail
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 36500 \
    -subj "/CN=ckptmap test CA" -keyout ca.key.pem -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
    -keyout server.key.pem -out server.csr
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' > ext.cnf
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key.pem -CAcreateserial -days 36500 \
    -extfile ext.cnf -out server.pem
openssl x509 -in server.pem -outform der -out server.der
openssl pkcs8 -topk8 -nocrypt -in server.key.pem -outform der -out server.key.der
rm -f server.csr ext.cnf ca.srl ca.key.pem server.key.pem server.pem
