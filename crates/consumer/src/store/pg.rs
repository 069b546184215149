//! The PostgreSQL backend (`--database postgres://…`): the same record as the SQLite file, in
//! a database that several consumer replicas share, so they serve the same counts and a
//! delivery redelivered to any replica counts once.
//!
//! Crate: `postgres`, the blocking client over `tokio-postgres`. The store is synchronous and
//! runs on tokio's blocking threads behind one mutex per replica, exactly as the SQLite
//! connection does; one connection per replica serves that, so a pool (deadpool-postgres)
//! would add a dependency for nothing, and sqlx would bring its own pool, macros and
//! async-only calls for a dozen statements. The blocking client runs a small runtime of its
//! own, which must not be entered or dropped on an async thread: every call comes from a
//! blocking thread, and [`PgStore`]'s `Drop` hands the client to a plain thread.
//!
//! Across replicas:
//! - Dedupe is the database's: an event row is inserted with `ON CONFLICT (id) DO NOTHING`,
//!   and only an inserted row is counted. A concurrent insert of the same id waits for the
//!   other transaction and then inserts nothing (or, if that one rolled back, inserts).
//! - Writes (an envelope, the retention) take one transaction-scoped advisory lock, so they
//!   run one at a time across replicas: `seq` is then handed out in commit order (`GET
//!   /events?after=SEQ` misses nothing committed later with a smaller `seq`), and no two
//!   envelopes can deadlock on the counter rows every envelope updates. Reads never wait.
//! - The schema is created at start inside a transaction holding another advisory lock, so
//!   replicas starting at once do not race on `CREATE TABLE IF NOT EXISTS`.

use postgres::{Client, Config, NoTls, Transaction};

use super::{Database, EventRow, PgError, Pruned, Recorded, Report, Retention, StoreError, Tally, Totals};
use crate::classify::{all_metric_names, metric_name, Assessment, InvalidEvent, Kind, Outcome};
use crate::period::{Period, PeriodKind};

/// The version of the schema below, in `consumer_schema` (the SQLite file's `user_version`).
pub const PG_SCHEMA_VERSION: i32 = 1;

/// `pg_advisory_xact_lock` keys: creating the schema; writing (an envelope, the retention).
const SCHEMA_LOCK: i64 = 0x7267_636f_6e73_0001;
const WRITE_LOCK: i64 = 0x7267_636f_6e73_0002;

/// Seconds to wait for the server when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The tables of the SQLite schema (version 2), in PostgreSQL's types.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
    user_id BIGINT,
    deploy_token_id BIGINT,
    request_id TEXT,
    reason TEXT,
    received_at BIGINT NOT NULL,
    occurred_at BIGINT
);
CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at);
CREATE TABLE IF NOT EXISTS repositories (
    repository TEXT PRIMARY KEY,
    first_event_id TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS tallies (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS unique_actors (
    period TEXT NOT NULL,
    event TEXT NOT NULL,
    actor BIGINT NOT NULL,
    ends_at BIGINT NOT NULL,
    PRIMARY KEY (period, event, actor)
);
CREATE INDEX IF NOT EXISTS unique_actors_ends_at ON unique_actors (ends_at);
CREATE TABLE IF NOT EXISTS unique_counts (
    period TEXT NOT NULL,
    event TEXT NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (period, event)
);
";

/// One replica's connection to the shared database (reconnected when it was lost).
pub struct PgStore {
    config: Config,
    /// The URL without its password, for errors.
    target: String,
    client: Option<Client>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("target", &self.target).finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // The blocking client stops its own runtime when dropped, which tokio refuses on an
        // async thread (where the last `Arc<AppState>` may go): close it on a plain thread.
        if let Some(client) = self.client.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new().name("postgres-close".into()).spawn(move || drop(client));
            }
        }
    }
}

fn connect(config: &Config, target: &str) -> Result<Client, StoreError> {
    config.connect(NoTls).map_err(|error| StoreError::Connect { target: target.to_owned(), error: PgError(error) })
}

