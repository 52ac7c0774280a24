"""Kafka ACLs end to end: `--authorizer true --super-users User:admin` on a
SASL_PLAINTEXT listener (SCRAM-SHA-512, so no certificates), ACLs managed
with confluent-kafka's AdminClient (CreateAcls, DescribeAcls, DeleteAcls)
and enforced on real producers, consumers and admin clients: prefixed
allows, deny over allow, group ACLs, Metadata hiding topics, the ACL and
SCRAM admin APIs kept to the cluster's ALTER/DESCRIBE, propagation from
placement to every broker of a cluster, and nothing enforced without
`--authorizer`.

Principals are `User:<SASL user>`: `admin` (super user), `alice`, `bob`;
one test adds an SSL listener with client certificates, whose principal is
the certificate's subject (certs.CLIENT_PRINCIPAL).
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Iterable, Optional

import pytest
from confluent_kafka import (OFFSET_BEGINNING, Consumer, ConsumerGroupTopicPartitions, KafkaError,
                             KafkaException, Producer, TopicPartition)
from confluent_kafka.admin import (AclBinding, AclBindingFilter, AclOperation, AclPermissionType,
                                   AdminClient, NewTopic, ResourcePatternType, ResourceType,
                                   ScramCredentialInfo, ScramMechanism,
                                   UserScramCredentialUpsertion)

from clients import RDKAFKA_LOGGER, kp_admin
from cluster import Cluster
from harness import Shoal, distinct_ports, free_port, shoal_bin, unique_name, wait_for

ADMIN, ALICE, BOB = "admin", "alice", "bob"
PASSWORDS = {
    ADMIN: "admin-Pa55word-for-the-acl-tests",
    ALICE: "alice-Pa55word-for-the-acl-tests",
    BOB: "bob-Pa55word-for-the-acl-tests",
}
MECHANISM = "SCRAM-SHA-512"
AUTHORIZER = ["--authorizer", "true", "--super-users", "User:admin"]

TOPIC_AUTHZ = KafkaError.TOPIC_AUTHORIZATION_FAILED
GROUP_AUTHZ = KafkaError.GROUP_AUTHORIZATION_FAILED
CLUSTER_AUTHZ = KafkaError.CLUSTER_AUTHORIZATION_FAILED


# --------------------------------------------------------------------------
# brokers and users


def shoal_cli(*args: str, input: Optional[str] = None) -> subprocess.CompletedProcess:
    # The harness' own SHOAL_* variables are not configuration for the CLI.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    return subprocess.run([shoal_bin(), *args], input=input, capture_output=True, text=True,
                          timeout=60, env=env)


def add_users(*target: str, users: Iterable[str] = (ADMIN, ALICE, BOB)) -> None:
    """`shoal users add` against `--data-dir D` or `--server URL`."""
    for name in users:
        out = shoal_cli("users", "add", name, "--mechanism", MECHANISM, "--password-stdin",
                        *target, input=PASSWORDS[name] + "\n")
        assert out.returncode == 0, f"users add {name} failed:\n{out.stderr[-3000:]}"


def acl_shoal(shoal_factory, authorizer: bool = True) -> tuple[Shoal, int]:
    """A started standalone node with one SASL_PLAINTEXT listener (its port
    is returned), users admin, alice and bob, and the authorizer on."""
    kafka, http, mqtt, sasl = distinct_ports(4)
    args = ["--kafka-listeners", f"SASL_PLAINTEXT://127.0.0.1:{sasl}",
            "--sasl-mechanisms", MECHANISM]
    if authorizer:
        args += AUTHORIZER
    s = shoal_factory(kafka_port=kafka, http_port=http, mqtt_port=mqtt, extra_args=args)
    add_users("--data-dir", str(s.data_dir))
    s.start()
    return s, sasl


# --------------------------------------------------------------------------
# clients


def conf(port: int, user: str, **extra) -> dict:
    c = {
        "bootstrap.servers": f"127.0.0.1:{port}",
        "broker.address.family": "v4",
        "logger": RDKAFKA_LOGGER,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanisms": MECHANISM,
        "sasl.username": user,
        "sasl.password": PASSWORDS[user],
    }
    c.update(extra)
    return c


def admin_client(port: int, user: str) -> AdminClient:
    return AdminClient(conf(port, user))


def acl(resource: ResourceType, name: str, principal: str, op: AclOperation,
        permission: AclPermissionType = AclPermissionType.ALLOW,
        pattern: ResourcePatternType = ResourcePatternType.LITERAL) -> AclBinding:
    return AclBinding(resource, name, pattern, principal, "*", op, permission)


def everything() -> AclBindingFilter:
    return AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None,
                            AclOperation.ANY, AclPermissionType.ANY)


def create_acls(admin: AdminClient, *bindings: AclBinding) -> None:
    futures = admin.create_acls(list(bindings), request_timeout=30)
    for binding, fut in futures.items():
        assert fut.result(timeout=60) is None, binding


def describe_acls(admin: AdminClient, flt: Optional[AclBindingFilter] = None) -> list[AclBinding]:
    return admin.describe_acls(flt or everything(), request_timeout=30).result(timeout=60)


def refused_with(fut, code: int) -> KafkaError:
    """`fut` fails with the Kafka error `code`; returns that error."""
    try:
        res = fut.result(timeout=60)
    except KafkaException as e:
        err = e.args[0]
        assert err.code() == code, f"expected {KafkaError(code).name()}, got {err}"
        return err
    raise AssertionError(f"expected {KafkaError(code).name()}, but it succeeded: {res!r}")


def create_topics(port: int, *topics: str, partitions: int = 1) -> None:
    """Create `topics` as the super user and wait until its Metadata shows them."""
    admin = admin_client(port, ADMIN)
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics],
        request_timeout=30)
    for fut in futures.values():
        fut.result(timeout=60)

    def visible():
        md = admin.list_topics(timeout=10)
        return all(t in md.topics and md.topics[t].error is None
                   and len(md.topics[t].partitions) == partitions for t in topics)
    wait_for(visible, 30, f"metadata to show {topics}", interval=0.1)


def produce(port: int, user: str, topic: str, values: list[bytes],
            partition: int = 0) -> list[tuple[Optional[KafkaError], int]]:
    """(error, offset) of each value produced as `user`; every delivery
    report arrives (successful or not)."""
    return produce_as(conf(port, user), user, topic, values, partition)


def produce_as(client_conf: dict, who: str, topic: str, values: list[bytes],
               partition: int = 0) -> list[tuple[Optional[KafkaError], int]]:
    """`produce` with any client configuration (`who` names it in failures)."""
    reports: list = []
    p = Producer({**client_conf, "acks": "all", "message.timeout.ms": 15000,
                  "retry.backoff.ms": 100})
    for v in values:
        p.produce(topic, value=v, partition=partition,
                  on_delivery=lambda err, msg: reports.append((err, msg.offset())))
        p.poll(0)
    assert p.flush(60) == 0, f"{who}: messages to {topic} still in flight"
    assert len(reports) == len(values), reports
    return reports


def produce_ok(port: int, user: str, topic: str, values: list[bytes], partition: int = 0) -> None:
    reports = produce(port, user, topic, values, partition)
    assert [e for e, _ in reports if e is not None] == [], f"{user} -> {topic}: {reports}"


def produce_refused(port: int, user: str, topic: str, partition: int = 0) -> Optional[KafkaError]:
    """The error of one message `user` produces to `topic` (None if delivered)."""
    [(err, _offset)] = produce(port, user, topic, [b"should not be written"], partition)
    return err


def consume(port: int, user: str, topic: str, count: int, *, group: Optional[str] = None,
            subscribe: bool = False, stop_on: Iterable[int] = (),
            timeout: float = 30.0) -> tuple[list, list[KafkaError]]:
    """Read from the beginning of partition 0 of `topic` as `user` (by
    assignment, or by subscribing with `group`) until `count` messages
    arrived, or an error whose code is in `stop_on` is reported, or
    `timeout`. Returns (messages, errors)."""
    stop_on = set(stop_on)
    c = Consumer(conf(port, user, **{"group.id": group or unique_name("reader"),
                                     "enable.auto.commit": False,
                                     "auto.offset.reset": "earliest",
                                     "topic.metadata.refresh.interval.ms": 1000}))
    msgs: list = []
    errors: list[KafkaError] = []
    try:
        if subscribe:
            c.subscribe([topic])
        else:
            c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout
        while len(msgs) < count and time.monotonic() < deadline:
            for m in c.consume(num_messages=100, timeout=0.2):
                if m.error() is not None:
                    errors.append(m.error())
                else:
                    msgs.append(m)
            if any(e.code() in stop_on for e in errors):
                break
    finally:
        c.close()
    return msgs, errors


def consume_ok(port: int, user: str, topic: str, values: list[bytes], **kw) -> None:
    msgs, errors = consume(port, user, topic, len(values), **kw)
    assert [m.value() for m in msgs] == values, (user, topic, errors)


def consume_refused(port: int, user: str, topic: str, codes: Iterable[int], **kw) -> KafkaError:
    """`user` reads `topic`: one of the errors `codes` is reported and no
    message arrives. Returns that error."""
    codes = set(codes)
    msgs, errors = consume(port, user, topic, 1, stop_on=codes, **kw)
    assert msgs == [], f"{user} read {topic}: {[m.value() for m in msgs]}"
    hit = [e for e in errors if e.code() in codes]
    assert hit, (f"{user} reading {topic}: expected one of "
                 f"{[KafkaError(c).name() for c in codes]}, got {errors}")
    return hit[0]


def kp_admin_as(port: int, user: str):
    """A kafka-python admin client authenticated as `user`."""
    return kp_admin(f"127.0.0.1:{port}", security_protocol="SASL_PLAINTEXT",
                    sasl_mechanism=MECHANISM, sasl_plain_username=user,
                    sasl_plain_password=PASSWORDS[user])


def kp_describe_refused(port: int, user: str) -> None:
    """kafka-python's DescribeAcls as `user` raises ClusterAuthorizationFailedError."""
    from kafka.admin import (ACLFilter, ACLOperation, ACLPermissionType,
                             ACLResourcePatternType, ResourcePatternFilter)
    from kafka.admin import ResourceType as KpResourceType
    from kafka.errors import ClusterAuthorizationFailedError

    admin = kp_admin_as(port, user)
    try:
        flt = ACLFilter(principal=None, host=None, operation=ACLOperation.ANY,
                        permission_type=ACLPermissionType.ANY,
                        resource_pattern=ResourcePatternFilter(KpResourceType.ANY, None,
                                                               ACLResourcePatternType.ANY))
        with pytest.raises(ClusterAuthorizationFailedError):
            admin.describe_acls(flt)
    finally:
        admin.close()


