"""Cancels Flotilla tasks with nats-py and one plain JSON request each (no Flotilla code), and
prints the dispatcher's answers as a JSON list. Usage: cancel_client.py NATS_URL PREFIX TASK_ID..."""
import asyncio
import json
import sys

import flotilla_connect


async def main(url: str, prefix: str, task_ids: list[str]) -> None:
    nc = await flotilla_connect.connect(url)
    answers = []
    for task_id in task_ids:
        request = json.dumps({"task_id": task_id, "reason": "cancelled from python"}).encode()
        subject = f"{prefix}.dispatcher.cancel"
        # Signed by the operator's key when there is one (authentication on).
        headers = flotilla_connect.signed_headers(subject, request, {"Content-Type": "application/json"})
        msg = await nc.request(subject, request, timeout=10, headers=headers)
        answers.append(json.loads(msg.data))
    print(json.dumps(answers))
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
