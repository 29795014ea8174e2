"""How MQTT rides out a broker outage, measured against a real mosquitto on 127.0.0.1.

    python benchmarks/mqtt_reconnect.py [--outages 3,20] [--rate 10]

For each outage length: an app-like producer queues one event every 1/rate s (and a count change with
each), the broker is stopped for that long and started again on the same port; a subscriber counts what
arrives. Printed per outage: when the publisher noticed, its connection attempts, how long after the
broker came back it was connected again (the backoff decides), how long until the queue was empty, and
events sent, received (distinct), duplicated (QoS 1 resends) and dropped (queue overflow). The config
is the default one (reconnect 1 s doubling to 60 s, queue of 1000 events, QoS 1). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import MqttConfig  # noqa: E402
from app.mqtt import MqttPublisher  # noqa: E402
from app.sinks import NullLog  # noqa: E402
from tests.mosquitto import MOSQUITTO, Broker, Listener, wait_for  # noqa: E402

PREFIX = "bench/cam"


def one_outage(folder: Path, outage_s: float, rate: float) -> dict:
    broker = Broker(folder).start()
    cfg = MqttConfig(enabled=True, host="127.0.0.1", port=broker.port, topic_prefix=PREFIX, client_id="bench")
    pub = MqttPublisher(cfg, ["person"], tracks=True).start()
    tee = pub.tee(NullLog())
    assert wait_for(pub.connected.is_set, 10)
    lis = Listener(broker.port, (f"{PREFIX}/events",))
    sent = 0
    running = threading.Event()
    running.set()

    def produce() -> None:
        nonlocal sent
        while running.is_set():
            tee.event({"event": "update", "label": "person", "n": sent})
            sent += 1
            time.sleep(1.0 / rate)

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(2.0)
    t_down = time.monotonic()
    broker.stop()
    wait_for(lambda: not pub.connected.is_set(), 30, 0.005)
    noticed = time.monotonic() - t_down
    attempts_before = pub.connect_failures
    time.sleep(max(0.0, outage_s - (time.monotonic() - t_down)))
    lis.close()
    before = [json.loads(p)["n"] for p in lis.on(f"{PREFIX}/events")]
    broker.start()
    t_up = time.monotonic()
    lis = Listener(broker.port, (f"{PREFIX}/events",))
    wait_for(pub.connected.is_set, 120, 0.005)
    reconnected = time.monotonic() - t_up
    wait_for(lambda: pub.outbox.queued_events() == 0, 60, 0.005)
    drained = time.monotonic() - t_up
    time.sleep(2.0)
    running.clear()
    producer.join()
    wait_for(lambda: pub.outbox.pending() == 0 and pub._inflight == 0, 30)
    time.sleep(0.5)
    pub.close()
    # one subscriber until the broker stopped, another from its restart on (the queue is held until then)
    lis.close()
    broker.stop()
    numbers = before + [json.loads(p)["n"] for p in lis.on(f"{PREFIX}/events")]
    return {
        "outage_s": outage_s, "noticed_after_s": round(noticed, 3),
        "attempts_during_outage": pub.connect_failures - attempts_before + 1,
        "connected_after_broker_up_s": round(reconnected, 2), "queue_empty_after_broker_up_s": round(drained, 2),
        "sent": sent, "received": len(set(numbers)), "missing": len(set(range(sent)) - set(numbers)),
        "duplicates": len(numbers) - len(set(numbers)), "dropped": pub.outbox.dropped,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outages", default="3,20", help="outage lengths in seconds, comma separated")
    ap.add_argument("--rate", type=float, default=10.0, help="events a second while it runs")
    args = ap.parse_args(argv)
    if MOSQUITTO is None:
        print("mqtt_reconnect: SKIPPED: mosquitto is not installed")
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, outage in enumerate(float(x) for x in args.outages.split(",")):
            r = one_outage(Path(tmp) / str(i), outage, args.rate)
            results.append(r)
            print(f"outage {outage:g} s: noticed after {r['noticed_after_s']} s, {r['attempts_during_outage']} "
                  f"connection attempts, connected {r['connected_after_broker_up_s']} s after the broker was back, "
                  f"queue empty after {r['queue_empty_after_broker_up_s']} s; {r['sent']} events sent, "
                  f"{r['received']} received, {r['missing']} missing, {r['dropped']} dropped, "
                  f"{r['duplicates']} duplicates")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