def kp_scram_describe_refused(port: int, user: str) -> None:
    """kafka-python's DescribeUserScramCredentials as `user` raises
    ClusterAuthorizationFailedError."""
    from kafka.errors import ClusterAuthorizationFailedError

    admin = kp_admin_as(port, user)
    try:
        with pytest.raises(ClusterAuthorizationFailedError):
            admin.describe_user_scram_credentials()
        with pytest.raises(ClusterAuthorizationFailedError):
            admin.describe_user_scram_credentials([user])
    finally:
        admin.close()


def watermarks(port: int, topic: str) -> tuple[int, int]:
    """(low, high) of partition 0 of `topic`, as the super user."""
    c = Consumer(conf(port, ADMIN, **{"group.id": unique_name("watermarks")}))
    try:
        return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)
    finally:
        c.close()


def topic_names(port: int, user: str) -> set[str]:
    return set(admin_client(port, user).list_topics(timeout=10).topics)


# --------------------------------------------------------------------------
# 1. a prefixed WRITE allow


def test_prefixed_write_allows_only_matching_topics(shoal_factory):
    _s, port = acl_shoal(shoal_factory)
    create_topics(port, "orders-eu", "payments")
    admin = admin_client(port, ADMIN)
    create_acls(admin, acl(ResourceType.TOPIC, "orders-", "User:alice", AclOperation.WRITE,
                           pattern=ResourcePatternType.PREFIXED))

    values = [f"order {i}".encode() for i in range(5)]
    reports = produce(port, ALICE, "orders-eu", values)
    assert [e for e, _ in reports] == [None] * 5, reports
    assert [o for _, o in reports] == list(range(5)), reports

    err = produce_refused(port, ALICE, "payments")
    assert err is not None and err.code() == TOPIC_AUTHZ, err

    # She may not read what she wrote: no READ on the topic, no group ACL.
    err = consume_refused(port, ALICE, "orders-eu", {TOPIC_AUTHZ, GROUP_AUTHZ},
                          group=unique_name("alice-orders"), subscribe=True)
    assert err.code() in (TOPIC_AUTHZ, GROUP_AUTHZ), err
    # The records are there: the super user reads them.
    consume_ok(port, ADMIN, "orders-eu", values)
    # And nothing reached `payments`.
    assert watermarks(port, "payments") == (0, 0)


