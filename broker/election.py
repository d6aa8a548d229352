"""Owner election of one cluster, sans-I/O: events in, actions out, no sockets, no clock.

The rule (decision 031):

- One owner per cluster. The owner renews its retained owner record every ``renew`` seconds
  (a growing ``seq``). The owner is *live* while its record exists, its member is not offline
  (the last will marks a vanished member offline), and its record changed within ``lease``.
- With no live owner, members stand in rank order: the online members (sorted node names, the
  failed owner left out) wait ``rank * stagger`` seconds from the moment the vacancy was seen,
  then claim ``max(stored, announced) + 1`` at the store (:meth:`broker.store.Store.
  claim_epoch`, conditional). The store decides: the one whose claim it grants owns; a refused
  one follows whoever did.
- Damping: a live owner is never preempted (a returning member with a lower name waits); a
  member that stepped down stands again only after ``hold_down``; a member stands only after
  being connected to MQTT for ``settle`` seconds (the retained records have arrived).
- An owner steps down by itself when it could not renew for ``lease - renew`` seconds (MQTT
  lost, or the process was frozen), when a store read fails or shows a higher epoch, or when an
  owner record with a higher epoch appears.

This machine only decides; :mod:`broker.cluster` performs the actions. Nothing here is the
safety argument: two members may both *believe* they own for a moment (a frozen owner wakes up);
the store's epoch fence refuses the stale one's writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from common.config import ElectionSection

ElectionTimings = ElectionSection
"""The timings (``[election]`` in broker.toml, :class:`common.config.ElectionSection`)."""


class Role(Enum):
    """Where this member stands."""

    STANDBY = "standby"
    CLAIMING = "claiming"
    OWNER = "owner"


# -- events (every one carries the monotonic time it happened)


@dataclass(frozen=True)
class MQTTUp:
    """The MQTT link connected."""

    now: float


@dataclass(frozen=True)
class MQTTDown:
    """The MQTT link was lost."""

    now: float


@dataclass(frozen=True)
class MemberSeen:
    """A member's retained record arrived (``online=False``: it left, or its last will)."""

    now: float
    node: str
    online: bool
    url: str = ""
    epoch: int = 0


@dataclass(frozen=True)
class OwnerSeen:
    """The cluster's retained owner record arrived (a claim or a renewal)."""

    now: float
    node: str
    epoch: int
    url: str
    seq: int


@dataclass(frozen=True)
class OwnerPublished:
    """The MQTT broker acknowledged this member's owner record ``seq``, sent at ``sent``."""

    now: float
    epoch: int
    seq: int
    sent: float


@dataclass(frozen=True)
class OwnerCleared:
    """The retained owner record was cleared (a clean hand-over)."""

    now: float


@dataclass(frozen=True)
class Tick:
    """Time passed."""

    now: float


@dataclass(frozen=True)
class ClaimAnswered:
    """The store's answer to :class:`Claim`: granted, or refused with the epoch it holds."""

    now: float
    epoch: int
    granted: bool
    stored: int


@dataclass(frozen=True)
class StoreRead:
    """The store's fence as read for the owner's periodic check."""

    now: float
    epoch: int
    owner: str | None


@dataclass(frozen=True)
class StoreReadFailed:
    """The store could not be read (its file system is gone or hung)."""

    now: float
    error: str


Event = (
    MQTTUp
    | MQTTDown
    | MemberSeen
    | OwnerSeen
    | OwnerPublished
    | OwnerCleared
    | Tick
    | ClaimAnswered
    | StoreRead
    | StoreReadFailed
)

# -- actions


@dataclass(frozen=True)
class Claim:
    """Claim ``epoch`` at the store (conditional) and answer with :class:`ClaimAnswered`."""

    epoch: int


@dataclass(frozen=True)
class PublishOwner:
    """Publish the retained owner record (this member, ``epoch``, renewal ``seq``)."""

    epoch: int
    seq: int


@dataclass(frozen=True)
class ClearOwner:
    """Clear the retained owner record (it is ours, and we no longer own)."""

    epoch: int


@dataclass(frozen=True)
class ReadStore:
    """Read the store's fence and answer with :class:`StoreRead` or :class:`StoreReadFailed`."""


@dataclass(frozen=True)
class StartServing:
    """Become the owner at ``epoch``: replay the journals, apply, accept agents."""

    epoch: int


@dataclass(frozen=True)
class StopServing:
    """Stop ingest and apply at once (``reason`` for the log)."""

    epoch: int
    reason: str


Action = Claim | PublishOwner | ClearOwner | ReadStore | StartServing | StopServing


@dataclass
class _Owner:
    node: str
    epoch: int
    url: str
    seq: int
    fresh_at: float


