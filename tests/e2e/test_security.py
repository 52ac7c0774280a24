"""Security: authentication of the HTTP APIs (placement and admin), the
cluster secret between nodes, operators' tokens, and a standalone node that
will not listen beyond loopback unauthenticated."""

from __future__ import annotations

import json
import subprocess

import pytest

from cluster import BrokerNode, Cluster
from harness import ShoalStartError, free_port, http_request, shoal_bin, unique_name, wait_for

SECRET = "cluster-secret-" + "x" * 24

#: An empty state: what `Restore` would replace the cluster's with.
RESTORE = json.dumps({"restore": {"state": {
    "streams": {}, "group_offsets": {}, "brokers": {}, "next_producer_id": 0, "version": 0,
}}}).encode()


def shoal_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([shoal_bin(), *args], capture_output=True, text=True, timeout=30,
                          env=env)


def create_token(path) -> str:
    out = shoal_cli("tokens", "create", "--file", str(path))
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token and token not in path.read_text()
    return token


def test_every_endpoint_but_probes_needs_a_token(shoal_factory, tmp_path):
    tokens = tmp_path / "tokens"
    token = create_token(tokens)
    s = shoal_factory(extra_args=["--admin-token-file", str(tokens)]).start()
    base = s.http_base
    topic = unique_name("sec")
    s.token = token
    assert s.http(f"/api/v1/streams/{topic}").status == 404

    # Probes stay open.
    assert http_request(base + "/health").status == 200
    assert http_request(base + "/metrics").status == 200
    # Reads and writes of placement and the admin API do not.
    for path, method, body in [
        ("/placement/v1/status", "GET", None),
        ("/placement/v1/cluster", "GET", None),
        ("/placement/v1/query", "POST", b'"list_streams"'),
        ("/placement/v1/write", "POST", RESTORE),
        ("/raft/vote", "POST", b"{}"),
        ("/api/v1/streams", "GET", None),
        ("/api/v1/mqtt/clients", "GET", None),
        ("/api/v1/mqtt/takeover", "POST", b"{}"),
    ]:
        for bearer in (None, "not-the-token-but-long-enough"):
            r = http_request(base + path, method=method, body=body, token=bearer)
            assert r.status == 401, (path, bearer, r.status, r.text)
            assert r.header("www-authenticate") == "Bearer", r.headers
            assert token not in r.text
    # With the token: the API answers.
    ok = http_request(base + "/placement/v1/status", token=token)
    assert ok.status == 200 and ok.json()["is_leader"] is True
    assert http_request(base + "/api/v1/streams", token=token).status == 200


