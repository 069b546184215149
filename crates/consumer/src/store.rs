//! The durable record, in one SQLite file (the default) or in a PostgreSQL database that
//! several consumer replicas share ([`Database`]; that backend is `store/pg.rs`, with the same
//! tables and the same behaviour): every event seen (by id, for dedupe, and to say who did
//! what), the repositories seen pushed (for `create_repository`), the lifetime usage
//! counters, the tallies of rejected, unattributed, duplicate, ignored and invalid events, and
//! the unique actors per usage metric and period (ISO week, calendar month).
//!
//! One envelope is one transaction: either all of its events are recorded and counted, or
//! none is (and the registry retries the envelope).
//!
//! Bounded: [`Store::prune`] deletes raw event rows older than the retention (and beyond a
//! row limit), and the per-period sets of actor ids once their period ended longer than the
//! retention ago; each period's unique counts are kept as numbers (ten per period) for good.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension as _, Transaction};
use serde::Serialize;

mod pg;

use self::pg::PgStore;
pub use self::pg::PG_SCHEMA_VERSION;

use crate::classify::{all_metric_names, metric_name, Assessment, InvalidEvent, Kind, Outcome};
use crate::period::{Period, PeriodKind};

/// `PRAGMA user_version` of the schema below (1: no periods; 2: unique actors per period).
pub const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    action TEXT,
    repository TEXT,
    tag TEXT,
    digest TEXT,
    media_type TEXT,
    outcome TEXT NOT NULL,
    counted TEXT NOT NULL DEFAULT '',
    token_type TEXT,
    username TEXT,
    user_id INTEGER,
    deploy_token_id INTEGER,
    request_id TEXT,
    reason TEXT,
    received_at INTEGER NOT NULL,
    occurred_at INTEGER
);
CREATE TABLE IF NOT EXISTS repositories (
    repository TEXT PRIMARY KEY,
    first_event_id TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tallies (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

/// Added by version 2 (also to a version-1 file, after `occurred_at` is added to `events`).
const SCHEMA_V2: &str = "
CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at);
CREATE TABLE IF NOT EXISTS unique_actors (
    period TEXT NOT NULL,
    event TEXT NOT NULL,
    actor INTEGER NOT NULL,
    ends_at INTEGER NOT NULL,
    PRIMARY KEY (period, event, actor)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS unique_actors_ends_at ON unique_actors (ends_at);
CREATE TABLE IF NOT EXISTS unique_counts (
    period TEXT NOT NULL,
    event TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (period, event)
) WITHOUT ROWID;
";

/// Where the record is kept (`--database PATH|URL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file (created if missing): one consumer.
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` URL: any number of replicas share the database.
    Postgres(String),
}

impl Database {
    /// A `postgres://` or `postgresql://` URL names PostgreSQL; anything else is an SQLite path.
    pub fn parse(arg: &str) -> Database {
        Database::from(PathBuf::from(arg))
    }

    /// For logs and errors: the path, or the URL with any password replaced by `***`.
    pub fn display(&self) -> String {
        match self {
            Database::Sqlite(path) => path.display().to_string(),
            Database::Postgres(url) => redact_url(url),
        }
    }
}

impl From<PathBuf> for Database {
    fn from(path: PathBuf) -> Database {
        match path.to_str() {
            Some(s) if s.starts_with("postgres://") || s.starts_with("postgresql://") => {
                Database::Postgres(s.to_owned())
            }
            _ => Database::Sqlite(path),
        }
    }
}

/// `url` with the password of its user part and any `password=` parameter replaced by `***`.
fn redact_url(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, hosts)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{hosts}"),
                    None => authority.to_owned(),
                },
                None => authority.to_owned(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => head.to_owned(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: cannot open the database: {error}", path.display())]
    Open { path: PathBuf, error: rusqlite::Error },
    #[error("{}: schema version {found} is newer than this consumer's ({SCHEMA_VERSION})", path.display())]
    Version { path: PathBuf, found: i64 },
    #[error("database: {0}")]
    Sql(rusqlite::Error),
    #[error("{target}: not a PostgreSQL connection URL: {error}")]
    Url { target: String, error: PgError },
    #[error("{target}: cannot connect to PostgreSQL: {error}")]
    Connect { target: String, error: PgError },
    #[error("{target}: cannot create the schema: {error}")]
    Schema { target: String, error: PgError },
    #[error("{target}: schema version {found} is newer than this consumer's ({PG_SCHEMA_VERSION})")]
    PgVersion { target: String, found: i32 },
    #[error("database: {0}")]
    Postgres(PgError),
    #[error("database: the worker thread failed: {0}")]
    Worker(String),
}

// Not `#[from]`: that would make the error its own source, and `{:#}` print it twice.
impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        StoreError::Sql(error)
    }
}

impl From<::postgres::Error> for StoreError {
    fn from(error: ::postgres::Error) -> StoreError {
        StoreError::Postgres(PgError(error))
    }
}

/// A PostgreSQL client error, shown with the server's message (`tokio-postgres` shows only
/// `db error` and leaves the rest to its source).
#[derive(Debug)]
pub struct PgError(pub ::postgres::Error);

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(db) = self.0.as_db_error() {
            return write!(f, "{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
        }
        let mut text = self.0.to_string();
        let mut source = std::error::Error::source(&self.0);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text = format!("{text}: {cause_text}");
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
}