@dataclass
class Election:
    """The election state machine of one member (see the module docstring for the rule)."""

    node: str
    timings: ElectionTimings = field(default_factory=ElectionTimings)
    role: Role = Role.STANDBY
    epoch: int = 0
    """The epoch this member owns under (0: not an owner)."""
    owner: _Owner | None = None
    members: dict[str, bool] = field(default_factory=dict)
    """node -> online, from the retained membership records."""
    announced: int = 0
    """The highest epoch seen on MQTT (owner and member records)."""
    stored: int = 0
    """The highest epoch the store reported."""
    _connected_since: float | None = None
    _vacant_since: float | None = None
    _stepped_down_at: float | None = None
    _retry_after: float = 0.0
    _renewed_at: float = 0.0
    """When the last owner record the MQTT broker acknowledged was sent (or the claim granted):
    the lease runs from there, not from the last attempt, which a link that failed without
    noticing would take for renewals."""
    _asked_at: float = 0.0
    """When the last owner record was sent (renewals go every ``renew`` from there)."""
    _seq: int = 0

    def handle(self, event: Event) -> list[Action]:
        """Take one event; return what to do, in order."""
        actions: list[Action] = []
        now = event.now
        match event:
            case MQTTUp():
                self._connected_since = now
            case MQTTDown():
                self._connected_since = None
            case MemberSeen(node=node, online=online, epoch=epoch):
                self.members[node] = online
                self.announced = max(self.announced, epoch)
            case OwnerSeen():
                actions += self._owner_seen(event)
            case OwnerPublished(epoch=epoch, sent=sent):
                if self.role is Role.OWNER and epoch == self.epoch:
                    self._renewed_at = max(self._renewed_at, sent)
            case OwnerCleared():
                if self.role is Role.OWNER:
                    actions.append(self._renew(now))  # ours was cleared by mistake: restore
                else:
                    self.owner = None
            case ClaimAnswered():
                actions += self._claim_answered(event)
            case StoreRead(epoch=epoch, owner=owner):
                self.stored = max(self.stored, epoch)
                if self.role is Role.OWNER and (
                    epoch > self.epoch or (epoch == self.epoch and owner != self.node)
                ):
                    why = f"the store is at epoch {epoch} ({owner})"
                    actions += self._step_down(now, why, clear=False)
            case StoreReadFailed(error=error):
                if self.role is Role.OWNER:
                    why = f"the store cannot be read: {error}"
                    actions += self._step_down(now, why, clear=True)
            case Tick():
                pass
        actions += self._advance(now)
        return actions

    # -- queries
    def owner_live(self, now: float) -> bool:
        """Whether the cluster has a live owner as this member sees it."""
        if self.role is Role.OWNER:
            return True
        o = self.owner
        if o is None or self.members.get(o.node) is False:
            return False
        return now - o.fresh_at < self.timings.lease

    def rank(self) -> int:
        """This member's place in the line of candidates (0 stands first)."""
        failed = self.owner.node if self.owner is not None else None
        line = {n for n, online in self.members.items() if online and n != failed}
        line.add(self.node)
        return sorted(line).index(self.node)

    def resign(self, now: float) -> list[Action]:
        """A clean leave (shutdown): stop serving and clear our record so others stand at once."""
        if self.role is not Role.OWNER:
            return []
        return self._step_down(now, "leaving the cluster", clear=True)

    # -- transitions
    def _owner_seen(self, ev: OwnerSeen) -> list[Action]:
        self.announced = max(self.announced, ev.epoch)
        if self.role is Role.OWNER:
            if ev.epoch > self.epoch:
                why = f"{ev.node} owns at epoch {ev.epoch}"
                return self._step_down(ev.now, why, clear=False)
            return []  # a stale record (ours or a deposed owner's): our renewals overwrite it
        o = self.owner
        if o is not None and ev.epoch < o.epoch and self.owner_live(ev.now):
            return []  # a deposed owner's late renewal: the newer owner stands
        if o is None or (o.node, o.epoch, o.seq) != (ev.node, ev.epoch, ev.seq):
            self.owner = _Owner(ev.node, ev.epoch, ev.url, ev.seq, ev.now)
        return []

    def _claim_answered(self, ev: ClaimAnswered) -> list[Action]:
        self.stored = max(self.stored, ev.stored)
        if self.role is not Role.CLAIMING:
            return []
        if not ev.granted:
            # Someone else won; its record should arrive within a lease. Stand again only then.
            self.role = Role.STANDBY
            self._retry_after = ev.now + self.timings.lease
            return []
        self.role = Role.OWNER
        self.epoch = ev.epoch
        self._seq = 0
        self.owner = None
        self._vacant_since = None
        self._renewed_at = ev.now  # the store's grant: the first record has a lease to land
        return [StartServing(ev.epoch), self._renew(ev.now)]

    def _renew(self, now: float) -> PublishOwner:
        self._seq += 1
        self._asked_at = now
        return PublishOwner(self.epoch, self._seq)

    def _step_down(self, now: float, reason: str, *, clear: bool) -> list[Action]:
        epoch = self.epoch
        actions: list[Action] = [StopServing(epoch, reason)]
        self.role = Role.STANDBY
        self.epoch = 0
        self._stepped_down_at = now
        self._vacant_since = None
        if clear and self._connected_since is not None:
            # Hand over at once instead of making the others wait out our lease. Only when no
            # newer owner can have published yet: a retained clear is blind and would erase it.
            actions.append(ClearOwner(epoch))
        return actions

    def _advance(self, now: float) -> list[Action]:
        t = self.timings
        if self.role is Role.OWNER:
            if now - self._renewed_at >= t.lease - t.renew:
                # Not renewed for too long (MQTT down, unacknowledged, or this process was
                # frozen): the others may already have stood. Step down before anything else.
                why = f"owner record not renewed for {t.lease - t.renew} s"
                return self._step_down(now, why, clear=False)
            if now - self._asked_at >= t.renew and self._connected_since is not None:
                return [self._renew(now), ReadStore()]
            return []
        if self.role is Role.CLAIMING:
            return []
        if self.owner_live(now):
            self._vacant_since = None
            return []
        if self._vacant_since is None:
            self._vacant_since = now
        if (
            self._connected_since is None
            or now - self._connected_since < t.settle
            or (self._stepped_down_at is not None and now - self._stepped_down_at < t.hold_down)
            or now < self._retry_after
            # The line forms once the vacancy is seen and this member has settled.
            or now - max(self._vacant_since, self._connected_since + t.settle)
            < self.rank() * t.stagger
        ):
            return []
        self.role = Role.CLAIMING
        return [Claim(max(self.stored, self.announced) + 1)]