impl PgStore {
    /// Connects to `url` and creates the schema if absent.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        let target = Database::Postgres(url.to_owned()).display();
        let mut config: Config =
            url.parse().map_err(|error| StoreError::Url { target: target.clone(), error: PgError(error) })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_password().is_none() {
            // libpq's convention, to keep the password off the command line.
            if let Ok(password) = std::env::var("PGPASSWORD") {
                config.password(password);
            }
        }
        let mut client = connect(&config, &target)?;
        create_schema(&mut client, &target)?;
        Ok(PgStore { config, target, client: Some(client) })
    }

    /// The connection, reconnecting if the last one was closed (a server restart).
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        let client = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => connect(&self.config, &self.target)?,
        };
        Ok(self.client.insert(client))
    }

    pub fn record(
        &mut self,
        batch: Vec<Result<Assessment, InvalidEvent>>,
        received_at: i64,
    ) -> Result<Report, StoreError> {
        let mut tx = self.client()?.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        let mut report = Report::default();
        for item in batch {
            report.events += 1;
            let assessment = match item {
                Ok(a) => a,
                Err(invalid) => {
                    bump(&mut tx, "tallies", Tally::Invalid.as_str())?;
                    report.invalid += 1;
                    report.details.push(Recorded::Invalid(invalid));
                    continue;
                }
            };
            let Some(seq) = insert_event(&mut tx, &assessment, received_at)? else {
                bump(&mut tx, "tallies", Tally::Duplicates.as_str())?;
                report.duplicates += 1;
                report.details.push(Recorded::Duplicate { id: assessment.facts.id.clone() });
                continue;
            };
            let counted = count(&mut tx, &assessment, received_at)?;
            if !counted.is_empty() {
                tx.execute("UPDATE events SET counted = $1 WHERE seq = $2", &[&counted.join(" "), &seq])?;
            }
            match assessment.outcome {
                Outcome::Usage { .. } => report.counted += 1,
                Outcome::Ignored => report.ignored += 1,
                Outcome::Rejected => report.rejected += 1,
                Outcome::Unattributed => report.unattributed += 1,
            }
            report.details.push(Recorded::New { assessment: Box::new(assessment), counted });
        }
        tx.commit()?;
        Ok(report)
    }

    pub fn totals(&mut self) -> Result<Totals, StoreError> {
        let client = self.client()?;
        let mut totals = Totals::default();
        for row in client.query("SELECT name, value FROM counters WHERE value > 0 ORDER BY name", &[])? {
            totals.counters.insert(row.try_get(0)?, row.try_get(1)?);
        }
        for row in client.query("SELECT name, value FROM tallies", &[])? {
            let (name, value): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
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

    pub fn unique_counts(&mut self, period: &Period) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        let mut unique: std::collections::BTreeMap<String, i64> =
            all_metric_names().into_iter().map(|n| (n, 0)).collect();
        for row in self.client()?.query("SELECT event, value FROM unique_counts WHERE period = $1", &[&period.key])? {
            unique.insert(row.try_get(0)?, row.try_get(1)?);
        }
        Ok(unique)
    }

    /// At most `limit + 1` rows with `seq > after`, in arrival order.
    pub fn events_after(&mut self, after: i64, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        let rows = self.client()?.query(
            "SELECT seq, id, action, repository, tag, digest, media_type, outcome, counted, token_type, username,
                    user_id, deploy_token_id, request_id, reason, received_at, occurred_at
             FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&after, &(i64::from(limit) + 1)],
        )?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    seq: r.try_get(0)?,
                    id: r.try_get(1)?,
                    action: r.try_get(2)?,
                    repository: r.try_get(3)?,
                    tag: r.try_get(4)?,
                    digest: r.try_get(5)?,
                    media_type: r.try_get(6)?,
                    outcome: r.try_get(7)?,
                    counted: r.try_get::<_, String>(8)?.split_whitespace().map(str::to_owned).collect(),
                    token_type: r.try_get(9)?,
                    username: r.try_get(10)?,
                    user_id: r.try_get(11)?,
                    deploy_token_id: r.try_get(12)?,
                    request_id: r.try_get(13)?,
                    reason: r.try_get(14)?,
                    received_at: r.try_get(15)?,
                    occurred_at: r.try_get(16)?,
                })
            })
            .collect()
    }

    pub fn event_count(&mut self) -> Result<i64, StoreError> {
        Ok(self.client()?.query_one("SELECT COUNT(*) FROM events", &[])?.try_get(0)?)
    }

    /// As the SQLite backend's `prune`. The row limit keeps the newest `max_events` rows by
    /// position, not by `seq` arithmetic: PostgreSQL's identity leaves gaps (a duplicate's
    /// `ON CONFLICT DO NOTHING` still draws a value).
    pub fn prune(&mut self, cutoff: i64, retention: Retention) -> Result<Pruned, StoreError> {
        let mut tx = self.client()?.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        let mut events = tx.execute("DELETE FROM events WHERE received_at < $1", &[&cutoff])?;
        events += tx.execute(
            "DELETE FROM events WHERE seq <= (SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET $1)",
            &[&retention.max_events.max(0)],
        )?;
        let actor_ids = tx.execute("DELETE FROM unique_actors WHERE ends_at < $1", &[&cutoff])?;
        tx.commit()?;
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Ok(Pruned { events: size(events), actor_ids: size(actor_ids) })
    }
}