# --------------------------------------------------------------------------
# 2. deny wins over allow


def test_deny_overrides_allow(shoal_factory):
    _s, port = acl_shoal(shoal_factory)
    create_topics(port, "public", "secret")
    admin = admin_client(port, ADMIN)
    create_acls(admin,
                acl(ResourceType.TOPIC, "*", "User:*", AclOperation.ALL),
                acl(ResourceType.GROUP, "*", "User:*", AclOperation.ALL),
                acl(ResourceType.TOPIC, "secret", "User:bob", AclOperation.READ,
                    AclPermissionType.DENY))
    public = [b"p0", b"p1", b"p2"]
    secret = [b"s0", b"s1", b"s2"]
    produce_ok(port, ADMIN, "public", public)
    produce_ok(port, ADMIN, "secret", secret)

    consume_ok(port, BOB, "public", public)
    consume_ok(port, BOB, "public", public, group=unique_name("bob"), subscribe=True)
    err = consume_refused(port, BOB, "secret", {TOPIC_AUTHZ})
    assert err.code() == TOPIC_AUTHZ
    err = consume_refused(port, BOB, "secret", {TOPIC_AUTHZ}, group=unique_name("bob"),
                          subscribe=True)
    assert err.code() == TOPIC_AUTHZ
    consume_ok(port, ALICE, "secret", secret)
    # Only READ is denied: bob still writes to `secret` and sees it listed.
    produce_ok(port, BOB, "secret", [b"from bob"])
    assert {"public", "secret"} <= topic_names(port, BOB)


