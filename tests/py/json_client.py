"""Submits a task to Flotilla as plain JSON with nats-py (no Flotilla code) and prints the
`completed` event it reads back. Usage: json_client.py NATS_URL [PREFIX]"""
import asyncio
import json
import sys
import uuid

import flotilla_connect


async def main(url: str, prefix: str) -> None:
    nc = await flotilla_connect.connect(url)
    js = nc.jetstream()
    task_id = "py-" + uuid.uuid4().hex[:12]
    task = {
        "id": task_id,
        "capability": "work",
        "input": {"text": "hello from python"},
        "priority": "interactive",
        "tenant": "python",
    }
    # Listening first (a tenant's submitter may subscribe to its own tenant's events), then
    # submitting on the tenant's own subject, acked by the stream.
    sub = await nc.subscribe(f"{prefix}.events.task.python.{task_id}.completed")
    ack = await js.publish(
        f"{prefix}.tasks.submit.python",
        json.dumps(task).encode(),
        headers={"Content-Type": "application/json"},
    )
    msg = await sub.next_msg(timeout=30)
    event = json.loads(msg.data)
    print(json.dumps({"id": task_id, "stream": ack.stream, "seq": ack.seq, "event": event}))
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "flotilla"))
