"""A foreign client: a libzmq XSUB (pyzmq) that subscribes to a prefix
twice, then cancels it twice. libzmq's XSUB passes both subscribes on but
only the last cancel (it counts them, leaving the set to the publisher, as
libzmq's XPUB keeps one): a publisher that counted them kept sending.

usage: xsub_cancel.py ENDPOINT COUNT
Reads COUNT messages after the cancel took effect and prints one JSON
object: messages per channel (the topic's second part).
"""
import json
import sys

import zmq

endpoint, count = sys.argv[1], int(sys.argv[2])
ctx = zmq.Context()
x = ctx.socket(zmq.XSUB)
x.setsockopt(zmq.RCVTIMEO, 30000)
# Sent to the publisher once connected; the first message proves it is.
x.send(b"\x01synthetic.price")
x.connect(endpoint)
assert x.recv_multipart()[0].startswith(b"synthetic.price")
for m in [b"\x01synthetic.t", b"\x01synthetic.t", b"\x00synthetic.t", b"\x00synthetic.t"]:
    x.send(m)
# A fence: the publisher handles a peer's subscriptions in order and queues
# messages in order, so after the first "odds" nothing subscribed before
# the cancel can follow.
x.send(b"\x01synthetic.odds")
while not x.recv_multipart()[0].startswith(b"synthetic.odds"):
    pass
by_channel = {}
for _ in range(count):
    ch = x.recv_multipart()[0].split(b".")[1].decode()
    by_channel[ch] = by_channel.get(ch, 0) + 1
print(json.dumps(by_channel, sort_keys=True))