# --------------------------------------------------------------------------
# 3. group ACLs


def test_group_acl_needed_to_consume_and_commit(shoal_factory):
    _s, port = acl_shoal(shoal_factory)
    create_topics(port, "t")
    values = [f"t{i}".encode() for i in range(5)]
    produce_ok(port, ADMIN, "t", values)
    admin = admin_client(port, ADMIN)
    create_acls(admin, acl(ResourceType.TOPIC, "t", "User:alice", AclOperation.READ))

    err = consume_refused(port, ALICE, "t", {GROUP_AUTHZ}, group="g1", subscribe=True)
    assert err.code() == GROUP_AUTHZ, err
    create_acls(admin, acl(ResourceType.GROUP, "g1", "User:alice", AclOperation.READ))
    c = Consumer(conf(port, ALICE, **{"group.id": "g1", "enable.auto.commit": False,
                                      "auto.offset.reset": "earliest"}))
    try:
        c.subscribe(["t"])
        got: list = []
        deadline = time.monotonic() + 30
        while len(got) < len(values):
            assert time.monotonic() < deadline, f"alice consumed {len(got)} of {len(values)}"
            for m in c.consume(num_messages=100, timeout=0.5):
                assert m.error() is None, f"alice, group g1: {m.error()}"
                got.append(m)
        assert [m.value() for m in got] == values
        committed = c.commit(asynchronous=False)
        assert [(tp.topic, tp.partition, tp.offset, tp.error) for tp in committed] == \
            [("t", 0, 5, None)], committed
        [tp] = c.committed([TopicPartition("t", 0)], timeout=30)
        assert tp.offset == 5 and tp.error is None, tp
    finally:
        c.close()
    # The super user sees the group's committed offset too.
    res = admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions("g1")],
        request_timeout=30)["g1"].result(timeout=60)
    assert [(tp.topic, tp.offset) for tp in res.topic_partitions] == [("t", 5)], res
    # bob has no group ACL: the group's offsets are not his to read.
    bob_admin = admin_client(port, BOB)
    fut = bob_admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions("g1")],
        request_timeout=30)["g1"]
    refused_with(fut, GROUP_AUTHZ)


