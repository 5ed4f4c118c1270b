"""Connects nats-py the way a plain client of an authenticated Flotilla does: with the nkey seed
file `flotilla auth` wrote (FLOTILLA_CREDS), taking replies on the identity's own inbox prefix
(`_INBOX_<public key>`). Without FLOTILLA_CREDS it connects anonymously."""
import os

import nats


def inbox_prefix(seed_file: str) -> str:
    import nkeys

    with open(seed_file, "rb") as f:
        seed = next(line.strip() for line in f if line.strip().startswith(b"SU"))
    return "_INBOX_" + nkeys.from_seed(bytearray(seed)).public_key.decode()


async def connect(url: str):
    creds = os.environ.get("FLOTILLA_CREDS")
    if not creds:
        return await nats.connect(url)
    return await nats.connect(url, nkeys_seed=creds, inbox_prefix=inbox_prefix(creds))


def signed_headers(subject: str, payload: bytes, headers: dict) -> dict:
    """`headers` plus an operator's signature of a control request (what services check when
    authentication is on): `<subject>\\n<signed-at ms>\\n<payload>`, signed with the seed's key."""
    import base64
    import time

    import nkeys

    creds = os.environ.get("FLOTILLA_CREDS")
    if not creds:
        return headers
    with open(creds, "rb") as f:
        seed = next(line.strip() for line in f if line.strip().startswith(b"SU"))
    kp = nkeys.from_seed(bytearray(seed))
    at = str(int(time.time() * 1000))
    sig = kp.sign(subject.encode() + b"\n" + at.encode() + b"\n" + payload)
    return {
        **headers,
        "Flotilla-Signer": kp.public_key.decode(),
        "Flotilla-Signed-At": at,
        "Flotilla-Signature": base64.urlsafe_b64encode(sig).decode().rstrip("="),
    }