/// Creates the tables if absent, under the schema lock; refuses a newer schema.
fn create_schema(client: &mut Client, target: &str) -> Result<(), StoreError> {
    let schema_err = |error| StoreError::Schema { target: target.to_owned(), error: PgError(error) };
    let mut tx = client.transaction().map_err(schema_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).map_err(schema_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS consumer_schema (version INTEGER NOT NULL)").map_err(schema_err)?;
    let found: Option<i32> = match tx.query_opt("SELECT max(version) FROM consumer_schema", &[]).map_err(schema_err)? {
        Some(row) => row.try_get(0).map_err(schema_err)?,
        None => None,
    };
    match found {
        Some(found) if found > PG_SCHEMA_VERSION => {
            return Err(StoreError::PgVersion { target: target.to_owned(), found });
        }
        Some(_) => tx.batch_execute(SCHEMA).map_err(schema_err)?,
        None => {
            tx.batch_execute(SCHEMA).map_err(schema_err)?;
            tx.execute("INSERT INTO consumer_schema (version) VALUES ($1)", &[&PG_SCHEMA_VERSION])
                .map_err(schema_err)?;
        }
    }
    tx.commit().map_err(schema_err)
}

/// Inserts a new event row (`counted` filled in by the caller); `None` when the id is already
/// recorded, by this replica or another.
fn insert_event(tx: &mut Transaction<'_>, a: &Assessment, received_at: i64) -> Result<Option<i64>, postgres::Error> {
    let f = &a.facts;
    let user = a.user.as_ref();
    let id_of = |id: Option<u64>| id.and_then(|i| i64::try_from(i).ok());
    let row = tx.query_opt(
        "INSERT INTO events (id, action, repository, tag, digest, media_type, outcome, token_type, username,
                             user_id, deploy_token_id, request_id, reason, received_at, occurred_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (id) DO NOTHING RETURNING seq",
        &[
            &f.id,
            &f.action,
            &f.repository,
            &f.tag,
            &f.digest,
            &f.media_type,
            &a.outcome.as_str(),
            &user.map(|u| &u.token_type),
            &user.map(|u| &u.username),
            &id_of(user.and_then(|u| u.user_id)),
            &id_of(user.and_then(|u| u.deploy_token_id)),
            &f.request_id,
            &a.reason,
            &received_at,
            &a.occurred_at,
        ],
    )?;
    row.map(|r| r.try_get(0)).transpose()
}

/// As the SQLite backend's `count`.
fn count(tx: &mut Transaction<'_>, a: &Assessment, received_at: i64) -> Result<Vec<String>, postgres::Error> {
    let (kind, principal) = match a.outcome {
        Outcome::Usage { kind, principal } => (kind, principal),
        Outcome::Ignored => return bump(tx, "tallies", Tally::Ignored.as_str()).map(|()| Vec::new()),
        Outcome::Rejected => return bump(tx, "tallies", Tally::Rejected.as_str()).map(|()| Vec::new()),
        Outcome::Unattributed => return bump(tx, "tallies", Tally::Unattributed.as_str()).map(|()| Vec::new()),
    };
    let mut counted = vec![metric_name(kind, principal)];
    if let (true, Some(repository)) = (kind.is_push(), &a.facts.repository) {
        let created = tx.execute(
            "INSERT INTO repositories (repository, first_event_id, received_at) VALUES ($1, $2, $3)
             ON CONFLICT (repository) DO NOTHING",
            &[repository, &a.facts.id, &received_at],
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

/// Adds one to `name` in `table` (`counters` or `tallies`).
fn bump(tx: &mut Transaction<'_>, table: &'static str, name: &str) -> Result<(), postgres::Error> {
    tx.execute(
        &format!(
            "INSERT INTO {table} (name, value) VALUES ($1, 1) ON CONFLICT (name) DO UPDATE SET value = {table}.value + 1"
        ),
        &[&name],
    )?;
    Ok(())
}

/// As the SQLite backend's `add_unique`.
fn add_unique(tx: &mut Transaction<'_>, metric: &str, actor: i64, occurred_at: i64) -> Result<(), postgres::Error> {
    for kind in PeriodKind::ALL {
        let period = Period::at_unix(kind, occurred_at);
        let added = tx.execute(
            "INSERT INTO unique_actors (period, event, actor, ends_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&period.key, &metric, &actor, &period.end_unix()],
        )?;
        if added == 1 {
            tx.execute(
                "INSERT INTO unique_counts (period, event, value) VALUES ($1, $2, 1)
                 ON CONFLICT (period, event) DO UPDATE SET value = unique_counts.value + 1",
                &[&period.key, &metric],
            )?;
        }
    }
    Ok(())
}