# --------------------------------------------------------------------------
# 4. Metadata hides what may not be described


def test_metadata_hides_topics_without_describe(shoal_factory):
    _s, port = acl_shoal(shoal_factory)
    create_topics(port, "visible", "hidden")
    admin = admin_client(port, ADMIN)
    create_acls(admin, acl(ResourceType.TOPIC, "visible", "User:alice", AclOperation.DESCRIBE))

    alice = admin_client(port, ALICE)
    names = set(alice.list_topics(timeout=10).topics)
    assert "visible" in names and "hidden" not in names, names
    # Asked for by name, the hidden one answers TOPIC_AUTHORIZATION_FAILED.
    md = alice.list_topics(topic="hidden", timeout=10)
    assert md.topics["hidden"].error is not None
    assert md.topics["hidden"].error.code() == TOPIC_AUTHZ, md.topics["hidden"].error
    # bob, with no ACL at all, sees nothing; the super user sees both.
    assert not {"visible", "hidden"} & topic_names(port, BOB)
    assert {"visible", "hidden"} <= topic_names(port, ADMIN)

    # Auto-creation needs CREATE: alice's producer cannot make `auto-a` ...
    err = produce_refused(port, ALICE, "auto-a")
    assert err is not None and err.code() == TOPIC_AUTHZ, err
    assert "auto-a" not in topic_names(port, ADMIN)
    # ... until she may create (and write) topics named auto-*.
    create_acls(admin,
                acl(ResourceType.TOPIC, "auto-", "User:alice", AclOperation.CREATE,
                    pattern=ResourcePatternType.PREFIXED),
                acl(ResourceType.TOPIC, "auto-", "User:alice", AclOperation.WRITE,
                    pattern=ResourcePatternType.PREFIXED))
    produce_ok(port, ALICE, "auto-b", [b"auto-created"])
    assert "auto-b" in topic_names(port, ADMIN)


# --------------------------------------------------------------------------
# 5. the ACL and SCRAM admin APIs


