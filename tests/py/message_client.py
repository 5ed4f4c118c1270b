"""Talks to Flotilla's message router with nats-py and plain JSON (no Flotilla code): sends a
message to an agent as client identity "py" and waits for the agent's answer on the client's
inbox subject; then tries to forge senders. Prints what it saw as JSON.
Usage: message_client.py NATS_URL PREFIX AGENT_ID OTHER_RUNNER_ID"""
import asyncio
import json
import sys

import flotilla_connect
import nats

HEADERS = {"Content-Type": "application/json"}


async def main(url: str, prefix: str, agent: str, other_runner: str) -> None:
    nc = await flotilla_connect.connect(url)
    out = {}
    # Replies to client "py" are stored on <p>.inbox.client.py and published there live.
    replies = await nc.subscribe(f"{prefix}.inbox.client.py")

    async def send(subject: str, message: dict) -> dict:
        msg = await nc.request(subject, json.dumps(message).encode(), timeout=10, headers=HEADERS)
        return json.loads(msg.data)

    ask = {"id": "py-question", "to": {"agent": agent}, "body": {"text": "hello from python"},
           "wants_reply": True, "priority": "interactive"}
    out["sent"] = await send(f"{prefix}.msg.send.client.py", ask)
    msg = await replies.next_msg(timeout=20)
    out["reply"] = json.loads(msg.data)
    # A client claiming to be an agent.
    out["as_agent"] = await send(f"{prefix}.msg.send.client.py",
                                 {"from": agent, "to": {"agent": agent}, "body": "forged"})
    # A "runner" claiming an agent it does not host (with authentication on, the server does not
    # let a client publish there at all, and the request gets no answer).
    try:
        msg = await nc.request(f"{prefix}.msg.send.runner.{other_runner}",
                               json.dumps({"from": agent, "to": {"agent": agent}, "body": "forged"}).encode(),
                               timeout=2, headers=HEADERS)
        out["wrong_runner"] = json.loads(msg.data)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        out["wrong_runner"] = {"denied": True}
    # Unknown fields and wrong types get a reason.
    out["unknown_field"] = await send(f"{prefix}.msg.send.client.py",
                                      {"to": {"agent": agent}, "body": "x", "colour": "red"})
    out["bad_priority"] = await send(f"{prefix}.msg.send.client.py",
                                     {"to": {"agent": agent}, "body": "x", "priority": "urgent!"})
    print(json.dumps(out))
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