/// Events that are not usage, counted by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    Rejected,
    Unattributed,
    Duplicates,
    Ignored,
    Invalid,
}

impl Tally {
    pub const ALL: [Tally; 5] =
        [Tally::Rejected, Tally::Unattributed, Tally::Duplicates, Tally::Ignored, Tally::Invalid];

    pub fn as_str(self) -> &'static str {
        match self {
            Tally::Rejected => "rejected",
            Tally::Unattributed => "unattributed",
            Tally::Duplicates => "duplicates",
            Tally::Ignored => "ignored",
            Tally::Invalid => "invalid",
        }
    }
}

/// What happened to one event of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// First delivery: recorded, and counted under `counted` (empty unless usage).
    New { assessment: Box<Assessment>, counted: Vec<String> },
    /// Already recorded by an earlier delivery (or earlier in this envelope): nothing counted.
    Duplicate { id: String },
    /// Not recordable (no id): tallied as invalid.
    Invalid(InvalidEvent),
}

/// The outcome of one envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub events: u64,
    /// Events counted as usage.
    pub counted: u64,
    pub rejected: u64,
    pub unattributed: u64,
    pub duplicates: u64,
    pub ignored: u64,
    pub invalid: u64,
    #[serde(skip)]
    pub details: Vec<Recorded>,
}

/// Usage counters (only those counted at least once) and the tallies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub counters: BTreeMap<String, i64>,
    pub rejected: i64,
    pub unattributed: i64,
    pub duplicates: i64,
    pub ignored: i64,
    pub invalid: i64,
}

impl Totals {
    pub fn tally(&self, tally: Tally) -> i64 {
        match tally {
            Tally::Rejected => self.rejected,
            Tally::Unattributed => self.unattributed,
            Tally::Duplicates => self.duplicates,
            Tally::Ignored => self.ignored,
            Tally::Invalid => self.invalid,
        }
    }
}

/// One recorded event, as `GET /events` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRow {
    /// Arrival order; `GET /events?after=SEQ` pages on it.
    pub seq: i64,
    pub id: String,
    pub action: Option<String>,
    pub repository: Option<String>,
    pub tag: Option<String>,
    pub digest: Option<String>,
    pub media_type: Option<String>,
    /// `counted`, `ignored`, `rejected` or `unattributed`.
    pub outcome: String,
    /// The usage metrics this event incremented.
    pub counted: Vec<String>,
    pub token_type: Option<String>,
    pub username: Option<String>,
    pub user_id: Option<i64>,
    pub deploy_token_id: Option<i64>,
    pub request_id: Option<String>,
    pub reason: Option<String>,
    /// Unix seconds.
    pub received_at: i64,
    /// Unix seconds the event happened (its week and month); `null` for rows recorded before
    /// schema version 2.
    pub occurred_at: Option<i64>,
}

/// A page of recorded events in arrival order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EventsPage {
    pub events: Vec<EventRow>,
    /// Pass as `after` for the next page; `null` when this page is the last.
    pub next_after: Option<i64>,
}

/// The unique actors of every usage metric in one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeriodCounts {
    /// `week` or `month`.
    pub period: &'static str,
    /// `2026-W53` or `2026-12`.
    pub key: String,
    /// First and last day (UTC, inclusive).
    pub from: String,
    pub to: String,
    /// Every usage metric name (all ten, 0 included) → distinct user ids (`…_user`) or
    /// distinct deploy-token ids (`…_deploy_token`) that did it in the period.
    pub unique: BTreeMap<String, i64>,
}

/// What the retention keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Raw event rows (and the per-period sets of actor ids, once the period ended) older
    /// than this are deleted.
    pub seconds: i64,
    /// At most this many raw event rows are kept (the oldest go first).
    pub max_events: i64,
}

/// What [`Store::prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub events: usize,
    pub actor_ids: usize,
}

/// The record, in either backend; every method behaves the same on both. Blocking: call it
/// from a blocking thread (`tokio::task::spawn_blocking`), never on an async one.
#[derive(Debug)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(Box<PgStore>),
}