def test_only_super_users_manage_acls_and_users(shoal_factory):
    _s, port = acl_shoal(shoal_factory)
    create_topics(port, "x")
    alice = admin_client(port, ALICE)
    admin = admin_client(port, ADMIN)
    grant = acl(ResourceType.TOPIC, "x", "User:alice", AclOperation.WRITE)

    bob_reads = acl(ResourceType.TOPIC, "x", "User:bob", AclOperation.READ)
    create_acls(admin, bob_reads)

    # alice may not grant herself anything, nor look at the ACLs ...
    [fut] = alice.create_acls([grant], request_timeout=30).values()
    refused_with(fut, CLUSTER_AUTHZ)
    # DescribeAcls answers CLUSTER_AUTHORIZATION_FAILED; kafka-python raises
    # it. librdkafka drops that response's top-level error code (its
    # DescribeAcls parser ignores it), so confluent's future succeeds, but
    # with nothing in it.
    kp_describe_refused(port, ALICE)
    assert alice.describe_acls(everything(), request_timeout=30).result(timeout=60) == []
    [fut] = alice.delete_acls([everything()], request_timeout=30).values()
    refused_with(fut, CLUSTER_AUTHZ)
    assert describe_acls(admin) == [bob_reads]
    # ... nor manage SCRAM users. (DescribeUserScramCredentials goes through
    # kafka-python: librdkafka frees a static or stack string when that
    # response carries a request-level error and aborts the process.)
    kp_scram_describe_refused(port, ALICE)
    upsert = UserScramCredentialUpsertion(
        "mallory", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096), b"mallory-Pa55word")
    refused_with(alice.alter_user_scram_credentials([upsert], request_timeout=30)["mallory"],
                 CLUSTER_AUTHZ)
    futs = admin.describe_user_scram_credentials(["mallory"], request_timeout=30)
    refused_with(futs["mallory"], KafkaError.RESOURCE_NOT_FOUND)
    err = produce_refused(port, ALICE, "x")
    assert err is not None and err.code() == TOPIC_AUTHZ, err

    # The super user may.
    futs = admin.describe_user_scram_credentials([ALICE, BOB], request_timeout=30)
    for user, fut in futs.items():
        desc = fut.result(timeout=60)
        assert [(i.mechanism, i.iterations) for i in desc.scram_credential_infos] == \
            [(ScramMechanism.SCRAM_SHA_512, 4096)], (user, desc)
    create_acls(admin, grant)
    assert sorted(map(str, describe_acls(admin))) == sorted(map(str, [bob_reads, grant]))
    kp_describe_refused(port, ALICE)
    produce_ok(port, ALICE, "x", [b"granted"])

    # DeleteAcls takes the binding away, and the right with it.
    only_alice = AclBindingFilter(ResourceType.TOPIC, "x", ResourcePatternType.LITERAL,
                                  "User:alice", None, AclOperation.ANY, AclPermissionType.ANY)
    [fut] = admin.delete_acls([only_alice], request_timeout=30).values()
    assert fut.result(timeout=60) == [grant]
    assert describe_acls(admin) == [bob_reads]

    def refused_again():
        err = produce_refused(port, ALICE, "x")
        return err is not None and err.code() == TOPIC_AUTHZ
    wait_for(refused_again, 15, "alice to be refused after DeleteAcls", interval=0.2)

    # Every user, as the super user: librdkafka asks with an empty user list,
    # which Kafka's schema defines as "null/empty to describe all users".
    users = admin.describe_user_scram_credentials(request_timeout=30).result(timeout=60)
    assert set(users) == {ADMIN, ALICE, BOB}, users


# --------------------------------------------------------------------------
# 6. ACLs reach every broker of a cluster


def test_acls_propagate_to_every_broker(tmp_path, request):
    c = Cluster(tmp_path, placements=1, brokers=2)
    request.node._shoal_instances = c.processes
    taken = {p.http_port for p in c.placements} | \
        {port for b in c.brokers for port in (b.kafka_port, b.http_port, b.mqtt_port)}
    sasl: dict[int, int] = {}
    for b in c.brokers:
        port = free_port()
        while port in taken:
            port = free_port()
        taken.add(port)
        sasl[b.node_id] = port
        # Keep a PLAINTEXT listener on the harness' --kafka-addr port: the
        # harness waits for every broker through it (as User:ANONYMOUS).
        b.extra_args = ["--kafka-listeners",
                        f"PLAINTEXT://127.0.0.1:{b.kafka_port},"
                        f"SASL_PLAINTEXT://127.0.0.1:{port}",
                        "--sasl-mechanisms", MECHANISM, *AUTHORIZER]
    try:
        c.start()
        add_users("--server", c.placements[0].http_base)
        # Brokers follow placement's users: wait until each lets them in.
        for node_id, port in sasl.items():
            for user in (ADMIN, ALICE):
                wait_for(lambda p=port, u=user: admin_client(p, u).list_topics(timeout=2)
                         .brokers, 30, f"{user} to authenticate on broker {node_id}",
                         interval=0.2)

        topic = unique_name("acl-cluster")
        create_topics(sasl[1], topic, partitions=6)

        def owners():
            got = c.owners(topic)
            return got if len(got) == 6 and set(got.values()) == {1, 2} else None
        got = wait_for(owners, 30, f"partitions of {topic} on both brokers", interval=0.2)
        # One partition led by each broker; a client bootstrapped on a broker
        # and producing to a partition that broker leads is authorized there.
        part = {node: next(p for p, o in sorted(got.items()) if o == node) for node in (1, 2)}

        def outcome(node: int) -> Optional[int]:
            err = produce_refused(sasl[node], ALICE, topic, part[node])
            return None if err is None else err.code()

        assert outcome(1) == TOPIC_AUTHZ and outcome(2) == TOPIC_AUTHZ

        # Created through broker 1: librdkafka sends the ACL APIs to the
        # controller, which Metadata says is broker 1 (the lowest live id);
        # broker 2 learns the ACL from placement.
        admin1 = admin_client(sasl[1], ADMIN)
        assert admin1.list_topics(timeout=10).controller_id == 1
        grant = acl(ResourceType.TOPIC, topic, "User:alice", AclOperation.WRITE)
        create_acls(admin1, grant)
        for node in (2, 1):
            wait_for(lambda n=node: outcome(n) is None, 10,
                     f"alice's WRITE to reach broker {node}", interval=0.2)
        # broker 2 describes what broker 1 created.
        admin2 = admin_client(sasl[2], ADMIN)
        wait_for(lambda: describe_acls(admin2) == [grant], 10, "broker 2 to describe the ACL")

        # Deleted through broker 1: refused on both again.
        [fut] = admin1.delete_acls([everything()], request_timeout=30).values()
        assert fut.result(timeout=60) == [grant]
        for node in (2, 1):
            wait_for(lambda n=node: outcome(n) == TOPIC_AUTHZ, 10,
                     f"alice to be refused on broker {node} after DeleteAcls", interval=0.2)
    finally:
        c.cleanup()


