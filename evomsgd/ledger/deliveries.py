"""The delivery engine's queries: what is due on a lane, claims, outcomes, recovery and expiry.

`Store` (store.py) adds accepting, reading and the operators' writes on top; each method that the
group committer batches has an `..._in(cur, ...)` form that runs inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from evomsgd import clock
from evomsgd.ledger import receipts
from evomsgd.ledger.database import Database
from evomsgd.ledger.records import LookupFacts, Message, Transition
from evomsgd.models import FINAL, WAITING, Status


def status_in(statuses: Iterable[Status]) -> str:
    """An SQL list of statuses for `status IN ...`: "('PENDING', 'SCHEDULED', 'RETRY')"."""
    return "(" + ", ".join(f"'{status.value}'" for status in statuses) + ")"


# Finished without being delivered: what `requeue` may send again, what `failed_days` keeps.
FAILED = tuple(status for status in FINAL if status is not Status.SUCCESS)
# Word for word the predicate of the partial indexes messages_waiting and messages_expiry (the
# planner uses them only then); tests/test_ledger.py holds the two together.
IN_WAITING = f"status IN {status_in(WAITING)}"
# error_kind of a message failed from the not-on-WhatsApp memory, without a send.
REMEMBERED = "not_on_whatsapp_remembered"
# An earlier message to the same recipient on the same instance and of the same priority that is
# still to be sent - waiting (a SCHEDULED one only once due) or being sent - holds `m` back.
# The only parameter is now. Served by the messages_recipient partial index (migration 3).
_EARLIER_UNSENT = (
    "SELECT 1 FROM messages e WHERE e.instance = m.instance AND e.phone = m.phone"
    " AND e.priority = m.priority AND e.seq < m.seq"
    f" AND e.status IN {status_in((*WAITING, Status.STARTED))}"
    " AND (e.status != 'SCHEDULED' OR e.next_attempt_at <= ?)"
)

# `m` goes to a recipient its instance never sent to, for the first time (a retry was counted
# at its first attempt): what new_contacts_per_day counts.
NEW_CONTACT = (
    "(m.attempts = 0 AND NOT EXISTS (SELECT 1 FROM recipients r"
    " WHERE r.instance = m.instance AND r.phone = m.phone))"
)

COLUMNS = ", ".join(Message.__slots__)


def message_from_row(row: Sequence[Any]) -> Message:
    """A `messages` row (selected as COLUMNS) as a Message."""
    msg = Message(*row)
    msg.status = Status(msg.status)
    msg.sandbox = bool(msg.sandbox)
    return msg


class Deliveries(Database):
    """The queries the dispatcher and the delivery attempts run."""

    def waiting_by_instance(self) -> dict[str, tuple[int, str | None]]:
        """instance -> (waiting count, earliest next_attempt_at)."""
        rows = self.query(
            f"SELECT instance, count(*), min(next_attempt_at) FROM messages WHERE {IN_WAITING} "
            "GROUP BY instance"
        )
        return {row[0]: (row[1], row[2]) for row in rows}

    def ready(self, instance: str, now: float, limit: int) -> list[str]:
        """Ids due on one instance, best first: high priority, then the longest waiting.

        A message whose recipient has an earlier one of its priority still unsent (waiting for
        a retry, or being sent) is not ready: one recipient gets its messages in the order they
        were accepted, one at a time.
        """
        now_db = clock.to_db(now)
        sql = (
            f"SELECT id FROM messages m WHERE instance = ? AND {IN_WAITING} AND next_attempt_at <= ?"
            f" AND NOT EXISTS ({_EARLIER_UNSENT})"
        )
        sql += " ORDER BY priority DESC, next_attempt_at, seq LIMIT ?"
        rows = self.query(sql, [instance, now_db, now_db, limit])
        return [row[0] for row in rows]

    def ready_contacts(
        self, instance: str, now: float, limit: int, *, strangers: bool
    ) -> list[tuple[str, bool]]:
        """`ready`, each id with whether it goes to a new contact (NEW_CONTACT); without
        `strangers`, those are left out (the instance's new-contact budget is used up)."""
        rows = self.ready_recipients(instance, now, limit, strangers=strangers)
        return [(message_id, new) for message_id, new, _, _ in rows]

    def ready_recipients(
        self, instance: str, now: float, limit: int, *, strangers: bool
    ) -> list[tuple[str, bool, str, int]]:
        """`ready_contacts` with each message's phone and priority: (id, new contact, phone,
        priority), for a lane whose quiet hours depend on the recipient."""
        now_db = clock.to_db(now)
        sql = (
            f"SELECT id, {NEW_CONTACT}, phone, priority FROM messages m WHERE instance = ?"
            f" AND {IN_WAITING} AND next_attempt_at <= ? AND NOT EXISTS ({_EARLIER_UNSENT})"
        )
        if not strangers:
            sql += f" AND NOT {NEW_CONTACT}"
        sql += " ORDER BY priority DESC, next_attempt_at, seq LIMIT ?"
        rows = self.query(sql, [instance, now_db, now_db, limit])
        return [(row[0], bool(row[1]), row[2], row[3]) for row in rows]

    def hold_in(
        self, cur: sqlite3.Cursor, holds: Sequence[tuple[str, str, float, str]], now: float
    ) -> int:
        """Hold waiting messages until a time, each (id, instance, until, why) - quiet hours
        where their recipient lives - with a `held` history row; returns how many still waited.

        The status stays (PENDING, RETRY...): a held message keeps holding its recipient's later
        messages back, so their order is kept."""
        now_db = clock.to_db(now)
        held = 0
        for message_id, instance, until, why in holds:
            until_db = clock.to_db(until)
            cur.execute(
                f"UPDATE messages SET next_attempt_at = ? WHERE id = ? AND {IN_WAITING}"
                " AND next_attempt_at < ?",
                (until_db, message_id, until_db),
            )
            if cur.rowcount == 1:
                held += 1
                self._event(cur, message_id, instance, now_db, "held", why)
        return held

    def held_quiet(self, instance: str, now: float) -> list[tuple[str, str, int, float]]:
        """Messages of an instance that quiet hours hold now, as (id, phone, priority, until):
        waiting, due later, their latest history row a `held` one (reloads the lane's view)."""
        rows = self.query(
            f"SELECT id, phone, priority, next_attempt_at FROM messages m WHERE instance = ?"
            f" AND {IN_WAITING} AND next_attempt_at > ? AND (SELECT e.event FROM events e"
            " WHERE e.message_id = m.id ORDER BY e.id DESC LIMIT 1) = 'held'",
            (instance, clock.to_db(now)),
        )
        return [(row[0], row[1], row[2], clock.from_db(row[3])) for row in rows]

    def next_due(self, instance: str, now: float, *, strangers: bool = True) -> float | None:
        """When the next waiting message of an instance that is not held back becomes due
        (without `strangers`: of those to known contacts)."""
        # Held-back messages are left out: they become ready when the message ahead of them is
        # attempted, which wakes the dispatcher anyway; counting them would wake it in a loop.
        sql = (
            f"SELECT min(next_attempt_at) FROM messages m WHERE instance = ? AND {IN_WAITING}"
            f" AND NOT EXISTS ({_EARLIER_UNSENT})"
        )
        if not strangers:
            sql += f" AND NOT {NEW_CONTACT}"
        value = self.query(sql, [instance, clock.to_db(now)])[0][0]
        return None if value is None else clock.from_db(value)

    def first_sends(self) -> dict[str, float]:
        """Instance -> its first successful send (outside sandbox mode), for those that sent."""
        rows = self.query(
            "SELECT instance, first_sent_at FROM lanes WHERE first_sent_at IS NOT NULL"
        )
        return {row[0]: clock.from_db(row[1]) for row in rows}

    def new_contacts_since(self, instance: str, since: float) -> int:
        """Recipients an instance had not sent to before `since` whose messages it attempted
        since then (loads the new-contact budget's count at a start)."""
        since_db = clock.to_db(since)
        return int(
            self.query(
                "SELECT count(DISTINCT phone) FROM messages m WHERE instance = ? AND started_at >= ?"
                " AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.instance = m.instance"
                " AND r.phone = m.phone AND r.first_sent_at < ?)",
                (instance, since_db, since_db),
            )[0][0]
        )

    def is_new_contact(self, instance: str, phone: str) -> bool:
        """The instance has never sent to `phone`."""
        rows = self.query(
            "SELECT 1 FROM recipients WHERE instance = ? AND phone = ?", (instance, phone)
        )
        return not rows

    def mark_sent_once(self, instance: str, now: float) -> None:
        """Record an instance's first send (kept; later calls change nothing)."""
        with self.transaction() as cur:
            self.mark_sent_in(cur, instance, now)

    def mark_sent_in(self, cur: sqlite3.Cursor, instance: str, now: float) -> None:
        """`mark_sent_once` inside the caller's transaction."""
        cur.execute(
            "INSERT INTO lanes (instance, first_sent_at) VALUES (?, ?) ON CONFLICT (instance)"
            " DO UPDATE SET first_sent_at = coalesce(first_sent_at, excluded.first_sent_at)",
            (instance, clock.to_db(now)),
        )

    def fail_waiting(self, instance: str, now: float, reason: str, kind: str) -> list[str]:
        """End the waiting messages of an instance FAILURE without a send (1,000 at a time);
        returns their ids. Messages being sent are not waiting and are left to finish."""
        now_db = clock.to_db(now)
        sql = f"SELECT id FROM messages WHERE instance = ? AND {IN_WAITING} LIMIT 1000"
        with self.transaction() as cur:
            ids = [row[0] for row in cur.execute(sql, [instance])]
            for message_id in ids:
                cur.execute(
                    "UPDATE messages SET status = 'FAILURE', finished_at = ?, next_attempt_at = NULL,"
                    " last_error = ?, error_kind = ? WHERE id = ?",
                    (now_db, reason, kind, message_id),
                )
                self._event(cur, message_id, instance, now_db, "failed", reason)
        return ids

    def attempt_times(self, instance: str, since: float) -> list[float]:
        """Start times of calls to Evolution on one instance since a time (for send caps)."""
        rows = self.query(
            "SELECT at FROM events WHERE event = 'attempt' AND instance = ? AND at >= ? ORDER BY at",
            (instance, clock.to_db(since)),
        )
        return [clock.from_db(row[0]) for row in rows]

    # -- delivering -----------------------------------------------------------------------

    def claim(self, message_id: str, now: float, lease: float) -> Message | None:
        """Compare-and-set a waiting message to STARTED under a lease; None if someone else has it."""
        with self.transaction() as cur:
            return self.claim_in(cur, message_id, now, lease)

    def claim_in(
        self, cur: sqlite3.Cursor, message_id: str, now: float, lease: float
    ) -> Message | None:
        """`claim` inside the caller's transaction. A message to a number remembered as not on
        WhatsApp for its instance is not claimed but ended FAILURE at once (the row returned
        says so), without a send."""
        now_db = clock.to_db(now)
        remembered = cur.execute(
            "SELECT c.since, c.until, c.reason FROM messages m JOIN contacts c"
            " ON c.instance = m.instance AND c.phone = m.phone"
            f" WHERE m.id = ? AND m.{IN_WAITING} AND c.until > ?",
            (message_id, now_db),
        ).fetchone()
        if remembered is not None:
            return self._fail_remembered(cur, message_id, now_db, *remembered)
        cur.execute(
            f"UPDATE messages SET status = 'STARTED', attempts = attempts + 1, started_at = ?,"
            f" lease_until = ?, next_attempt_at = NULL WHERE id = ? AND {IN_WAITING}"
            " AND expires_at > ?",
            (now_db, clock.to_db(now + lease), message_id, now_db),
        )
        if cur.rowcount != 1:
            return None
        row = cur.execute(f"SELECT {COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
        return message_from_row(row)

    def _fail_remembered(
        self, cur: sqlite3.Cursor, message_id: str, now_db: str, since: str, until: str, why: str
    ) -> Message:
        detail = (
            f"{why} - remembered since {clock.db_to_rfc3339(since)}, so WhatsApp was not asked "
            f"again (until {clock.db_to_rfc3339(until)}, EVOMSGD_NOT_ON_WHATSAPP_TTL; "
            "`evomsgd contacts forget PHONE` clears it)"
        )
        cur.execute(
            "UPDATE messages SET status = 'FAILURE', finished_at = ?, next_attempt_at = NULL,"
            f" last_error = ?, error_kind = '{REMEMBERED}' WHERE id = ?",
            (now_db, detail, message_id),
        )
        row = cur.execute(f"SELECT {COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
        msg = message_from_row(row)
        self._event(cur, message_id, msg.instance, now_db, "failed", detail)
        return msg

    def remember_not_on_whatsapp_in(
        self, cur: sqlite3.Cursor, instance: str, phone: str, now: float, until: float, reason: str
    ) -> None:
        """Remember that `phone` is not on WhatsApp for `instance` until `until`."""
        cur.execute(
            "INSERT INTO contacts (instance, phone, since, until, reason) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (instance, phone) DO UPDATE SET since = excluded.since,"
            " until = excluded.until, reason = excluded.reason",
            (instance, phone, clock.to_db(now), clock.to_db(until), reason),
        )

    def finish_attempt(self, msg: Message, started: float, now: float, tr: Transition) -> bool:
        """Record an attempt's outcome and the message's new status; False if the lease was lost."""
        with self.transaction() as cur:
            return self.finish_in(cur, msg, started, now, tr)

    def finish_in(
        self, cur: sqlite3.Cursor, msg: Message, started: float, now: float, tr: Transition
    ) -> bool:
        """`finish_attempt` inside the caller's transaction."""
        now_db = clock.to_db(now)
        final = tr.status in FINAL
        cur.execute(
            "UPDATE messages SET status = ?, next_attempt_at = ?, lease_until = NULL,"
            " finished_at = ?, retries_used = retries_used + ?, ambiguous = ambiguous + ?,"
            " last_error = coalesce(?, last_error), error_kind = coalesce(?, error_kind),"
            " evolution_key = coalesce(?, evolution_key), remote_jid = coalesce(?, remote_jid)"
            " WHERE id = ? AND status = 'STARTED' AND started_at = ?",
            (
                tr.status.value,
                None if final else clock.to_db(tr.next_attempt_at or now),
                now_db if final else None,
                int(tr.spend_retry),
                int(tr.ambiguous),
                # A SUCCESS keeps no error, except what Evolution said of an unconfirmed one.
                tr.detail if tr.status is not Status.SUCCESS or tr.error_kind else None,
                tr.error_kind,
                tr.evolution_key,
                tr.remote_jid,
                msg.id,
                msg.started_at,
            ),
        )
        if cur.rowcount != 1:
            return False
        if tr.status is Status.SUCCESS and not msg.sandbox:
            cur.execute(
                "INSERT INTO recipients (instance, phone, first_sent_at) VALUES (?, ?, ?)"
                " ON CONFLICT (instance, phone) DO NOTHING",
                (msg.instance, msg.phone, now_db),
            )
        if tr.lookup is not None:
            self._event(cur, msg.id, msg.instance, clock.to_db(started), "lookup", tr.lookup)
        cur.execute(
            "INSERT INTO events (message_id, at, instance, event, attempt, outcome, http_status,"
            " detail) VALUES (?, ?, ?, 'attempt', ?, ?, ?, ?)",
            (
                msg.id,
                clock.to_db(started),
                msg.instance,
                msg.attempts,
                tr.outcome,
                tr.http_status,
                tr.detail,
            ),
        )
        for event, detail in tr.extra_events:
            self._event(cur, msg.id, msg.instance, now_db, event, detail)
        if tr.not_on_whatsapp_until is not None:
            self.remember_not_on_whatsapp_in(
                cur, msg.instance, msg.phone, now, tr.not_on_whatsapp_until, tr.detail or ""
            )
        if tr.status is Status.SUCCESS and not msg.sandbox:
            # In the same transaction: a receipt that beat this outcome to the ledger is applied.
            receipts.accepted_in(
                cur, msg.id, msg.instance, tr.evolution_key, now, integration=tr.integration
            )
        return True

    @staticmethod
    def _event(
        cur: sqlite3.Cursor, message_id: str, instance: str, at: str, event: str, detail: str | None
    ) -> None:
        cur.execute(
            "INSERT INTO events (message_id, at, instance, event, detail) VALUES (?, ?, ?, ?, ?)",
            (message_id, at, instance, event, detail),
        )

    def lookup_facts(self, msg: Message) -> LookupFacts:
        """For looking up a message whose earlier send may have gone out (`ambiguous` > 0).

        `since`: the start of its first ambiguous attempt (its `attempt` event), or, for an
        attempt a crash cut (no `attempt` event, only `recovered`), the message's event before
        the recovery - the crashed attempt began after it - or its acceptance."""
        rows = self.query(
            "SELECT min(t) FROM (SELECT at AS t FROM events WHERE message_id = ?"
            " AND event = 'attempt' AND outcome = 'ambiguous'"
            " UNION ALL SELECT coalesce((SELECT max(p.at) FROM events p"
            " WHERE p.message_id = r.message_id AND p.id < r.id), ?)"
            " FROM events r WHERE r.message_id = ? AND r.event = 'recovered')",
            (msg.id, msg.created_at, msg.id),
        )
        since = clock.from_db(rows[0][0] or msg.created_at)
        # The recipient's latest messages are enough: a look-up reads one page of the newest.
        keys = self.query(
            "SELECT evolution_key FROM messages WHERE instance = ? AND phone = ? AND id != ?"
            " AND evolution_key IS NOT NULL ORDER BY seq DESC LIMIT 500",
            (msg.instance, msg.phone, msg.id),
        )
        lane = self.query("SELECT integration FROM lanes WHERE instance = ?", (msg.instance,))
        return LookupFacts(since, frozenset(row[0] for row in keys), lane[0][0] if lane else None)

    def recover(self, now: float, *, only_expired_leases: bool) -> list[tuple[str, str]]:
        """Put STARTED messages back to RETRY: all of them at start-up, or those whose lease ran out.

        Such a message may have reached Evolution before the crash, so it is counted as ambiguous
        and recovered; the next send may duplicate it, and the ledger says so.
        """
        now_db = clock.to_db(now)
        sql = "SELECT id, instance FROM messages WHERE status = 'STARTED'"
        params: tuple[Any, ...] = ()
        if only_expired_leases:
            sql += " AND lease_until < ?"
            params = (now_db,)
        with self.transaction() as cur:
            rows = cur.execute(sql, params).fetchall()
            detail = (
                "lease expired while sending; it may have been delivered"
                if only_expired_leases
                else "daemon stopped while sending; it may have been delivered"
            )
            for message_id, instance in rows:
                cur.execute(
                    "UPDATE messages SET status = 'RETRY', lease_until = NULL, next_attempt_at = ?,"
                    " recovered = recovered + 1, ambiguous = ambiguous + 1, last_error = ?,"
                    " error_kind = 'ambiguous' WHERE id = ?",
                    (now_db, detail, message_id),
                )
                self._event(cur, message_id, instance, now_db, "recovered", detail)
        return [(row[0], row[1]) for row in rows]

    def flag_restored(self, now: float) -> int:
        """After a restore from a replica: flag every waiting message already due as possibly sent.

        A replica may miss the primary's last seconds, sends included; so each such message is
        counted ambiguous and recovered, like a send a crash cut: its next attempt looks it up
        in Evolution first, and a re-send is flagged as a possible duplicate. STARTED rows are
        left to `recover`, which every start runs.
        """
        now_db = clock.to_db(now)
        detail = (
            "restored from a replica that may miss the last seconds before the loss; "
            "it may have been sent"
        )
        with self.transaction() as cur:
            rows = cur.execute(
                f"SELECT id, instance FROM messages WHERE {IN_WAITING}"
                " AND coalesce(next_attempt_at, send_at, created_at) <= ?",
                (now_db,),
            ).fetchall()
            for message_id, instance in rows:
                cur.execute(
                    "UPDATE messages SET recovered = recovered + 1, ambiguous = ambiguous + 1"
                    " WHERE id = ?",
                    (message_id,),
                )
                self._event(cur, message_id, instance, now_db, "recovered", detail)
        return len(rows)

    def expire_due(self, now: float) -> list[tuple[str, str]]:
        """Mark waiting messages past their expiry EXPIRED; returns (id, instance) pairs."""
        now_db = clock.to_db(now)
        with self.transaction() as cur:
            rows = cur.execute(
                f"SELECT id, instance FROM messages WHERE {IN_WAITING} AND expires_at <= ? LIMIT 1000",
                (now_db,),
            ).fetchall()
            for message_id, instance in rows:
                cur.execute(
                    "UPDATE messages SET status = 'EXPIRED', finished_at = ?, next_attempt_at = NULL,"
                    " error_kind = 'expired', last_error = coalesce(last_error || ' - ', '') ||"
                    " 'not sent before it expired at ' || expires_at WHERE id = ?",
                    (now_db, message_id),
                )
                self._event(
                    cur, message_id, instance, now_db, "expired", "not sent before its expiry"
                )
        return [(row[0], row[1]) for row in rows]
