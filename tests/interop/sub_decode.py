"""A foreign client: a libzmq SUB (pyzmq) reading nbpy's bus.

usage: sub_decode.py ENDPOINT COUNT v1|legacy [PREFIX]
PREFIX is the subscription (default: everything); every message received
must match it.
Prints one JSON line summarising what it decoded; exits non-zero on any
message it could not read.
"""
import json
import sys

import zmq

endpoint, count, codec = sys.argv[1], int(sys.argv[2]), sys.argv[3]
prefix = sys.argv[4].encode() if len(sys.argv) > 4 else b""
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, prefix)
sub.setsockopt(zmq.RCVTIMEO, 30000)
sub.connect(endpoint)

summary = {"count": 0, "by_kind": {}, "first_seq": None, "last_seq": None, "in_order": True}
for _ in range(count):
    frames = sub.recv_multipart()
    assert frames[0].startswith(prefix), (prefix, frames[0])
    if codec == "v1":
        assert len(frames) == 2, frames
        topic = frames[0].decode()
        env = json.loads(frames[1])
        assert env["v"] == 1
        assert topic == f'{env["src"]}.{env["ch"]}.{env["sym"]}', (topic, env)
        assert isinstance(env["data"], dict) and env["data"]
        seq = env["seq"]
        if summary["last_seq"] is not None and seq != summary["last_seq"] + 1:
            summary["in_order"] = False
        summary["first_seq"] = summary["first_seq"] or seq
        summary["last_seq"] = seq
        kind = env["ch"]
    else:
        assert len(frames) == 1, frames
        text = frames[0].decode()
        name, rest = text.split(" ", 1)
        values = rest.split("\x01")
        int(values[1])  # exchange time in ns
        kind = name
    summary["by_kind"][kind] = summary["by_kind"].get(kind, 0) + 1
    summary["count"] += 1
print(json.dumps(summary))