# --------------------------------------------------------------------------
# 7. without --authorizer


def test_nothing_enforced_without_the_authorizer(shoal_factory):
    _s, port = acl_shoal(shoal_factory, authorizer=False)
    alice = admin_client(port, ALICE)
    topic = unique_name("open")
    alice.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)],
                        request_timeout=30)[topic].result(timeout=60)
    # Without an authorizer ACLs mean nothing: Kafka answers SECURITY_DISABLED.
    deny = acl(ResourceType.TOPIC, "*", "User:alice", AclOperation.ALL, AclPermissionType.DENY)
    [fut] = alice.create_acls([deny], request_timeout=30).values()
    with pytest.raises(KafkaException) as refused:
        fut.result(timeout=30)
    assert refused.value.args[0].code() == KafkaError.SECURITY_DISABLED, refused.value
    values = [b"a", b"b", b"c"]
    wait_for(lambda: topic in topic_names(port, ALICE), 30, f"{topic} in alice's metadata")
    produce_ok(port, ALICE, topic, values)
    consume_ok(port, ALICE, topic, values, group="g-open", subscribe=True)
    consume_ok(port, BOB, topic, values)
    [fut] = alice.delete_topics([topic], request_timeout=30).values()
    fut.result(timeout=60)


# --------------------------------------------------------------------------
# 8. a client certificate's subject is the principal ACLs name


