//! The durable record, in one SQLite file: every event seen (by id, for dedupe, and to say who
//! did what), the repositories seen pushed (for `create_repository`), the usage counters and
//! the tallies of rejected, unattributed, duplicate, ignored and invalid events.
//!
//! One envelope is one transaction: either all of its events are recorded and counted, or
//! none is (and the registry retries the envelope).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension as _, Transaction};
use serde::Serialize;

use crate::classify::{metric_name, Assessment, InvalidEvent, Kind, Outcome};

/// `PRAGMA user_version` of the schema below.
pub const SCHEMA_VERSION: i64 = 1;

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
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS repositories (
    repository TEXT PRIMARY KEY,
    first_event_id TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tallies (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: cannot open the database: {error}", path.display())]
    Open { path: PathBuf, error: rusqlite::Error },
    #[error("{}: schema version {found} is newer than this consumer's ({SCHEMA_VERSION})", path.display())]
    Version { path: PathBuf, found: i64 },
    #[error("database: {0}")]
    Sql(rusqlite::Error),
}

// Not `#[from]`: that would make the error its own source, and `{:#}` print it twice.
impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        StoreError::Sql(error)
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

/// One recorded event, as `GET /counts` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRow {
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
}

/// Totals and every recorded event in arrival order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    #[serde(flatten)]
    pub totals: Totals,
    pub events: Vec<EventRow>,
}

#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, in WAL mode.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |error| StoreError::Open { path: path.to_path_buf(), error };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(open_err)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0)).map_err(open_err)?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(open_err)?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::Version { path: path.to_path_buf(), found });
        }
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(open_err)?;
        Ok(Store { conn })
    }

    /// Records one envelope's events, in order, in one transaction.
    pub fn record(
        &mut self,
        batch: Vec<Result<Assessment, InvalidEvent>>,
        received_at: i64,
    ) -> Result<Report, StoreError> {
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

    pub fn totals(&self) -> Result<Totals, StoreError> {
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

    /// Totals and all events in arrival order.
    pub fn counts(&self) -> Result<Counts, StoreError> {
        let totals = self.totals()?;
        let mut stmt = self.conn.prepare(
            "SELECT id, action, repository, tag, digest, media_type, outcome, counted, token_type, username,
                    user_id, deploy_token_id, request_id, reason, received_at
             FROM events ORDER BY seq",
        )?;
        let events = stmt
            .query_map([], |r| {
                Ok(EventRow {
                    id: r.get(0)?,
                    action: r.get(1)?,
                    repository: r.get(2)?,
                    tag: r.get(3)?,
                    digest: r.get(4)?,
                    media_type: r.get(5)?,
                    outcome: r.get(6)?,
                    counted: r.get::<_, String>(7)?.split_whitespace().map(str::to_owned).collect(),
                    token_type: r.get(8)?,
                    username: r.get(9)?,
                    user_id: r.get(10)?,
                    deploy_token_id: r.get(11)?,
                    request_id: r.get(12)?,
                    reason: r.get(13)?,
                    received_at: r.get(14)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Counts { totals, events })
    }

    /// How many distinct events have been recorded.
    pub fn event_count(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?)
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

/// Counts a new event: its usage metric, `create_repository` for the first counted push of
/// its repository, or its tally. Returns the usage metrics incremented.
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
    }
    Ok(counted)
}

fn insert_event(tx: &Transaction<'_>, a: &Assessment, counted: &[String], received_at: i64) -> rusqlite::Result<()> {
    let f = &a.facts;
    let user = a.user.as_ref();
    let id_of = |id: Option<u64>| id.and_then(|i| i64::try_from(i).ok());
    tx.execute(
        "INSERT INTO events (id, action, repository, tag, digest, media_type, outcome, counted, token_type,
                             username, user_id, deploy_token_id, request_id, reason, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
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
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;
    use crate::classify::{EventFacts, PrincipalType};
    use registry_guard_core::token::UserInfo;

    fn push(id: &str, repository: &str, token_type: &str) -> Result<Assessment, InvalidEvent> {
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
                username: "dev".into(),
                user_id: Some(5),
                deploy_token_id: None,
            }),
            outcome: Outcome::Usage { kind: Kind::PushTag, principal: PrincipalType::of(token_type) },
            reason: None,
        })
    }

    #[test]
    fn dedupe_create_repository_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let mut store = Store::open(&path).unwrap();
        let r = store.record(vec![push("a", "r1", "pat"), push("a", "r1", "pat"), push("b", "r1", "pat")], 1).unwrap();
        assert_eq!((r.events, r.counted, r.duplicates), (3, 2, 1));
        drop(store);
        let store = Store::open(&path).unwrap();
        let t = store.totals().unwrap();
        assert_eq!(t.counters["i_container_registry_push_tag_user"], 2);
        assert_eq!(t.counters["i_container_registry_create_repository_user"], 1);
        assert_eq!(t.duplicates, 1);
        let c = store.counts().unwrap();
        assert_eq!(c.events[0].counted.len(), 2);
        assert_eq!(c.events[1].counted, ["i_container_registry_push_tag_user"]);
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
    }
}
