"""Publishes N JSON events on a Flotilla topic with nats-py (plain core publishes, no Flotilla
code); the topics stream stores them. Usage: topic_publisher.py NATS_URL PREFIX TOPIC N"""
import asyncio
import json
import sys

import flotilla_connect


async def main(url: str, prefix: str, topic: str, n: int) -> None:
    nc = await flotilla_connect.connect(url)
    js = nc.jetstream()
    for k in range(n):
        # Acked by the stream, so none is lost on the way.
        await js.publish(f"{prefix}.topics.{topic}", json.dumps({"text": f"order {k}", "order": k}).encode(),
                         headers={"Content-Type": "application/json"})
    await nc.close()
    print(json.dumps({"published": n}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