def test_mtls_certificate_principal_drives_acls(shoal_factory, tmp_path):
    from certs import CLIENT_PRINCIPAL, make_certs

    certs = make_certs(tmp_path / "certs")
    kafka, http, mqtt, ssl, sasl = distinct_ports(5)
    s = shoal_factory(kafka_port=kafka, http_port=http, mqtt_port=mqtt, extra_args=[
        "--kafka-listeners", f"SSL://127.0.0.1:{ssl},SASL_PLAINTEXT://127.0.0.1:{sasl}",
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--tls-client-ca", str(certs.ca), "--sasl-mechanisms", MECHANISM, *AUTHORIZER])
    add_users("--data-dir", str(s.data_dir), users=[ADMIN])
    s.start()

    ssl_base = {"bootstrap.servers": f"127.0.0.1:{ssl}", "broker.address.family": "v4",
                "logger": RDKAFKA_LOGGER, "security.protocol": "SSL",
                "ssl.ca.location": str(certs.ca)}
    # The client certificate: User:CN=alice,OU=eng,O=acme.
    mtls = {**ssl_base, "ssl.certificate.location": str(certs.client_cert),
            "ssl.key.location": str(certs.client_key)}

    create_topics(sasl, "t", "marker")
    [(err, _)] = produce_as(mtls, "alice's certificate", "t", [b"refused"])
    assert err is not None and err.code() == TOPIC_AUTHZ, err

    # Near misses grant nothing: the SASL-style name, the subject in openssl's
    # (first RDN first) order, the common name alone.
    admin = admin_client(sasl, ADMIN)
    near_misses = ["User:alice", "User:O=acme,OU=eng,CN=alice", "User:CN=alice"]
    assert CLIENT_PRINCIPAL not in near_misses
    create_acls(admin, *[acl(ResourceType.TOPIC, "t", p, AclOperation.WRITE)
                         for p in near_misses])
    # Once the certificate's principal may describe `marker`, the ACL set
    # with the near misses (created before) is in force on the broker too.
    create_acls(admin, acl(ResourceType.TOPIC, "marker", CLIENT_PRINCIPAL,
                           AclOperation.DESCRIBE))
    wait_for(lambda: "marker" in AdminClient(mtls).list_topics(timeout=10).topics, 30,
             "the certificate's principal to see `marker`", interval=0.2)
    assert "t" not in AdminClient(mtls).list_topics(timeout=10).topics
    [(err, _)] = produce_as(mtls, "alice's certificate", "t", [b"still refused"])
    assert err is not None and err.code() == TOPIC_AUTHZ, err

    # WRITE on `t` for the certificate's principal, exactly: it produces.
    create_acls(admin, acl(ResourceType.TOPIC, "t", CLIENT_PRINCIPAL, AclOperation.WRITE))
    values = [b"from alice's certificate 0", b"from alice's certificate 1"]

    def delivered():
        [(err, offset)] = produce_as(mtls, "alice's certificate", "t", values[:1])
        return (offset,) if err is None else None
    assert wait_for(delivered, 30, f"{CLIENT_PRINCIPAL} to produce to t",
                    interval=0.2) == (0,)
    reports = produce_as(mtls, "alice's certificate", "t", values[1:])
    assert reports == [(None, 1)], reports

    # A TLS client without a certificate (User:ANONYMOUS) is still refused.
    [(err, _)] = produce_as(ssl_base, "a client without a certificate", "t", [b"anonymous"])
    assert err is not None and err.code() == TOPIC_AUTHZ, err
    # Only the certificate's records are in `t`.
    consume_ok(sasl, ADMIN, "t", values)
    assert s.http("/health").status == 200


# --------------------------------------------------------------------------
# 7. `shoal broker --config`


def test_a_broker_takes_its_security_settings_from_a_config_file(tmp_path, request):
    c = Cluster(tmp_path, placements=1, brokers=1)
    request.node._shoal_instances = c.processes
    b = c.brokers[0]
    taken = {b.kafka_port, b.http_port, b.mqtt_port, c.placements[0].http_port}
    sasl = free_port()
    while sasl in taken:
        sasl = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(
        f'kafka-listeners = "PLAINTEXT://127.0.0.1:{b.kafka_port},'
        f'SASL_PLAINTEXT://127.0.0.1:{sasl}"\n'
        f'sasl-mechanisms = "{MECHANISM}"\n'
        'authorizer = true\n'
        f'super-users = "User:{ADMIN}"\n')
    b.extra_args = ["--config", str(config)]
    try:
        c.start()
        add_users("--server", c.placements[0].http_base, users=(ADMIN, ALICE))
        wait_for(lambda: admin_client(sasl, ADMIN).list_topics(timeout=2).brokers, 30,
                 "the super user to authenticate on the file's SASL listener", interval=0.2)
        topic = unique_name("from-file")
        create_topics(sasl, topic)
        # The file's authorizer is on: alice, with no ACL, does not see it;
        # the super user does.
        assert topic in admin_client(sasl, ADMIN).list_topics(timeout=10).topics
        assert topic not in admin_client(sasl, ALICE).list_topics(timeout=10).topics
    finally:
        c.cleanup()

    # A misspelt key is an error, not a setting silently ignored.
    bad = tmp_path / "bad.toml"
    bad.write_text("authoriser = true\n")
    out = subprocess.run([shoal_bin(), "broker", "--config", str(bad), "--node-id", "9",
                          "--placement", "127.0.0.1:1", "--object-store",
                          f"file://{tmp_path / 'objects'}", "--data-dir", str(tmp_path / "b9")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "authoriser" in out.stderr, out.stderr
