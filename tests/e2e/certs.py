"""Test certificates made with the openssl CLI: a CA, a server certificate
for localhost/127.0.0.1 and a client certificate, all signed by the CA; and,
on demand, a client certificate from a second CA that no broker trusts.

Keys are EC P-256; every certificate carries explicit X.509 v3 extensions
(a CA with keyCertSign, leaves with CA:FALSE and a server or client
extended key usage), as strict verifiers such as rustls's require.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

#: The client certificate's subject, and the principal Kafka forms from it
#: (RFC 2253: last RDN first).
CLIENT_SUBJECT = "/O=acme/OU=eng/CN=alice"
CLIENT_PRINCIPAL = "User:CN=alice,OU=eng,O=acme"

#: The subject of the client certificate `make_untrusted_client` makes.
UNTRUSTED_SUBJECT = "/O=acme/OU=eng/CN=mallory"

SERVER_EXTENSIONS = ("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                     "basicConstraints=critical,CA:FALSE\n"
                     "keyUsage=critical,digitalSignature\n"
                     "extendedKeyUsage=serverAuth\n")
CLIENT_EXTENSIONS = ("basicConstraints=critical,CA:FALSE\n"
                     "keyUsage=critical,digitalSignature\n"
                     "extendedKeyUsage=clientAuth\n")


@dataclass
class KeyPair:
    cert: Path
    key: Path


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path      # CLIENT_SUBJECT, signed by `ca`
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"openssl {' '.join(args)} failed:\n{res.stderr}"


def make_ca(root: Path, name: str) -> KeyPair:
    """A self-signed CA: `<name>.pem` and `<name>.key` in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    key, cert = root / f"{name}.key", root / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN=Shoal Test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=root)
    return KeyPair(cert=cert, key=key)


def make_leaf(root: Path, name: str, subject: str, extensions: str, ca: KeyPair) -> KeyPair:
    """A certificate for `subject` with `extensions` (openssl extfile
    lines), signed by `ca`: `<name>.pem` and `<name>.key` in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    key, csr = root / f"{name}.key", root / f"{name}.csr"
    cert, ext = root / f"{name}.pem", root / f"{name}.ext"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", subject, cwd=root)
    ext.write_text(extensions)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=root)
    return KeyPair(cert=cert, key=key)


def make_certs(root: Path) -> Certs:
    """The CA (`ca.pem`), the server's certificate and a client's, in `root`."""
    ca = make_ca(root, "ca")
    server = make_leaf(root, "server", "/CN=localhost", SERVER_EXTENSIONS, ca)
    client = make_leaf(root, "client", CLIENT_SUBJECT, CLIENT_EXTENSIONS, ca)
    return Certs(ca=ca.cert, server_cert=server.cert, server_key=server.key,
                 client_cert=client.cert, client_key=client.key)


def make_untrusted_client(root: Path, subject: str = UNTRUSTED_SUBJECT) -> KeyPair:
    """A client certificate for `subject` signed by a second CA of its own
    (`untrusted-ca.pem`), one no broker is given: it must be refused."""
    ca = make_ca(root, "untrusted-ca")
    return make_leaf(root, "untrusted-client", subject, CLIENT_EXTENSIONS, ca)