impl Store {
    /// Opens (creating if needed) the SQLite file at `path` ([`SqliteStore::open`]).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        SqliteStore::open(path).map(Store::Sqlite)
    }

    /// Opens `database`: the SQLite file, or a connection to PostgreSQL (creating the schema
    /// if absent).
    pub fn connect(database: &Database) -> Result<Store, StoreError> {
        match database {
            Database::Sqlite(path) => Store::open(path),
            Database::Postgres(url) => PgStore::connect(url).map(|p| Store::Postgres(Box::new(p))),
        }
    }

    /// Records one envelope's events, in order, in one transaction. An event whose id is
    /// already recorded (by any replica sharing the database) is a duplicate: not counted.
    pub fn record(
        &mut self,
        batch: Vec<Result<Assessment, InvalidEvent>>,
        received_at: i64,
    ) -> Result<Report, StoreError> {
        match self {
            Store::Sqlite(s) => s.record(batch, received_at),
            Store::Postgres(p) => p.record(batch, received_at),
        }
    }

    pub fn totals(&mut self) -> Result<Totals, StoreError> {
        match self {
            Store::Sqlite(s) => s.totals(),
            Store::Postgres(p) => p.totals(),
        }
    }

    /// The unique actors of every usage metric in `period`.
    pub fn period_counts(&mut self, period: &Period) -> Result<PeriodCounts, StoreError> {
        let unique = match self {
            Store::Sqlite(s) => s.unique_counts(period)?,
            Store::Postgres(p) => p.unique_counts(period)?,
        };
        Ok(PeriodCounts {
            period: period.kind.as_str(),
            key: period.key.clone(),
            from: period.first_day.to_string(),
            to: period.last_day.to_string(),
            unique,
        })
    }

    /// At most `limit` recorded events with `seq > after`, in arrival order.
    pub fn events_page(&mut self, after: i64, limit: u32) -> Result<EventsPage, StoreError> {
        // One more than asked, to know whether another page follows.
        let mut events = match self {
            Store::Sqlite(s) => s.events_after(after, limit)?,
            Store::Postgres(p) => p.events_after(after, limit)?,
        };
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let next_after = if events.len() > limit {
            events.truncate(limit);
            events.last().map(|e| e.seq)
        } else {
            None
        };
        Ok(EventsPage { events, next_after })
    }

    /// How many distinct events are recorded (within the retention).
    pub fn event_count(&mut self) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.event_count(),
            Store::Postgres(p) => p.event_count(),
        }
    }

    /// Deletes what the retention no longer keeps, as of `now`: raw event rows received before
    /// `now - retention.seconds`, the oldest rows beyond `retention.max_events`, and the sets of
    /// actor ids of periods that ended before `now - retention.seconds` (their unique counts
    /// stay).
    pub fn prune(&mut self, now: i64, retention: Retention) -> Result<Pruned, StoreError> {
        let cutoff = now.saturating_sub(retention.seconds);
        match self {
            Store::Sqlite(s) => s.prune(cutoff, retention),
            Store::Postgres(p) => p.prune(cutoff, retention),
        }
    }
}