def test_key_material_and_node_calls_need_the_cluster_secret(shoal_factory, tmp_path):
    """An operator's token reads users (names, mechanisms, iterations) but
    not their salts and keys, and cannot call Raft or act as a broker; the
    cluster secret can."""
    tokens = tmp_path / "tokens"
    token = create_token(tokens)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    s = shoal_factory(extra_args=["--admin-token-file", str(tokens),
                                  "--cluster-secret-file", str(secret_file)])
    s.token = SECRET
    add = subprocess.run([shoal_bin(), "users", "add", "dana", "--password-stdin",
                          "--data-dir", str(s.data_dir)], input="dana-Pa55word-12345\n",
                         capture_output=True, text=True, timeout=60)
    assert add.returncode == 0, add.stderr
    s.start()
    query = s.http_base + "/placement/v1/query"
    security = b'{"security": {"known": null}}'

    users = http_request(query, method="POST", body=b'"users"', token=token)
    assert users.status == 200, users.text
    assert users.json()["users"]["users"] == {"dana": {"SCRAM-SHA-512": 4096}}, users.text
    assert "salt" not in users.text and "stored_key" not in users.text
    for path, body in [("/placement/v1/query", security), ("/raft/vote", b"{}"),
                       ("/placement/v1/heartbeat", b"{}")]:
        r = http_request(s.http_base + path, method="POST", body=body, token=token)
        assert r.status == 403, (path, r.status, r.text)
        assert "salt" not in r.text
    # The cluster secret (a broker's credential) gets the key material.
    r = http_request(query, method="POST", body=security, token=SECRET)
    assert r.status == 200, r.text
    assert "salt" in r.text and "dana" in r.text
    # `shoal users list` works with the operator's token.
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_TOKEN"] = token
    listed = shoal_cli("users", "list", "--server", s.http_base, env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["dana", "SCRAM-SHA-512"], listed.stdout


def test_tokens_created_and_revoked_while_running(shoal_factory, tmp_path):
    tokens = tmp_path / "tokens"
    first = create_token(tokens)
    s = shoal_factory(extra_args=["--admin-token-file", str(tokens)]).start()
    url = s.http_base + "/api/v1/streams"
    second = create_token(tokens)
    wait_for(lambda: http_request(url, token=second).status == 200, 10,
             "a token created while running to be accepted")
    listed = shoal_cli("tokens", "list", "--file", str(tokens))
    assert listed.returncode == 0, listed.stderr
    ids = listed.stdout.split()
    assert len(ids) == 2 and first not in listed.stdout and second not in listed.stdout
    # Which id is the first token's? Revoke one, see which stops working.
    out = shoal_cli("tokens", "revoke", "--file", str(tokens), ids[0])
    assert out.returncode == 0, out.stderr
    wait_for(lambda: http_request(url, token=first).status == 401, 10,
             "the revoked token to be refused")
    assert http_request(url, token=second).status == 200
    # Plaintext lines work too.
    with open(tokens, "a") as f:
        f.write("a-plaintext-operator-token\n")
    wait_for(lambda: http_request(url, token="a-plaintext-operator-token").status == 200, 10,
             "a plaintext token line to be accepted")


def test_the_token_never_reaches_the_log(shoal_factory, tmp_path):
    tokens = tmp_path / "tokens"
    token = create_token(tokens)
    s = shoal_factory(extra_args=["--admin-token-file", str(tokens)],
                      env={"SHOAL_LOG": "debug"}).start()
    assert http_request(s.http_base + "/api/v1/streams", token=token).status == 200
    assert http_request(s.http_base + "/api/v1/streams", token="wrong-" + token).status == 401
    s.stop()
    assert token not in s.log_text()


def test_standalone_refuses_to_listen_beyond_loopback_unauthenticated(tmp_path):
    port = free_port()
    cmd = [shoal_bin(), "standalone", "--data-dir", str(tmp_path / "data"),
           "--kafka-addr", f"127.0.0.1:{free_port()}", "--mqtt-addr", "off",
           "--http-addr", f"0.0.0.0:{port}"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert "without authentication" in refused.stderr and "--insecure" in refused.stderr, \
        refused.stderr
    # With --insecure the operator has said so: it starts.
    proc = subprocess.Popen(cmd + ["--insecure"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: http_request(f"http://127.0.0.1:{port}/health").status == 200, 30,
                 "the --insecure node to serve")
    finally:
        proc.kill()
        proc.wait()


def test_cluster_nodes_need_the_cluster_secret(tmp_path):
    c = Cluster(tmp_path, placements=1, brokers=1, secret=SECRET)
    try:
        c.start()
        leader = c.placements[0]
        base = leader.http_base
        assert http_request(base + "/placement/v1/write", method="POST", body=RESTORE).status == 401
        assert http_request(base + "/placement/v1/status").status == 401
        assert http_request(base + "/placement/v1/status", token=SECRET).status == 200
        # The broker joined with the secret; its admin API needs it too.
        b1 = c.brokers[0]
        assert http_request(b1.http_base + "/api/v1/streams").status == 401
        assert b1.http("/api/v1/streams").status == 200
        # A broker with another secret is refused and says why.
        stranger = BrokerNode(tmp_path / "stranger", node_id=9,
                              placement=leader.http_addr, object_store=c.object_store)
        stranger.env["SHOAL_CLUSTER_SECRET"] = "another-secret-" + "y" * 24
        try:
            with pytest.raises(ShoalStartError):
                stranger.start(timeout=30)
            assert "refused this node's credentials" in stranger.log_text()
            assert "another-secret" not in stranger.log_text()
        finally:
            stranger.cleanup()
        ids = [b["info"]["id"] for b in leader.cluster()["brokers"]]
        assert 9 not in ids, ids
    finally:
        for p in c.processes:
            p.cleanup()


def https_status(url: str, cafile, token: str | None = None) -> int:
    import ssl
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = ssl.create_default_context(cafile=str(cafile))
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_cluster_over_https(tmp_path):
    """--http-tls: placement and broker serve HTTPS and call each other over
    it with the cluster secret; plain HTTP gets no answer."""
    from certs import make_certs
    import urllib.error

    certs = make_certs(tmp_path / "certs")
    tls = ["--http-tls", "true", "--tls-cert", str(certs.server_cert),
           "--tls-key", str(certs.server_key), "--tls-client-ca", str(certs.ca)]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_CLUSTER_SECRET"] = SECRET
    p_port, b_http, b_kafka = free_port(), free_port(), free_port()
    procs = []
    logs = []
    try:
        for name, cmd in [
            ("placement", [shoal_bin(), "placement", "--node-id", "1",
                           "--addr", f"127.0.0.1:{p_port}", "--peers", f"1=127.0.0.1:{p_port}",
                           "--data-dir", str(tmp_path / "p1"), *tls]),
            ("broker", [shoal_bin(), "broker", "--node-id", "1",
                        "--placement", f"127.0.0.1:{p_port}",
                        "--kafka-addr", f"127.0.0.1:{b_kafka}",
                        "--http-addr", f"127.0.0.1:{b_http}",
                        "--object-store", f"file://{tmp_path / 'objects'}",
                        "--data-dir", str(tmp_path / "b1"), *tls]),
        ]:
            log = open(tmp_path / f"{name}.log", "wb")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=env))
            port = p_port if name == "placement" else b_http
            wait_for(lambda port=port: https_status(f"https://localhost:{port}/health",
                                                    certs.ca) == 200,
                     60, f"{name} to answer /health over HTTPS", ignore=(OSError,))
        # The broker joined through HTTPS: placement lists it.
        base = f"https://localhost:{p_port}"
        assert https_status(base + "/placement/v1/cluster", certs.ca) == 401
        assert https_status(base + "/placement/v1/cluster", certs.ca, SECRET) == 200
        # Plain HTTP on the TLS port gets no HTTP answer (at most a TLS alert).
        import http.client
        with pytest.raises((OSError, urllib.error.URLError, http.client.HTTPException)):
            http_request(f"http://127.0.0.1:{p_port}/health", timeout=3)
        topic = unique_name("https")
        out = subprocess.run(["kcat", "-P", "-b", f"127.0.0.1:{b_kafka}", "-t", topic],
                             input=b"over-https-cluster", capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        got = subprocess.run(["kcat", "-C", "-b", f"127.0.0.1:{b_kafka}", "-t", topic,
                              "-e", "-c", "1", "-f", "%s"], capture_output=True, timeout=60)
        assert got.stdout == b"over-https-cluster", got
        for log_path in tmp_path.glob("*.log"):
            assert SECRET not in log_path.read_text(errors="replace")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for log in logs:
            log.close()
