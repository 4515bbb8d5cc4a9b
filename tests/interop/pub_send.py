"""A foreign publisher: pyzmq sends both codecs for nbpy's subscriber to store.

usage: pub_send.py ENDPOINT COUNT
Binds an XPUB (so it can wait for the subscriber's subscription instead of
guessing), then sends COUNT v1 envelopes (kraken_tick) and COUNT legacy
frames (oanda_tick).
"""
import json
import sys
import time

import zmq

endpoint, count = sys.argv[1], int(sys.argv[2])
ctx = zmq.Context()
pub = ctx.socket(zmq.XPUB)
pub.setsockopt(zmq.SNDHWM, 0)
pub.bind(endpoint)
pub.setsockopt(zmq.RCVTIMEO, 30000)
sub = pub.recv()
assert sub[0] == 1, sub

now = time.time_ns()
for i in range(1, count + 1):
    env = {
        "v": 1, "src": "pyzmq", "ch": "ticker", "sym": "PY/USD", "pub": "py",
        "seq": i, "epoch": 7, "ts": now + i, "rx": now + i,
        "data": {"bid": 100.0 + i, "ask": 101.0 + i, "last": 100.5},
    }
    pub.send_multipart([f'pyzmq.ticker.PY/USD'.encode(), json.dumps(env).encode()])
for i in range(1, count + 1):
    # legacy: instrument, time, source, then oanda_tick's fields in schema order
    values = ["EUR_USD", str(now + i), "pyleg", repr(1.1 + i / 1e6), repr(1.2 + i / 1e6), "0.1", "1000000.0", "true"]
    pub.send(("oanda_tick " + "\x01".join(values)).encode())
pub.setsockopt(zmq.LINGER, 10000)
pub.close()
ctx.term()
print("sent", count)