/// The SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, in WAL mode, migrating a version-1
    /// file (its unique actors are rebuilt from its recorded events).
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_err = |error| StoreError::Open { path: path.to_path_buf(), error };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(open_err)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0)).map_err(open_err)?;
        // The WAL file is truncated back to this after a checkpoint.
        conn.pragma_update_and_check(None, "journal_size_limit", 64 * 1024 * 1024, |r| r.get::<_, i64>(0))
            .map_err(open_err)?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(open_err)?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::Version { path: path.to_path_buf(), found });
        }
        let tx = conn.transaction().map_err(open_err)?;
        if found == 1 {
            tx.execute_batch("ALTER TABLE events ADD COLUMN occurred_at INTEGER").map_err(open_err)?;
        }
        tx.execute_batch(SCHEMA).map_err(open_err)?;
        tx.execute_batch(SCHEMA_V2).map_err(open_err)?;
        if found == 1 {
            rebuild_unique_actors(&tx).map_err(open_err)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(open_err)?;
        tx.commit().map_err(open_err)?;
        Ok(SqliteStore { conn })
    }

    fn record(&mut self, batch: Vec<Result<Assessment, InvalidEvent>>, received_at: i64) -> Result<Report, StoreError> {
        let tx = self.conn.transaction()?;
        let mut report = Report::default();
        for item in batch {
            report.events += 1;
            let assessment = match item {
                Ok(a) => a,
                Err(invalid) => {
                    bump(&tx, "tallies", Tally::Invalid.as_str())?;
                    report.invalid += 1;
                    report.details.push(Recorded::Invalid(invalid));
                    continue;
                }
            };
            let id = &assessment.facts.id;
            if tx.query_row("SELECT 1 FROM events WHERE id = ?1", [id], |_| Ok(())).optional()?.is_some() {
                bump(&tx, "tallies", Tally::Duplicates.as_str())?;
                report.duplicates += 1;
                report.details.push(Recorded::Duplicate { id: id.clone() });
                continue;
            }
            let counted = count(&tx, &assessment, received_at)?;
            match assessment.outcome {
                Outcome::Usage { .. } => report.counted += 1,
                Outcome::Ignored => report.ignored += 1,
                Outcome::Rejected => report.rejected += 1,
                Outcome::Unattributed => report.unattributed += 1,
            }
            insert_event(&tx, &assessment, &counted, received_at)?;
            report.details.push(Recorded::New { assessment: Box::new(assessment), counted });
        }
        tx.commit()?;
        Ok(report)
    }

    fn totals(&self) -> Result<Totals, StoreError> {
        let mut totals = Totals::default();
        let mut stmt = self.conn.prepare("SELECT name, value FROM counters WHERE value > 0 ORDER BY name")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (name, value) = row?;
            totals.counters.insert(name, value);
        }
        let mut stmt = self.conn.prepare("SELECT name, value FROM tallies")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (name, value) = row?;
            match Tally::ALL.into_iter().find(|t| t.as_str() == name) {
                Some(Tally::Rejected) => totals.rejected = value,
                Some(Tally::Unattributed) => totals.unattributed = value,
                Some(Tally::Duplicates) => totals.duplicates = value,
                Some(Tally::Ignored) => totals.ignored = value,
                Some(Tally::Invalid) => totals.invalid = value,
                None => {}
            }
        }
        Ok(totals)
    }

    fn unique_counts(&self, period: &Period) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut unique: BTreeMap<String, i64> = all_metric_names().into_iter().map(|n| (n, 0)).collect();
        let mut stmt = self.conn.prepare("SELECT event, value FROM unique_counts WHERE period = ?1")?;
        for row in stmt.query_map([&period.key], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (name, value) = row?;
            unique.insert(name, value);
        }
        Ok(unique)
    }

    /// At most `limit + 1` rows with `seq > after`, in arrival order.
    fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, id, action, repository, tag, digest, media_type, outcome, counted, token_type, username,
                    user_id, deploy_token_id, request_id, reason, received_at, occurred_at
             FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let events = stmt
            .query_map(params![after, i64::from(limit) + 1], |r| {
                Ok(EventRow {
                    seq: r.get(0)?,
                    id: r.get(1)?,
                    action: r.get(2)?,
                    repository: r.get(3)?,
                    tag: r.get(4)?,
                    digest: r.get(5)?,
                    media_type: r.get(6)?,
                    outcome: r.get(7)?,
                    counted: r.get::<_, String>(8)?.split_whitespace().map(str::to_owned).collect(),
                    token_type: r.get(9)?,
                    username: r.get(10)?,
                    user_id: r.get(11)?,
                    deploy_token_id: r.get(12)?,
                    request_id: r.get(13)?,
                    reason: r.get(14)?,
                    received_at: r.get(15)?,
                    occurred_at: r.get(16)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(events)
    }

    fn event_count(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?)
    }

    /// [`Store::prune`] with `cutoff = now - retention.seconds`; then checkpoints the WAL.
    fn prune(&mut self, cutoff: i64, retention: Retention) -> Result<Pruned, StoreError> {
        let tx = self.conn.transaction()?;
        let mut events = tx.execute("DELETE FROM events WHERE received_at < ?1", [cutoff])?;
        events += tx.execute(
            "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?1",
            [retention.max_events.max(0)],
        )?;
        let actor_ids = tx.execute("DELETE FROM unique_actors WHERE ends_at < ?1", [cutoff])?;
        tx.commit()?;
        self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(Pruned { events, actor_ids })
    }
}

/// Adds one to `name` in `table` (`counters` or `tallies`).
fn bump(tx: &Transaction<'_>, table: &'static str, name: &str) -> rusqlite::Result<()> {
    tx.execute(
        &format!("INSERT INTO {table} (name, value) VALUES (?1, 1) ON CONFLICT(name) DO UPDATE SET value = value + 1"),
        [name],
    )?;
    Ok(())
}

/// Adds `actor` to the week's and the month's set of `metric` around `occurred_at`, and counts
/// it there when it is new.
fn add_unique(tx: &Transaction<'_>, metric: &str, actor: i64, occurred_at: i64) -> rusqlite::Result<()> {
    for kind in PeriodKind::ALL {
        let period = Period::at_unix(kind, occurred_at);
        let added = tx.execute(
            "INSERT OR IGNORE INTO unique_actors (period, event, actor, ends_at) VALUES (?1, ?2, ?3, ?4)",
            params![period.key, metric, actor, period.end_unix()],
        )?;
        if added == 1 {
            tx.execute(
                "INSERT INTO unique_counts (period, event, value) VALUES (?1, ?2, 1)
                 ON CONFLICT(period, event) DO UPDATE SET value = value + 1",
                params![period.key, metric],
            )?;
        }
    }
    Ok(())
}

/// Rebuilds the unique actors from the recorded events (migrating a version-1 file, whose
/// events carry no `occurred_at`: their arrival stands in).
fn rebuild_unique_actors(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let rows: Vec<(String, Option<i64>, Option<i64>, i64)> = {
        let mut stmt = tx.prepare(
            "SELECT counted, user_id, deploy_token_id, COALESCE(occurred_at, received_at) FROM events
             WHERE outcome = 'counted' ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    for (counted, user_id, deploy_token_id, at) in rows {
        for metric in counted.split_whitespace() {
            let actor = if metric.ends_with("_deploy_token") { deploy_token_id } else { user_id };
            if let Some(actor) = actor {
                add_unique(tx, metric, actor, at)?;
            }
        }
    }
    Ok(())
}

/// Counts a new event: its usage metric, `create_repository` for the first counted push of
/// its repository, or its tally; and its actor among the period's unique actors of each.
/// Returns the usage metrics incremented.
fn count(tx: &Transaction<'_>, a: &Assessment, received_at: i64) -> rusqlite::Result<Vec<String>> {
    let (kind, principal) = match a.outcome {
        Outcome::Usage { kind, principal } => (kind, principal),
        Outcome::Ignored => return bump(tx, "tallies", Tally::Ignored.as_str()).map(|()| Vec::new()),
        Outcome::Rejected => return bump(tx, "tallies", Tally::Rejected.as_str()).map(|()| Vec::new()),
        Outcome::Unattributed => return bump(tx, "tallies", Tally::Unattributed.as_str()).map(|()| Vec::new()),
    };
    let mut counted = vec![metric_name(kind, principal)];
    if let (true, Some(repository)) = (kind.is_push(), &a.facts.repository) {
        let created = tx.execute(
            "INSERT OR IGNORE INTO repositories (repository, first_event_id, received_at) VALUES (?1, ?2, ?3)",
            params![repository, a.facts.id, received_at],
        )?;
        if created == 1 {
            counted.push(metric_name(Kind::CreateRepository, principal));
        }
    }
    for metric in &counted {
        bump(tx, "counters", metric)?;
        if let Some(actor) = a.actor_id() {
            add_unique(tx, metric, actor, a.occurred_at)?;
        }
    }
    Ok(counted)
}

fn insert_event(tx: &Transaction<'_>, a: &Assessment, counted: &[String], received_at: i64) -> rusqlite::Result<()> {
    let f = &a.facts;
    let user = a.user.as_ref();
    let id_of = |id: Option<u64>| id.and_then(|i| i64::try_from(i).ok());
    tx.execute(
        "INSERT INTO events (id, action, repository, tag, digest, media_type, outcome, counted, token_type,
                             username, user_id, deploy_token_id, request_id, reason, received_at, occurred_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        params![
            f.id,
            f.action,
            f.repository,
            f.tag,
            f.digest,
            f.media_type,
            a.outcome.as_str(),
            counted.join(" "),
            user.map(|u| &u.token_type),
            user.map(|u| &u.username),
            id_of(user.and_then(|u| u.user_id)),
            id_of(user.and_then(|u| u.deploy_token_id)),
            f.request_id,
            a.reason,
            received_at,
            a.occurred_at,
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;
    use crate::classify::{EventFacts, PrincipalType};
    use registry_guard_core::token::user::UserInfo;
    use registry_guard_postgres_testing::{Server, SKIP_MESSAGE};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// The backend a scenario runs on; [`Fixture::open`] opens (again) the same database.
    enum Fixture {
        Sqlite(tempfile::TempDir),
        Postgres { server: Arc<Server>, url: String },
    }

    impl Fixture {
        fn sqlite() -> Fixture {
            Fixture::Sqlite(tempfile::tempdir().unwrap())
        }

        /// A fresh database on this process's shared PostgreSQL server; `None` (the test
        /// skips, saying so) only when no PostgreSQL binaries are installed.
        fn postgres(test: &str) -> Option<Fixture> {
            static N: AtomicU32 = AtomicU32::new(0);
            let Some(server) = registry_guard_postgres_testing::shared().unwrap() else {
                eprintln!("{test}: {SKIP_MESSAGE}");
                return None;
            };
            let name = format!("{test}_{}", N.fetch_add(1, Ordering::Relaxed));
            let url = server.create_database(&name).unwrap();
            Some(Fixture::Postgres { server, url })
        }

        fn database(&self) -> Database {
            match self {
                Fixture::Sqlite(dir) => Database::Sqlite(dir.path().join("c.sqlite")),
                Fixture::Postgres { url, .. } => Database::Postgres(url.clone()),
            }
        }

        fn open(&self) -> Store {
            Store::connect(&self.database()).unwrap()
        }
    }

    /// Runs each scenario `fn name(&Fixture)` as `sqlite::name` and `postgres::name`.
    macro_rules! on_both_backends {
        ($($name:ident),* $(,)?) => {
            mod sqlite {
                $( #[test] fn $name() { super::$name(&super::Fixture::sqlite()) } )*
            }
            mod postgres {
                $( #[test] fn $name() {
                    if let Some(fixture) = super::Fixture::postgres(stringify!($name)) { super::$name(&fixture) }
                } )*
            }
        };
    }

    on_both_backends!(
        one_user_pushing_three_tags_is_one_unique_user,
        weeks_and_months_split_at_utc_boundaries_across_new_year,
        prune_deletes_old_rows_and_expired_sets_but_keeps_the_counts,
        events_are_paged_in_arrival_order,
        dedupe_create_repository_and_reopen,
        two_replicas_recording_the_same_envelopes_at_once_count_each_event_once,
    );

    fn push(id: &str, repository: &str, token_type: &str) -> Result<Assessment, InvalidEvent> {
        push_by(id, repository, token_type, 5, 1)
    }

    /// A tag push by user `actor` (or deploy token `actor`), happening at `at`.
    fn push_by(id: &str, repository: &str, token_type: &str, actor: u64, at: i64) -> Result<Assessment, InvalidEvent> {
        let deploy = token_type == "deploy_token";
        Ok(Assessment {
            facts: EventFacts {
                id: id.into(),
                action: Some("push".into()),
                repository: Some(repository.into()),
                tag: Some("v1".into()),
                ..EventFacts::default()
            },
            user: Some(UserInfo {
                token_type: token_type.into(),
                username: format!("actor-{actor}"),
                user_id: (!deploy).then_some(actor),
                deploy_token_id: deploy.then_some(actor),
                job: None,
            }),
            outcome: Outcome::Usage { kind: Kind::PushTag, principal: PrincipalType::of(token_type) },
            reason: None,
            occurred_at: at,
        })
    }

    fn unix(rfc3339: &str) -> i64 {
        crate::period::parse_rfc3339(rfc3339).unwrap()
    }

    fn unique(store: &mut Store, kind: PeriodKind, at: &str, metric: &str) -> i64 {
        store.period_counts(&Period::at_unix(kind, unix(at))).unwrap().unique[metric]
    }

    const PUSH_TAG_USER: &str = "i_container_registry_push_tag_user";
    const PUSH_TAG_DT: &str = "i_container_registry_push_tag_deploy_token";
    const CREATE_USER: &str = "i_container_registry_create_repository_user";

    fn one_user_pushing_three_tags_is_one_unique_user(fx: &Fixture) {
        let mut store = fx.open();
        let t = unix("2026-11-18T10:00:00Z");
        store
            .record(
                vec![
                    push_by("a", "acme/app", "pat", 5, t),
                    push_by("b", "acme/app", "pat", 5, t + 60),
                    push_by("c", "acme/lib", "password", 5, t + 120),
                    push_by("d", "acme/app", "pat", 7, t + 180),
                    push_by("e", "acme/app", "deploy_token", 5, t + 240),
                    push_by("f", "acme/app", "deploy_token", 5, t + 300),
                ],
                t + 400,
            )
            .unwrap();
        let totals = store.totals().unwrap();
        assert_eq!(totals.counters[PUSH_TAG_USER], 4, "lifetime totals count events");
        assert_eq!(totals.counters[PUSH_TAG_DT], 2);
        let at = "2026-11-18T00:00:00Z";
        for kind in PeriodKind::ALL {
            // Users 5 and 7; user 5 and deploy token 5 are different actors.
            assert_eq!(unique(&mut store, kind, at, PUSH_TAG_USER), 2, "{kind:?}");
            assert_eq!(unique(&mut store, kind, at, PUSH_TAG_DT), 1, "{kind:?}");
            // acme/app by user 5, acme/lib by user 5: one unique creator.
            assert_eq!(unique(&mut store, kind, at, CREATE_USER), 1, "{kind:?}");
        }
        let p = store.period_counts(&Period::at_unix(PeriodKind::Week, t)).unwrap();
        assert_eq!(
            (p.period, p.key.as_str(), p.from.as_str(), p.to.as_str()),
            ("week", "2026-W47", "2026-11-16", "2026-11-22")
        );
        assert_eq!(p.unique.len(), 10, "every metric, 0 included");
        assert_eq!(p.unique["i_container_registry_delete_tag_user"], 0);
    }

    fn weeks_and_months_split_at_utc_boundaries_across_new_year(fx: &Fixture) {
        let mut store = fx.open();
        store
            .record(
                vec![
                    push_by("a", "r", "pat", 1, unix("2026-12-27T23:59:59Z")), // Sunday of W52
                    push_by("b", "r", "pat", 2, unix("2026-12-28T00:00:00Z")), // Monday of W53
                    push_by("c", "r", "pat", 3, unix("2026-12-31T23:59:59Z")), // W53, December
                    push_by("d", "r", "pat", 4, unix("2027-01-01T00:00:00Z")), // W53, January
                    push_by("e", "r", "pat", 3, unix("2027-01-03T23:59:59Z")), // W53, January
                    push_by("f", "r", "pat", 5, unix("2027-01-04T00:00:00Z")), // W01, January
                ],
                unix("2027-01-05T00:00:00Z"),
            )
            .unwrap();
        drop(store);
        let mut store = fx.open();
        let mut week = |at| unique(&mut store, PeriodKind::Week, at, PUSH_TAG_USER);
        assert_eq!(week("2026-12-27T12:00:00Z"), 1);
        assert_eq!(week("2026-12-31T12:00:00Z"), 3, "users 2, 3, 4 (3 twice)");
        assert_eq!(week("2027-01-01T12:00:00Z"), 3, "2027-01-01 is in 2026-W53 too");
        assert_eq!(week("2027-01-04T12:00:00Z"), 1);
        let mut month = |at| unique(&mut store, PeriodKind::Month, at, PUSH_TAG_USER);
        assert_eq!(month("2026-12-15T00:00:00Z"), 3, "users 1, 2, 3");
        assert_eq!(month("2027-01-15T00:00:00Z"), 3, "users 4, 3, 5");
        assert_eq!(month("2027-02-01T00:00:00Z"), 0);
    }

    fn prune_deletes_old_rows_and_expired_sets_but_keeps_the_counts(fx: &Fixture) {
        let mut store = fx.open();
        let day = 86_400;
        let t0 = unix("2026-11-02T12:00:00Z"); // Monday of W45
        store.record(vec![push_by("old", "r", "pat", 1, t0)], t0).unwrap();
        store.record(vec![push_by("new", "r", "pat", 2, t0 + 20 * day)], t0 + 20 * day).unwrap();
        let retention = Retention { seconds: 10 * day, max_events: 100 };
        let pruned = store.prune(t0 + 21 * day, retention).unwrap();
        assert_eq!(pruned.events, 1);
        // W45's sets (ended 2026-11-09: push_tag and create_repository of user 1) and nothing
        // else: November has not ended.
        assert_eq!(pruned.actor_ids, 2);
        let page = store.events_page(0, 10).unwrap();
        assert_eq!(page.events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["new"]);
        assert_eq!(unique(&mut store, PeriodKind::Week, "2026-11-02T00:00:00Z", PUSH_TAG_USER), 1, "count kept");
        assert_eq!(unique(&mut store, PeriodKind::Month, "2026-11-02T00:00:00Z", PUSH_TAG_USER), 2);
        assert_eq!(store.totals().unwrap().counters[PUSH_TAG_USER], 2, "lifetime totals kept");
        // The row limit: only the newest rows stay.
        let batch = (0..5).map(|i| push_by(&format!("n{i}"), "r", "pat", 2, t0 + 21 * day)).collect();
        store.record(batch, t0 + 21 * day).unwrap();
        let pruned = store.prune(t0 + 21 * day, Retention { seconds: 10 * day, max_events: 3 }).unwrap();
        assert_eq!(pruned.events, 3);
        let ids: Vec<String> = store.events_page(0, 10).unwrap().events.into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["n2", "n3", "n4"]);
        // Redeliveries draw no rows (and, in PostgreSQL, leave gaps in `seq`): still the
        // newest three rows are kept, and the duplicates are not counted.
        let batch = (3..8).map(|i| push_by(&format!("n{i}"), "r", "pat", 2, t0 + 21 * day)).collect();
        let report = store.record(batch, t0 + 21 * day).unwrap();
        assert_eq!((report.counted, report.duplicates), (3, 2));
        let pruned = store.prune(t0 + 21 * day, Retention { seconds: 10 * day, max_events: 3 }).unwrap();
        assert_eq!(pruned.events, 3);
        let ids: Vec<String> = store.events_page(0, 10).unwrap().events.into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["n5", "n6", "n7"]);
        assert_eq!(store.event_count().unwrap(), 3);
    }

    fn events_are_paged_in_arrival_order(fx: &Fixture) {
        let mut store = fx.open();
        store.record((0..5).map(|i| push(&format!("e{i}"), "r", "pat")).collect(), 1).unwrap();
        let first = store.events_page(0, 2).unwrap();
        assert_eq!(first.events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["e0", "e1"]);
        let second = store.events_page(first.next_after.unwrap(), 2).unwrap();
        assert_eq!(second.events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["e2", "e3"]);
        let last = store.events_page(second.next_after.unwrap(), 2).unwrap();
        assert_eq!(last.events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["e4"]);
        assert_eq!(last.next_after, None);
    }

    #[test]
    fn a_version_1_file_is_migrated_and_its_unique_actors_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.sqlite");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&SCHEMA.replace(
            "    received_at INTEGER NOT NULL,\n    occurred_at INTEGER\n",
            "    received_at INTEGER NOT NULL\n",
        ))
        .unwrap();
        let t = unix("2026-12-31T12:00:00Z");
        for (id, user) in [("a", 5), ("b", 5), ("c", 6)] {
            conn.execute(
                "INSERT INTO events (id, outcome, counted, user_id, received_at) VALUES (?1, 'counted', ?2, ?3, ?4)",
                params![id, PUSH_TAG_USER, user, t],
            )
            .unwrap();
        }
        conn.pragma_update(None, "user_version", 1).unwrap();
        drop(conn);
        let mut store = Store::open(&path).unwrap();
        assert_eq!(unique(&mut store, PeriodKind::Week, "2026-12-31T00:00:00Z", PUSH_TAG_USER), 2);
        assert_eq!(unique(&mut store, PeriodKind::Month, "2026-12-31T00:00:00Z", PUSH_TAG_USER), 2);
        assert_eq!(store.events_page(0, 10).unwrap().events[0].occurred_at, None);
        drop(store);
        // Reopening does not rebuild (or double) anything.
        let mut store = Store::open(&path).unwrap();
        assert_eq!(unique(&mut store, PeriodKind::Week, "2026-12-31T00:00:00Z", PUSH_TAG_USER), 2);
    }

    fn dedupe_create_repository_and_reopen(fx: &Fixture) {
        let mut store = fx.open();
        let r = store.record(vec![push("a", "r1", "pat"), push("a", "r1", "pat"), push("b", "r1", "pat")], 1).unwrap();
        assert_eq!((r.events, r.counted, r.duplicates), (3, 2, 1));
        drop(store);
        let mut store = fx.open();
        let t = store.totals().unwrap();
        assert_eq!(t.counters["i_container_registry_push_tag_user"], 2);
        assert_eq!(t.counters["i_container_registry_create_repository_user"], 1);
        assert_eq!(t.duplicates, 1);
        let c = store.events_page(0, 10).unwrap();
        assert_eq!(c.events[0].counted.len(), 2);
        assert_eq!(c.events[1].counted, ["i_container_registry_push_tag_user"]);
        // Redelivered after the reopen: nothing counted again.
        let r = store.record(vec![push("b", "r1", "pat")], 2).unwrap();
        assert_eq!((r.counted, r.duplicates), (0, 1));
        assert_eq!(store.totals().unwrap().counters["i_container_registry_push_tag_user"], 2);
    }

    /// Two stores on one PostgreSQL database (two replicas; SQLite serves one consumer: one
    /// store), each recording every envelope from several threads at once: each event counts
    /// once, every other delivery is a duplicate, and both stores read the same.
    fn two_replicas_recording_the_same_envelopes_at_once_count_each_event_once(fx: &Fixture) {
        let replicas = if matches!(fx, Fixture::Sqlite(_)) { 1 } else { 2 };
        let opened: Vec<Arc<std::sync::Mutex<Store>>> =
            (0..replicas).map(|_| Arc::new(std::sync::Mutex::new(fx.open()))).collect();
        let stores: Vec<_> = (0..2).map(|i| Arc::clone(&opened[i % replicas])).collect();
        let t = unix("2026-11-18T10:00:00Z");
        let envelope = move |n: u64| -> Vec<Result<Assessment, InvalidEvent>> {
            (0..4).map(|i| push_by(&format!("e{n}-{i}"), &format!("r{i}"), "pat", 10 + i, t)).collect()
        };
        let threads: Vec<_> = (0..8u64)
            .map(|thread| {
                let store = Arc::clone(&stores[usize::try_from(thread % 2).unwrap()]);
                std::thread::spawn(move || {
                    let mut counted = 0;
                    for n in 0..5 {
                        // Every thread delivers envelopes 0..5, starting at a different one.
                        let batch = envelope((n + thread) % 5);
                        counted += store.lock().unwrap().record(batch, t).unwrap().counted;
                    }
                    counted
                })
            })
            .collect();
        let counted: u64 = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(counted, 20, "5 envelopes of 4 distinct events");
        let totals = stores[0].lock().unwrap().totals().unwrap();
        let mut a = stores[0].lock().unwrap();
        assert_eq!(totals.counters[PUSH_TAG_USER], 20);
        assert_eq!(totals.counters[CREATE_USER], 4, "r0..r3 created once each");
        assert_eq!(totals.duplicates, 8 * 5 * 4 - 20);
        assert_eq!(unique(&mut a, PeriodKind::Week, "2026-11-18T00:00:00Z", PUSH_TAG_USER), 4);
        assert_eq!(a.event_count().unwrap(), 20);
        let page = a.events_page(0, 100).unwrap();
        drop(a);
        let mut b = stores[1].lock().unwrap();
        assert_eq!(b.totals().unwrap(), totals);
        assert_eq!(b.events_page(0, 100).unwrap(), page);
    }

    #[test]
    fn a_postgres_url_is_told_from_a_path_and_its_password_never_shown() {
        assert_eq!(Database::parse("/var/lib/c.sqlite"), Database::Sqlite("/var/lib/c.sqlite".into()));
        assert_eq!(Database::parse("postgres.sqlite"), Database::Sqlite("postgres.sqlite".into()));
        let url = "postgresql://consumer:s3cret@db.internal:5433/counts?password=s3cret&connect_timeout=5";
        assert_eq!(Database::parse(url), Database::Postgres(url.into()));
        assert_eq!(
            Database::parse(url).display(),
            "postgresql://consumer:***@db.internal:5433/counts?password=***&connect_timeout=5"
        );
        assert_eq!(Database::parse("postgres://app@h/db").display(), "postgres://app@h/db");
        assert_eq!(Database::parse("postgres://a:b@h").display(), "postgres://a:***@h");
    }

    #[test]
    fn a_bad_postgres_url_or_an_unreachable_server_is_a_clear_error() {
        let err = Store::connect(&Database::parse("postgres://app:pw@127.0.0.1:notaport/db")).unwrap_err();
        assert!(matches!(err, StoreError::Url { .. }), "{err}");
        assert!(
            err.to_string().starts_with("postgres://app:***@127.0.0.1:notaport/db: not a PostgreSQL connection URL: "),
            "{err}"
        );
        // Nothing listens on port 1.
        let err = Store::connect(&Database::parse("postgres://app:pw@127.0.0.1:1/db")).unwrap_err();
        assert!(matches!(err, StoreError::Connect { .. }), "{err}");
        let text = err.to_string();
        assert!(text.starts_with("postgres://app:***@127.0.0.1:1/db: cannot connect to PostgreSQL: "), "{text}");
        assert!(!text.contains("pw"), "{text}");
    }

    #[test]
    fn postgres_replicas_starting_at_once_create_the_schema_once_and_a_newer_one_is_refused() {
        let Some(fx) = Fixture::postgres("schema") else { return };
        let Fixture::Postgres { server, url } = &fx else { unreachable!() };
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let database = fx.database();
                std::thread::spawn(move || Store::connect(&database).map(drop))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let db = url.rsplit('/').next().unwrap();
        assert_eq!(server.psql(db, "SELECT count(*), max(version) FROM consumer_schema").unwrap(), "1|1");
        // A database for a newer consumer is refused, by name.
        server.psql(db, "UPDATE consumer_schema SET version = 9").unwrap();
        let err = Store::connect(&fx.database()).unwrap_err();
        assert!(matches!(err, StoreError::PgVersion { found: 9, .. }), "{err}");
        assert_eq!(err.to_string(), format!("{url}: schema version 9 is newer than this consumer's (1)"));
    }

    /// A store dropped on an async thread (the last `Arc<AppState>`) must not panic, and a
    /// lost connection is replaced on the next call.
    #[test]
    fn a_postgres_store_reconnects_and_drops_anywhere() {
        let Some(fx) = Fixture::postgres("reconnect") else { return };
        let Fixture::Postgres { server, url } = &fx else { unreachable!() };
        let mut store = fx.open();
        store.record(vec![push("a", "r", "pat")], 1).unwrap();
        let db = url.rsplit('/').next().unwrap();
        server
            .psql("postgres", &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"))
            .unwrap();
        // The first call may see the connection die; then it reconnects.
        let _ = store.event_count();
        assert_eq!(store.event_count().unwrap(), 1);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async move { drop(store) });
    }

    #[test]
    fn a_newer_schema_or_a_non_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.sqlite");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: cannot open the database: ", path.display())), "{err}");
        let path = dir.path().join("new.sqlite");
        drop(Store::open(&path).unwrap());
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 9).unwrap();
        assert!(matches!(Store::open(&path), Err(StoreError::Version { found: 9, .. })));
        // The version written is this consumer's.
        let conn = Connection::open(dir.path().join("fresh.sqlite")).unwrap();
        drop(conn);
        drop(Store::open(&dir.path().join("fresh.sqlite")).unwrap());
        let conn = Connection::open(dir.path().join("fresh.sqlite")).unwrap();
        let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }
}
