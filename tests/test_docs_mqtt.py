"""docs/protocol/mqtt.md documents exactly the MQTT topics and messages the code defines."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from pydantic import BaseModel

from common import signedrecord, topics
from common.tls.identities import Identity

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol" / "mqtt.md"


def _models() -> set[str]:
    found = {
        name
        for name, obj in vars(topics).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseModel)
        and obj.__module__ == topics.__name__
        and not name.startswith("_")
    }
    return found | {signedrecord.Envelope.__name__}


def test_every_message_model_is_documented_and_nothing_else() -> None:
    """Each pydantic model of common/topics.py (and the signed envelope) has its own section in
    docs/protocol/mqtt.md, and every model section there names a model that exists."""
    documented = set(re.findall(r"^### `(\w+)`$", DOC.read_text(), flags=re.MULTILINE))
    assert documented == _models(), (
        f"undocumented: {sorted(_models() - documented)}; "
        f"documented but gone: {sorted(documented - _models())}"
    )


def test_every_topic_is_in_the_topic_table() -> None:
    """Each topic function of common/topics.py appears, with its placeholders, in the table."""
    text = DOC.read_text()
    uuid_ = "{uuid}"
    samples = {
        topics.member("{cluster}", "{node}"),
        topics.owner("{cluster}"),
        topics.alerts("{cluster}"),
        topics.vm_site(uuid_, "{site}"),  # type: ignore[arg-type]
        topics.host("{host}"),
        topics.requests("{host}"),
        f"{topics.ROOT}/replies/{{role}}/{{label}}",
    }
    missing = [t for t in sorted(samples) if f"`{t}`" not in text]
    assert not missing, f"docs/protocol/mqtt.md lacks topics {missing}"
    assert topics.replies(Identity.admin("alice")) == f"{topics.ROOT}/replies/admin/alice"


def test_the_publishers_table_matches_the_code() -> None:
    """The "Who may publish" table lists exactly the topic filters PUBLISHERS gives each role."""
    text = DOC.read_text()
    for role, pattern in topics.PUBLISHERS:
        shown = pattern.replace("{cluster}", "C").replace("{name}", {"agent": "H"}.get(role, "U"))
        row = next(line for line in text.splitlines() if line.startswith(f"| {role} `"))
        assert f"`{shown}`" in row, f"{role} may publish {shown}, the table says: {row}"
