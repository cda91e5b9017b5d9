"""The ledger's schema as numbered migrations; each runs once and is recorded."""

from __future__ import annotations

# Statuses in which a message still waits to be sent; partial indexes below use this list.
# Written out, not derived from models.WAITING: a migration must create what it created when it
# was first applied. tests/test_ledger.py fails when store.IN_WAITING drifts from it.
_WAITING_SQL = "('PENDING', 'SCHEDULED', 'RETRY')"

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "messages, events, lanes, idempotency",
        f"""
CREATE TABLE messages (
    seq             INTEGER PRIMARY KEY,          -- arrival order
    id              TEXT NOT NULL UNIQUE,         -- the task_id given to the client
    status          TEXT NOT NULL CHECK (status IN ('PENDING', 'SCHEDULED', 'STARTED', 'RETRY',
                                                    'SUCCESS', 'FAILURE', 'CANCELED', 'EXPIRED')),
    instance        TEXT NOT NULL,                -- Evolution instance (its pacing lane)
    phone           TEXT NOT NULL,                -- normalised: E.164 digits without '+', or a JID
    phone_input     TEXT NOT NULL,                -- exactly what the client sent
    text            TEXT,                         -- NULL once erased by retention
    priority        INTEGER NOT NULL DEFAULT 0,   -- 1 = high (one-time codes)
    created_at      TEXT NOT NULL,                -- UTC 'YYYY-MM-DD HH:MM:SS.fff', like sqlite's datetime()
    send_at         TEXT,                         -- requested by the client (SCHEDULED until then)
    next_attempt_at TEXT,                         -- earliest next send; NULL while STARTED or final
    expires_at      TEXT NOT NULL,                -- unsent by then -> EXPIRED
    attempts        INTEGER NOT NULL DEFAULT 0,   -- calls made to Evolution
    retries_used    INTEGER NOT NULL DEFAULT 0,   -- failed attempts that spent the retry budget
    ambiguous       INTEGER NOT NULL DEFAULT 0,   -- outcomes that may have been delivered anyway
    recovered       INTEGER NOT NULL DEFAULT 0,   -- times re-queued after a crash or a lost lease
    lease_until     TEXT,                         -- a worker owns the send until then (STARTED)
    started_at      TEXT,                         -- start of the latest attempt
    finished_at     TEXT,                         -- when it reached a final status
    last_error      TEXT,                         -- latest failure, in words
    error_kind      TEXT,                         -- latest failure's class: transient, permanent, ...
    evolution_key   TEXT,                         -- Evolution's key.id (WhatsApp message id)
    remote_jid      TEXT,                         -- JID Evolution actually used
    sandbox         INTEGER NOT NULL DEFAULT 0,   -- 1 = delivered into the ledger only
    idempotency_key TEXT,
    token_name      TEXT                          -- API token that queued it (NULL without tokens)
);
CREATE INDEX messages_waiting ON messages (instance, priority DESC, next_attempt_at, seq)
    WHERE status IN {_WAITING_SQL};
CREATE INDEX messages_expiry ON messages (expires_at) WHERE status IN {_WAITING_SQL};
CREATE INDEX messages_lease ON messages (lease_until) WHERE status = 'STARTED';
CREATE INDEX messages_status ON messages (status, seq);
CREATE INDEX messages_phone ON messages (phone, seq);
CREATE INDEX messages_finished ON messages (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    message_id  TEXT NOT NULL,                    -- messages.id
    at          TEXT NOT NULL,
    instance    TEXT NOT NULL,
    event       TEXT NOT NULL,                    -- attempt, recovered, canceled, requeued, expired
    attempt     INTEGER,                          -- attempt number, for event = 'attempt'
    outcome     TEXT,                             -- sent, transient, permanent, ambiguous, ...
    http_status INTEGER,
    detail      TEXT
);
CREATE INDEX events_message ON events (message_id, id);
CREATE INDEX events_attempts ON events (instance, at) WHERE event = 'attempt';

CREATE TABLE lanes (
    instance      TEXT PRIMARY KEY,
    paused        INTEGER NOT NULL DEFAULT 0,     -- 1 = paused by an operator (evomsgd pause)
    paused_at     TEXT,
    paused_reason TEXT
);

CREATE TABLE idempotency (
    key          TEXT PRIMARY KEY,                -- token name + ':' + Idempotency-Key header
    request_hash TEXT NOT NULL,                   -- sha256 of the normalised request
    message_id   TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL
);
CREATE INDEX idempotency_expiry ON idempotency (expires_at);
""",
    ),
    (
        2,
        "tokens",
        """
-- API tokens (evomsgd token create/list/revoke). Only a SHA-256 of each token is kept: a token
-- is 32 random bytes, so nobody can guess one from its hash and a slow password hash (bcrypt,
-- argon2) would only slow every request down without adding safety.
CREATE TABLE tokens (
    name        TEXT PRIMARY KEY,                 -- chosen by the operator; messages.token_name
    sha256      TEXT NOT NULL UNIQUE,             -- hex SHA-256 of the token; never the token
    instances   TEXT,                             -- comma-separated instances it may use; NULL = all
    created_at  TEXT NOT NULL
);
""",
    ),
    (
        3,
        "per-recipient order, first sends",
        """
-- Messages to one recipient on one instance go out in the order they were accepted: a message
-- is held back while an earlier one to the same recipient (same priority) is still unsent.
CREATE INDEX messages_recipient ON messages (instance, phone, priority, seq)
    WHERE status IN ('PENDING', 'SCHEDULED', 'RETRY', 'STARTED');
-- When the instance first sent (outside sandbox mode): an instance that has sent before and then
-- is missing in Evolution was deleted, perhaps to be re-created, and gets a grace period.
ALTER TABLE lanes ADD COLUMN first_sent_at TEXT;
INSERT INTO lanes (instance, first_sent_at)
    SELECT instance, min(finished_at) FROM messages
    WHERE status = 'SUCCESS' AND sandbox = 0 AND evolution_key IS NOT NULL GROUP BY instance
    ON CONFLICT (instance) DO UPDATE SET first_sent_at = excluded.first_sent_at;
""",
    ),
    (
        4,
        "delivery receipts",
        """
-- What WhatsApp did with a sent message, from Evolution's webhooks; `status` keeps its meaning.
-- delivery: NULL until sent (and in sandbox mode), then accepted, unconfirmed, server_ack,
-- failed, delivered, read, played; it only moves forward (models.DELIVERY_RANK).
ALTER TABLE messages ADD COLUMN delivery TEXT;
ALTER TABLE messages ADD COLUMN server_ack_at TEXT;
ALTER TABLE messages ADD COLUMN delivered_at TEXT;
ALTER TABLE messages ADD COLUMN read_at TEXT;
ALTER TABLE messages ADD COLUMN played_at TEXT;
ALTER TABLE messages ADD COLUMN delivery_failed_at TEXT;
ALTER TABLE messages ADD COLUMN unconfirmed_at TEXT;
ALTER TABLE messages ADD COLUMN delivery_error TEXT;
-- A receipt names the message by Evolution's key.id on an instance.
CREATE INDEX messages_evolution_key ON messages (instance, evolution_key)
    WHERE evolution_key IS NOT NULL;
CREATE INDEX messages_delivery ON messages (delivery, seq) WHERE delivery IS NOT NULL;
-- Accepted and not acked yet: what the ack-timeout sweep looks at.
CREATE INDEX messages_unacked ON messages (finished_at) WHERE delivery = 'accepted';

-- Receipts that arrived before their send's 201 was recorded (the webhook races the answer):
-- applied, then deleted, when the outcome lands; dropped (and counted) when none comes.
CREATE TABLE receipts_pending (
    id            INTEGER PRIMARY KEY,
    instance      TEXT NOT NULL,
    evolution_key TEXT NOT NULL,
    delivery      TEXT NOT NULL,                  -- the delivery state it reports
    received_at   TEXT NOT NULL
);
CREATE INDEX receipts_pending_key ON receipts_pending (instance, evolution_key);

-- The secret Evolution sends back with every webhook (header x-evomsgd-secret, or a path
-- segment for v1 servers). Only its SHA-256 is kept, as for API tokens.
CREATE TABLE webhook_secrets (
    name        TEXT PRIMARY KEY,                 -- 'evolution'
    sha256      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

-- Raw webhook bodies waiting to be forwarded by the relay (issue 15); a body can carry an
-- instance token, so a row lives only until forwarded. Nothing writes it yet.
CREATE TABLE webhook_outbox (
    id          INTEGER PRIMARY KEY,
    instance    TEXT,
    event       TEXT,
    received_at TEXT NOT NULL,
    body        BLOB NOT NULL
);

-- Per instance: when evomsgd last heard from Evolution's webhook (evomsgd doctor shows it).
ALTER TABLE lanes ADD COLUMN last_webhook_at TEXT;
-- Per instance: its Evolution integration as its last 201 showed it: WHATSAPP-BAILEYS, or
-- EVOLUTION (emits no receipts: its messages stay accepted and are never flagged unconfirmed);
-- NULL until it has sent.
ALTER TABLE lanes ADD COLUMN integration TEXT;
""",
    ),
    (
        5,
        "not-on-WhatsApp memory",
        """
-- Numbers WhatsApp said it does not know (400 ... exists: false), per instance: until
-- `until`, a message to one fails at once with what WhatsApp said, without asking again.
-- `evomsgd contacts forget PHONE` deletes a row.
CREATE TABLE contacts (
    instance    TEXT NOT NULL,
    phone       TEXT NOT NULL,                    -- messages.phone: digits without '+', or a JID
    since       TEXT NOT NULL,                    -- when WhatsApp said so
    until       TEXT NOT NULL,                    -- remembered until (EVOMSGD_NOT_ON_WHATSAPP_TTL)
    reason      TEXT NOT NULL,                    -- what the failed attempt said
    PRIMARY KEY (instance, phone)
);
""",
    ),
    (
        6,
        "known recipients",
        """
-- Who each instance has sent to (outside sandbox mode): a recipient without a row is a new
-- contact, counted against new_contacts_per_day. Kept when retention purges the messages.
CREATE TABLE recipients (
    instance       TEXT NOT NULL,
    phone          TEXT NOT NULL,                 -- messages.phone
    first_sent_at  TEXT NOT NULL,
    PRIMARY KEY (instance, phone)
) WITHOUT ROWID;
INSERT INTO recipients (instance, phone, first_sent_at)
    SELECT instance, phone, min(finished_at) FROM messages
    WHERE status = 'SUCCESS' AND sandbox = 0 GROUP BY instance, phone;
""",
    ),
    (
        7,
        "callbacks: endpoints and the outbox",
        """
-- Where a message's status callbacks go (issue 15): 'default' (EVOMSGD_CALLBACK_URL, synced at
-- start) or 'token:NAME' (evomsgd token create NAME --callback-url). The secrets sign the
-- callbacks, so they are kept as given (whsec_...), in this 0600 file, never shown again.
CREATE TABLE callback_endpoints (
    name             TEXT PRIMARY KEY,
    url              TEXT,                        -- NULL: only messages with their own callback_url
    secret           TEXT NOT NULL,               -- whsec_...
    previous_secret  TEXT,                        -- still signs, alongside, during a rotation
    previous_until   TEXT,                        -- end of the rotation's overlap
    retrying         INTEGER NOT NULL DEFAULT 0,  -- 1 = message.retrying events too
    disabled_at      TEXT,                        -- the endpoint answered 410 Gone; an operator re-enables
    disabled_reason  TEXT,
    last_ok_at       TEXT,
    last_error_at    TEXT,
    last_error       TEXT,
    created_at       TEXT NOT NULL
);

-- The endpoint a message's callbacks go to, resolved when it was accepted, and its own URL when
-- the request gave one (callback_url, allowed by EVOMSGD_CALLBACK_ALLOWED). NULL: no callbacks.
ALTER TABLE messages ADD COLUMN callback_to TEXT;
ALTER TABLE messages ADD COLUMN callback_url TEXT;

-- The transactional outbox: a row is written by the triggers below in the same transaction as
-- the change that causes it, whichever code path made the change, so a crash loses none.
-- Sent at least once, in order per `key` (a message, an instance's events to one endpoint, an
-- instance's relayed webhooks).
CREATE TABLE callbacks (
    id              INTEGER PRIMARY KEY,
    webhook_id      TEXT NOT NULL,                -- the webhook-id header, the same on every retry;
                                                  -- 128 random bits: unique without an index
    kind            TEXT NOT NULL,                -- event, or relay (Evolution's body, forwarded)
    type            TEXT NOT NULL,                -- message.sent, ..., instance.paused; relay: its event
    key             TEXT NOT NULL,                -- order: a row waits for the earlier rows of its key
    message_id      TEXT,
    instance        TEXT,
    endpoint        TEXT,                         -- callback_endpoints.name (NULL for a relay)
    url             TEXT,                         -- NULL: the endpoint's URL
    occurred_at     TEXT NOT NULL,
    data            TEXT,                         -- instance events: the pause's reason
    body            BLOB,                         -- what is sent, fixed at the first attempt;
                                                  -- a relay's is erased once forwarded
    state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    failures        INTEGER NOT NULL DEFAULT 0,   -- in a row since the last success or retry: the backoff
    next_attempt_at TEXT,
    retry_from      TEXT,                         -- an operator's retry: EVOMSGD_CALLBACK_MAX_AGE from then
    last_attempt_at TEXT,
    last_status     INTEGER,
    last_error      TEXT,
    sent_at         TEXT
);
CREATE INDEX callbacks_due ON callbacks (next_attempt_at) WHERE state = 'pending';
CREATE INDEX callbacks_key ON callbacks (key, id) WHERE state = 'pending';
CREATE INDEX callbacks_message ON callbacks (message_id, id) WHERE message_id IS NOT NULL;
CREATE INDEX callbacks_state ON callbacks (state, id);

-- The relay uses `callbacks`; this reserved table was never written.
DROP TABLE webhook_outbox;

CREATE TRIGGER callbacks_status AFTER UPDATE OF status ON messages
WHEN NEW.callback_to IS NOT NULL AND NEW.status IS NOT OLD.status
    AND (NEW.status IN ('SUCCESS', 'FAILURE', 'EXPIRED', 'CANCELED')
         OR (NEW.status = 'RETRY' AND (SELECT retrying FROM callback_endpoints
                                        WHERE name = NEW.callback_to) = 1))
BEGIN
    INSERT INTO callbacks (webhook_id, kind, type, key, message_id, instance, endpoint, url,
                           occurred_at, next_attempt_at)
    VALUES ('msg_' || lower(hex(randomblob(16))), 'event',
            CASE NEW.status WHEN 'SUCCESS' THEN 'message.sent' WHEN 'FAILURE' THEN 'message.failed'
                 WHEN 'EXPIRED' THEN 'message.expired' WHEN 'CANCELED' THEN 'message.canceled'
                 ELSE 'message.retrying' END,
            NEW.id, NEW.id, NEW.instance, NEW.callback_to, NEW.callback_url,
            strftime('%Y-%m-%d %H:%M:%f', 'now'), strftime('%Y-%m-%d %H:%M:%f', 'now'));
END;

CREATE TRIGGER callbacks_delivery AFTER UPDATE OF delivery ON messages
WHEN NEW.callback_to IS NOT NULL AND NEW.delivery IS NOT OLD.delivery
    AND NEW.delivery IN ('delivered', 'read', 'failed', 'unconfirmed')
BEGIN
    INSERT INTO callbacks (webhook_id, kind, type, key, message_id, instance, endpoint, url,
                           occurred_at, next_attempt_at)
    VALUES ('msg_' || lower(hex(randomblob(16))), 'event',
            CASE NEW.delivery WHEN 'delivered' THEN 'message.delivered' WHEN 'read' THEN 'message.read'
                 WHEN 'failed' THEN 'message.delivery_failed' ELSE 'message.unconfirmed' END,
            NEW.id, NEW.id, NEW.instance, NEW.callback_to, NEW.callback_url,
            strftime('%Y-%m-%d %H:%M:%f', 'now'), strftime('%Y-%m-%d %H:%M:%f', 'now'));
END;

-- instance.paused / instance.resumed go to the default endpoint and to each token's endpoint
-- whose token may use the instance. Only core SQL functions: no JSON1, which some SQLite builds
-- lack (the sender writes the event's JSON).
CREATE VIEW callback_lane_targets AS
    SELECT e.name AS endpoint, t.instances AS instances FROM callback_endpoints e
    LEFT JOIN tokens t ON e.name = 'token:' || t.name
    WHERE e.url IS NOT NULL AND (e.name = 'default' OR t.name IS NOT NULL);

CREATE TRIGGER callbacks_lane_update AFTER UPDATE OF paused ON lanes
WHEN NEW.paused IS NOT OLD.paused
BEGIN
    INSERT INTO callbacks (webhook_id, kind, type, key, instance, endpoint, occurred_at,
                           next_attempt_at, data)
    SELECT 'msg_' || lower(hex(randomblob(16))), 'event',
           CASE WHEN NEW.paused THEN 'instance.paused' ELSE 'instance.resumed' END,
           'instance:' || NEW.instance || ':' || endpoint, NEW.instance, endpoint,
           strftime('%Y-%m-%d %H:%M:%f', 'now'), strftime('%Y-%m-%d %H:%M:%f', 'now'),
           NEW.paused_reason
    FROM callback_lane_targets
    WHERE instances IS NULL OR instr(',' || instances || ',', ',' || NEW.instance || ',') > 0;
END;

CREATE TRIGGER callbacks_lane_insert AFTER INSERT ON lanes WHEN NEW.paused = 1
BEGIN
    INSERT INTO callbacks (webhook_id, kind, type, key, instance, endpoint, occurred_at,
                           next_attempt_at, data)
    SELECT 'msg_' || lower(hex(randomblob(16))), 'event', 'instance.paused',
           'instance:' || NEW.instance || ':' || endpoint, NEW.instance, endpoint,
           strftime('%Y-%m-%d %H:%M:%f', 'now'), strftime('%Y-%m-%d %H:%M:%f', 'now'),
           NEW.paused_reason
    FROM callback_lane_targets
    WHERE instances IS NULL OR instr(',' || instances || ',', ',' || NEW.instance || ',') > 0;
END;
""",
    ),
    (
        8,
        "media",
        """
-- A message's media (issue 16), NULL for a text: its kind, and either a stored file (under the
-- data directory as media/ab/cdef..., named by the SHA-256 of its bytes; its size, and the
-- mimetype and file name sent) or a URL that Evolution downloads itself. `text` holds the
-- caption ('' for none).
ALTER TABLE messages ADD COLUMN media_type TEXT;      -- image, document, video, audio
ALTER TABLE messages ADD COLUMN media_sha256 TEXT;    -- the file media/<2>/<62>
ALTER TABLE messages ADD COLUMN media_size INTEGER;   -- bytes
ALTER TABLE messages ADD COLUMN media_mimetype TEXT;
ALTER TABLE messages ADD COLUMN media_filename TEXT;
ALTER TABLE messages ADD COLUMN media_url TEXT;       -- passed to Evolution as a URL
-- Retention asks whether any other message still names a file before deleting it.
CREATE INDEX messages_media ON messages (media_sha256) WHERE media_sha256 IS NOT NULL;
""",
    ),
]
